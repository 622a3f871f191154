"""Token shards in the nanoGPT / modded-nanogpt / T6 / GRAPE binary format, plus a manifest.

A shard is a 256 x int32 little-endian header followed by the tokens:
    header[0] = 20240520 (magic), header[1] = version, header[2] = number of tokens.
Version 1 stores uint16 tokens (byte-identical to the other frameworks, enough for GPT-2);
version 2 stores uint32 tokens for vocabularies over 65,536 ids (e.g. Llama-3).
Shard 0 is the validation shard (`{prefix}_val_000000.bin`), the rest are training shards
(`{prefix}_train_000001.bin`, ...). `manifest.json` records what a finished preparation wrote.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
from pelab.data.atomic import atomic_write, atomic_write_json

MAGIC = 20240520
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
VERSION_DTYPES = {1: np.dtype("<u2"), 2: np.dtype("<u4")}
MANIFEST = "manifest.json"


class ShardError(ValueError):
    """A shard or shard directory is missing, corrupt or inconsistent."""


def prepare_hint(data_name: str | None = None) -> str:
    return f"re-run `python -m data.prepare data={data_name or '<name>'}`"


def shard_name(prefix: str, idx: int) -> str:
    split = "val" if idx == 0 else "train"
    return f"{prefix}_{split}_{idx:06d}.bin"


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest supported token dtype for a vocabulary (uint16 whenever it fits)."""
    return VERSION_DTYPES[1] if vocab_size <= 2**16 else VERSION_DTYPES[2]


def write_shard(path: str | os.PathLike, tokens, dtype=np.uint16) -> None:
    """Write one shard atomically: a reader (or a resumed preparation) never sees half a file."""
    dtype = np.dtype(dtype).newbyteorder("<")
    version = next((v for v, d in VERSION_DTYPES.items() if d == dtype), None)
    if version is None:
        raise ValueError(f"Unsupported token dtype {dtype}: use uint16 (version 1) or uint32 (version 2).")
    tokens = np.asarray(tokens)
    if tokens.size and (tokens.min() < 0 or tokens.max() > np.iinfo(dtype).max):
        raise ValueError(
            f"Token id {int(tokens.max())} does not fit in {dtype.name} (max {np.iinfo(dtype).max}): "
            "a vocabulary over 65,536 ids needs dtype=uint32 (shard version 2)."
        )
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[:3] = MAGIC, version, tokens.size
    atomic_write(Path(path), header, tokens.astype(dtype, copy=False))


def read_header(path: str | os.PathLike, data_name: str | None = None) -> tuple[int, int]:
    """Validate a shard's header and size; return (version, number of tokens)."""
    path = Path(path)
    if not path.is_file():
        raise ShardError(f"{path}: shard file not found; {prepare_hint(data_name)}.")
    size = path.stat().st_size
    if size < HEADER_BYTES:
        raise ShardError(
            f"{path}: truncated header: expected {HEADER_BYTES} bytes got {size}; {prepare_hint(data_name)}."
        )
    with open(path, "rb") as f:
        header = np.frombuffer(f.read(HEADER_BYTES), dtype="<i4")
    magic, version, n_tokens = (int(x) for x in header[:3])
    if magic != MAGIC:
        raise ShardError(f"{path}: bad magic {magic} (expected {MAGIC}): not a token shard; {prepare_hint(data_name)}.")
    if version not in VERSION_DTYPES:
        raise ShardError(
            f"{path}: unsupported version {version} (supported: {sorted(VERSION_DTYPES)}); {prepare_hint(data_name)}."
        )
    expected = HEADER_BYTES + n_tokens * VERSION_DTYPES[version].itemsize
    if size != expected:
        problem = "truncated" if size < expected else "trailing bytes"
        raise ShardError(
            f"{path}: {problem}: expected {expected} bytes got {size} ({n_tokens} tokens in the header); "
            f"{prepare_hint(data_name)}."
        )
    if n_tokens <= 0:
        raise ShardError(f"{path}: holds no tokens; {prepare_hint(data_name)}.")
    return version, n_tokens


def read_shard(path: str | os.PathLike, data_name: str | None = None) -> np.memmap:
    """Memory-map a shard's tokens (header skipped) after validating it."""
    version, n_tokens = read_header(path, data_name)
    return np.memmap(path, dtype=VERSION_DTYPES[version], mode="r", offset=HEADER_BYTES, shape=(n_tokens,))


def find_shards(shard_dir: str | os.PathLike, data_name: str | None = None) -> tuple[list[Path], list[Path]]:
    """(val_paths, train_paths) of a shard directory, sorted; both must be non-empty."""
    shard_dir = Path(shard_dir)
    val = sorted(shard_dir.glob("*_val_*.bin"))
    train = sorted(shard_dir.glob("*_train_*.bin"))
    if not val or not train:
        missing = (
            "no such directory"
            if not shard_dir.is_dir()
            else f"{len(val)} val and {len(train)} train shards (need at least one of each)"
        )
        raise ShardError(f"{shard_dir}: {missing}; run `python -m data.prepare data={data_name or '<name>'}`.")
    return val, train


def sha256_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(shard_dir: str | os.PathLike, tokenizer, num_docs: int, source: str, **extra) -> dict:
    """Describe the shards on disk (names, token counts, sha256) and how they were made.

    Written last by a preparation, so its presence means the directory is complete.
    """
    shard_dir = Path(shard_dir)
    val, train = find_shards(shard_dir)
    shards = [
        {"name": p.name, "split": "val" if p in val else "train", "tokens": read_header(p)[1], "sha256": sha256_file(p)}
        for p in val + train
    ]
    manifest = {
        "source": source,
        "tokenizer": {"name": tokenizer.name, "vocab_size": tokenizer.vocab_size, "eot_id": tokenizer.eot_id},
        "num_docs": num_docs,
        "num_tokens": sum(s["tokens"] for s in shards),
        **extra,
        "shards": shards,
    }
    atomic_write_json(shard_dir / MANIFEST, manifest)
    return manifest


def load_manifest(shard_dir: str | os.PathLike, data_name: str | None = None) -> dict:
    path = Path(shard_dir) / MANIFEST
    if not path.is_file():
        raise ShardError(
            f"{path} not found: the shards are missing or incomplete; "
            f"run `python -m data.prepare data={data_name or '<name>'}`."
        )
    return json.loads(path.read_text())


def verify_manifest(shard_dir: str | os.PathLike, data_name: str | None = None, hashes: bool = False) -> dict:
    """Load the manifest and check every listed shard exists with its token count (and sha256)."""
    shard_dir = Path(shard_dir)
    manifest = load_manifest(shard_dir, data_name)
    for shard in manifest["shards"]:
        path = shard_dir / shard["name"]
        n_tokens = read_header(path, data_name)[1]
        if n_tokens != shard["tokens"]:
            raise ShardError(
                f"{path}: {n_tokens} tokens but the manifest says {shard['tokens']}; {prepare_hint(data_name)}."
            )
        if hashes and sha256_file(path) != shard["sha256"]:
            raise ShardError(f"{path}: sha256 differs from the manifest; {prepare_hint(data_name)}.")
    return manifest
