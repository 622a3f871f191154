"""Preparation: real FineWeb-Edu rows through the `datasets` path, exact resume, input validation, hub failure."""

import hashlib
import json
import os
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pelab.data import prepare as prep
from pelab.data import writer
from pelab.data.hub import HubUnreachable
from pelab.data.prepare import prepare
from pelab.data.sampler import TrainWindows
from pelab.data.shards import MANIFEST, ShardError, find_shards, load_manifest, read_shard
from pelab.data.tokenizer import load_tokenizer
from pelab.data.writer import ResumeState, ShardPacker, write_shards
from pelab.train.config import compose

REPO = Path(__file__).resolve().parent.parent
SHARD_TOKENS = 20_000


def fineweb_rows() -> list[dict]:
    sample_dir = os.environ.get("FINEWEB_SAMPLE_DIR")
    if not sample_dir:
        pytest.skip("FINEWEB_SAMPLE_DIR is unset (CI sets it to ../shared/data/pretrain_sample)")
    path = REPO / sample_dir / "fineweb_edu_sample10bt_150docs.jsonl"  # a relative dir is relative to the repo
    if not path.is_file():
        pytest.skip(f"{path} not found (FINEWEB_SAMPLE_DIR={sample_dir})")
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def fineweb_parquet(tmp_path_factory) -> Path:
    """The 150 real docs as a parquet file with FineWeb-Edu's columns (missing ones filled in)."""
    texts = [row["text"] for row in fineweb_rows()]
    tok = load_tokenizer()
    n = len(texts)
    table = pa.table(
        {
            "text": texts,
            "id": [f"<urn:uuid:{hashlib.md5(t.encode()).hexdigest()}>" for t in texts],
            "dump": ["CC-MAIN-2013-20"] * n,
            "url": [f"http://example.org/doc/{i}" for i in range(n)],
            "file_path": ["s3://commoncrawl/crawl-data/CC-MAIN-2013-20/segments/1368696381249/warc/x.warc.gz"] * n,
            "language": ["en"] * n,
            "language_score": [0.97] * n,
            "token_count": [len(ids) for ids in tok.encode_batch(texts)],
            "score": [3.1] * n,
            "int_score": [3] * n,
        }
    )
    path = tmp_path_factory.mktemp("fineweb") / "000_00000.parquet"
    pq.write_table(table, path)
    return path


def fineweb_cfg(out_dir, **overrides):
    """The composed `data=fineweb_edu` config with test-sized overrides."""
    cfg = compose(["data=fineweb_edu", f"paths.data={out_dir}"])
    cfg.data.merge_with({"dir": str(out_dir), "shard_tokens": SHARD_TOKENS, "num_proc": 1, **overrides})
    return cfg.data


def expected_stream(texts) -> np.ndarray:
    tok = load_tokenizer()
    return np.concatenate([[tok.eot_id, *ids] for ids in tok.encode_batch(texts)])


def all_tokens(out_dir) -> np.ndarray:
    val, train = find_shards(out_dir)
    return np.concatenate([read_shard(p) for p in val + train])


def dir_bytes(out_dir) -> dict:
    return {p.name: p.read_bytes() for p in sorted(Path(out_dir).iterdir())}


def test_prepare_real_fineweb_rows_from_local_parquet(fineweb_parquet, tmp_path):
    texts = [row["text"] for row in fineweb_rows()]
    out = tmp_path / "fw"
    prepare(fineweb_cfg(out, local_files=str(fineweb_parquet), num_proc=2))

    val, train = find_shards(out)
    assert [p.name for p in val] == ["fineweb_val_000000.bin"]
    assert [p.name for p in train] == [f"fineweb_train_{i:06d}.bin" for i in range(1, len(train) + 1)]
    counts = []
    for path in val + train:
        header = np.fromfile(path, dtype="<i4", count=256)
        assert header[:2].tolist() == [20240520, 1] and not header[3:].any()
        assert path.stat().st_size == 1024 + 2 * header[2]
        counts.append(int(header[2]))
    assert all(c == SHARD_TOKENS for c in counts[:-1]) and 0 < counts[-1] <= SHARD_TOKENS

    tok = load_tokenizer()
    stream = expected_stream(texts)
    assert sum(counts) == len(stream) == sum(1 + len(tok.encode(t)) for t in texts)
    tokens = all_tokens(out)
    assert tokens[:50].tolist() == [50256, *tok.encode(texts[0])][:50]
    assert np.array_equal(tokens, stream)  # every document, in order, split across shards where needed

    manifest = load_manifest(out)
    assert manifest["num_docs"] == 150 and manifest["num_tokens"] == len(stream)
    assert manifest["tokenizer"] == {"name": "gpt2", "vocab_size": 50257, "eot_id": 50256}
    assert manifest["source"] == {"local_files": [str(fineweb_parquet)]}
    for shard in manifest["shards"]:
        assert shard["sha256"] == hashlib.sha256((out / shard["name"]).read_bytes()).hexdigest()
    assert not (out / writer.STATE).exists()

    sampler = TrainWindows(train, seq_len=256, seed=0)
    windows = sampler.windows(0, np.arange(64))
    assert windows.shape == (64, 257) and windows.max() < 50257
    shard, offset = sampler.starts(0, np.arange(64))
    assert windows[5].tolist() == read_shard(train[shard[5]])[offset[5] : offset[5] + 257].tolist()


@pytest.mark.parametrize("interrupt", ["stop_after_shards", "kill_mid_shard"])
def test_interrupted_prepare_resumes_byte_for_byte(fineweb_parquet, tmp_path, monkeypatch, interrupt):
    reference = tmp_path / "ref"
    prepare(fineweb_cfg(reference, local_files=str(fineweb_parquet)))

    out = tmp_path / "resumed"
    cfg = fineweb_cfg(out, local_files=str(fineweb_parquet))
    if interrupt == "stop_after_shards":
        prepare(cfg, stop_after_shards=2)
    else:  # the process dies while filling shard 2: the last completed shard is the resume point
        real_load_texts = prep.load_texts

        def dying_texts(data_cfg):
            texts, source = real_load_texts(data_cfg)
            return (t if i < 75 else (_ for _ in ()).throw(KeyboardInterrupt) for i, t in enumerate(texts)), source

        monkeypatch.setattr(prep, "load_texts", dying_texts)
        with pytest.raises(KeyboardInterrupt):
            prepare(cfg)
        monkeypatch.undo()
    assert not (out / MANIFEST).exists()
    state = json.loads((out / writer.STATE).read_text())
    assert state["next_shard"] == 2 and 0 < state["docs_done"] < 150
    assert state["doc_offset"] > 0  # the resume point is inside a document split across shards 1 and 2
    assert sorted(p.name for p in out.glob("*.bin")) == ["fineweb_train_000001.bin", "fineweb_val_000000.bin"]

    prepare(cfg)
    assert dir_bytes(out) == dir_bytes(reference)


def test_resume_at_every_shard_boundary_with_documents_longer_than_shards(tmp_path):
    rng = np.random.default_rng(0)
    words = ["alpha", "beta", "gamma", "delta", "epsilon"]
    texts = [" ".join(rng.choice(words, size=int(n))) for n in rng.integers(1, 130, size=12)]
    tok = load_tokenizer()
    kwargs = dict(prefix="t", shard_tokens=40, val_shard_tokens=70, settings={"source": "synthetic"})
    reference = write_shards(texts, tmp_path / "ref", tok, **kwargs)
    n_shards = len(reference["shards"])
    assert reference["shards"][0]["tokens"] == 70 and n_shards > 10
    assert np.array_equal(all_tokens(tmp_path / "ref"), expected_stream(texts))
    for k in range(1, n_shards):
        out = tmp_path / f"stop{k}"
        while write_shards(texts, out, tok, stop_after_shards=k, **kwargs) is None:  # resume repeatedly
            pass
        assert dir_bytes(out) == dir_bytes(tmp_path / "ref"), k


def test_rerun_is_a_no_op_and_other_settings_are_refused(tmp_path):
    tok = load_tokenizer()
    texts = ["one two three " * 20] * 5
    kwargs = dict(prefix="t", shard_tokens=100, settings={"source": "synthetic"})
    first = write_shards(texts, tmp_path, tok, **kwargs)
    assert write_shards(texts, tmp_path, tok, **kwargs) == first
    with pytest.raises(ShardError, match="other settings"):
        write_shards(texts, tmp_path, tok, **{**kwargs, "shard_tokens": 99})
    with pytest.raises(ValueError, match="no train shard"):
        write_shards(texts, tmp_path / "small", tok, prefix="t", shard_tokens=10**6, settings={})


def test_packer_records_partial_documents(tmp_path):
    packer = ShardPacker(tmp_path, "t", np.uint16, shard_tokens=4, val_shard_tokens=4, start=ResumeState(), settings={})
    packer.add(np.arange(3))
    packer.add(np.arange(10, 16))  # fills shard 0 with 1 token, shard 1 with 4, 1 token left
    state = json.loads((tmp_path / writer.STATE).read_text())
    assert (state["docs_done"], state["next_shard"], state["doc_offset"]) == (1, 2, 5)


def test_local_files_are_validated(tmp_path):
    bad = tmp_path / "no_text.parquet"
    pq.write_table(pa.table({"content": ["x"], "id": ["1"]}), bad)
    with pytest.raises(ValueError, match=r"no `text` column \(columns found: content, id\)"):
        prepare(fineweb_cfg(tmp_path / "out", local_files=str(bad)))
    with pytest.raises(FileNotFoundError, match="nothing matches"):
        prepare(fineweb_cfg(tmp_path / "out", local_files=str(tmp_path / "*.jsonl")))
    (tmp_path / "a.csv").write_text("text\nx\n")
    with pytest.raises(ValueError, match="unsupported file type a.csv"):
        prepare(fineweb_cfg(tmp_path / "out", local_files=[str(tmp_path / "a.csv")]))


def test_local_jsonl_and_max_docs(tmp_path):
    texts = [row["text"] for row in fineweb_rows()][:30]
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(texts)))
    out = tmp_path / "out"
    prepare(fineweb_cfg(out, local_files=str(path), max_docs=12, shard_tokens=2000))
    assert load_manifest(out)["num_docs"] == 12
    assert np.array_equal(all_tokens(out), expected_stream(texts[:12]))


@pytest.mark.parametrize("env", [{"HF_HUB_OFFLINE": "1"}, {"HF_ENDPOINT": "http://127.0.0.1:9"}])
def test_unreachable_hub_fails_fast_pointing_at_local_files(tmp_path, monkeypatch, env):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    start = time.monotonic()
    with pytest.raises(HubUnreachable) as err:
        prepare(fineweb_cfg(tmp_path / "out"))
    assert time.monotonic() - start < 30
    assert "unreachable" in str(err.value) and "data.local_files=" in str(err.value) and "`text`" in str(err.value)
    assert not (tmp_path / "out").exists()


def test_cli_composes_the_hydra_config(fineweb_parquet, tmp_path, capsys):
    prep.main(
        [
            "data=fineweb_edu",
            f"paths.data={tmp_path}",
            f"data.local_files={fineweb_parquet}",
            f"data.shard_tokens={SHARD_TOKENS}",
            "data.num_proc=1",
        ]
    )
    out = tmp_path / "fineweb_edu_sample-10BT"
    assert load_manifest(out)["num_docs"] == 150
    assert "150 documents" in capsys.readouterr().out
