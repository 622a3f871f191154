"""Shard format (nanoGPT/T6/GRAPE compatible), corruption errors, shard discovery and manifest."""

import json

import numpy as np
import pytest
from pelab.data.shards import (
    HEADER_BYTES,
    MAGIC,
    ShardError,
    find_shards,
    load_manifest,
    read_header,
    read_shard,
    shard_name,
    verify_manifest,
    write_manifest,
    write_shard,
)
from pelab.data.tokenizer import load_tokenizer


def nanogpt_bytes(tokens) -> bytes:
    """The reference layout, written independently of data.shards."""
    header = np.zeros(256, dtype="<i4")
    header[0], header[1], header[2] = 20240520, 1, len(tokens)
    return header.tobytes() + np.asarray(tokens, dtype="<u2").tobytes()


def test_names_follow_t6_grape():
    assert shard_name("fineweb", 0) == "fineweb_val_000000.bin"
    assert shard_name("fineweb", 1) == "fineweb_train_000001.bin"
    assert shard_name("sample", 123) == "sample_train_000123.bin"


def test_uint16_shard_is_byte_identical_to_nanogpt_format(tmp_path):
    tokens = np.array([50256, 15496, 995, 0, 65535], dtype=np.int64)
    path = tmp_path / "x_val_000000.bin"
    write_shard(path, tokens)
    assert path.read_bytes() == nanogpt_bytes(tokens)
    shard = read_shard(path)
    assert shard.dtype == np.uint16 and shard.tolist() == tokens.tolist()
    assert read_header(path) == (1, 5)
    assert list(tmp_path.iterdir()) == [path]  # no temp file left behind


def test_uint32_shard_uses_version_2(tmp_path):
    tokens = np.array([128000, 5, 70000], dtype=np.int64)
    path = tmp_path / "llama_val_000000.bin"
    write_shard(path, tokens, dtype=np.uint32)
    header = np.fromfile(path, dtype="<i4", count=256)
    assert header[:3].tolist() == [MAGIC, 2, 3]
    assert path.stat().st_size == HEADER_BYTES + 3 * 4
    assert read_shard(path).tolist() == tokens.tolist()


def test_ids_over_uint16_are_refused(tmp_path):
    with pytest.raises(ValueError, match="uint32"):
        write_shard(tmp_path / "a.bin", [1, 65536])
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize(
    "corrupt, problem",
    [
        (lambda b: b"\x00\x00\x00\x00" + b[4:], "bad magic"),
        (lambda b: b[:4] + np.int32(7).tobytes() + b[8:], "unsupported version 7"),
        (lambda b: b[:-2], f"truncated: expected {HEADER_BYTES + 20} bytes got {HEADER_BYTES + 18}"),
        (lambda b: b + b"\x00\x00", "trailing bytes"),
        (lambda b: b[:100], "truncated header"),
    ],
)
def test_corrupt_shards_raise_shard_error_naming_file_and_fix(tmp_path, corrupt, problem):
    path = tmp_path / "fineweb_train_000001.bin"
    path.write_bytes(corrupt(nanogpt_bytes(range(10))))
    with pytest.raises(ShardError) as err:
        read_shard(path, "fineweb_edu")
    message = str(err.value)
    assert str(path) in message and problem in message
    assert "python -m data.prepare data=fineweb_edu" in message
    assert isinstance(err.value, ValueError)


def test_find_shards_sorted_and_clear_errors(tmp_path):
    with pytest.raises(ShardError, match=r"no such directory.*python -m data.prepare data=fineweb_edu"):
        find_shards(tmp_path / "missing", "fineweb_edu")
    write_shard(tmp_path / shard_name("p", 0), [1, 2])
    with pytest.raises(ShardError, match="0 train shards"):
        find_shards(tmp_path)
    for i in (2, 1, 10):
        write_shard(tmp_path / shard_name("p", i), [i] * 3)
    val, train = find_shards(tmp_path)
    assert [p.name for p in val] == ["p_val_000000.bin"]
    assert [p.name for p in train] == ["p_train_000001.bin", "p_train_000002.bin", "p_train_000010.bin"]


def test_manifest_records_shards_and_detects_damage(tmp_path):
    with pytest.raises(ShardError, match="python -m data.prepare data=sample"):
        load_manifest(tmp_path, "sample")
    write_shard(tmp_path / shard_name("p", 0), [50256, 1, 2])
    write_shard(tmp_path / shard_name("p", 1), [50256, 3, 4, 5])
    manifest = write_manifest(tmp_path, load_tokenizer(), num_docs=2, source="unit test")
    assert json.loads((tmp_path / "manifest.json").read_text()) == manifest == load_manifest(tmp_path)
    assert manifest["tokenizer"] == {"name": "gpt2", "vocab_size": 50257, "eot_id": 50256}
    assert manifest["num_docs"] == 2 and manifest["num_tokens"] == 7 and manifest["source"] == "unit test"
    assert [(s["name"], s["split"], s["tokens"]) for s in manifest["shards"]] == [
        ("p_val_000000.bin", "val", 3),
        ("p_train_000001.bin", "train", 4),
    ]
    assert verify_manifest(tmp_path, hashes=True) == manifest

    write_shard(tmp_path / shard_name("p", 1), [50256, 3, 4, 6])  # same size, other content
    verify_manifest(tmp_path)  # the cheap check only looks at token counts
    with pytest.raises(ShardError, match="sha256"):
        verify_manifest(tmp_path, hashes=True)
    write_shard(tmp_path / shard_name("p", 1), [50256])
    with pytest.raises(ShardError, match="1 tokens but the manifest says 4"):
        verify_manifest(tmp_path)
