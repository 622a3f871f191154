"""Embedded sample corpus, `ensure_prepared`, and the DataModule's resumable, rank-aware loaders."""

import hashlib
import itertools
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from pelab.data.datamodule import TokenDataModule
from pelab.data.ready import ensure_prepared
from pelab.data.sample import sample_documents
from pelab.data.shards import MANIFEST, ShardError, find_shards, load_manifest, read_shard, write_manifest, write_shard
from pelab.data.tokenizer import load_tokenizer
from pelab.train.config import compose

REPO = Path(__file__).resolve().parent.parent
SEQ_LEN, MBS, ACCUM = 64, 4, 2


def data_cfg(name: str, root: Path, **overrides):
    """The composed `data=<name>` config with paths.data=root."""
    cfg = compose([f"data={name}", f"paths.data={root}"])
    cfg.data.merge_with(overrides)
    return cfg.data


@pytest.fixture(scope="module")
def sample_cfg(tmp_path_factory):
    cfg = data_cfg("sample", tmp_path_factory.mktemp("data"))
    ensure_prepared(cfg)
    return cfg


def corpus_digest(docs) -> str:
    return hashlib.sha256("\0".join(docs).encode()).hexdigest()


def test_sample_corpus_is_large_enough_and_deterministic(monkeypatch):
    docs = sample_documents()
    assert len(docs) > 1000 and min(map(len, docs)) >= 200 and len(set(docs)) == len(docs)
    assert any("Python" in d for d in docs[:50])  # English prose about Python, in mixed order
    monkeypatch.setenv("PYTHONHASHSEED", "123")  # set iteration order must not leak into the corpus
    assert corpus_digest(sample_documents()) == corpus_digest(docs)


def test_sample_shards(sample_cfg):
    out = Path(sample_cfg.dir)
    manifest = load_manifest(out)
    tok = load_tokenizer()
    docs = sample_documents()
    print(f"sample corpus: {manifest['num_docs']} docs, {manifest['num_tokens']} tokens")
    assert manifest["num_docs"] == len(docs)
    assert manifest["num_tokens"] == sum(1 + len(ids) for ids in tok.encode_batch(docs)) >= 300_000
    val, train = find_shards(out)
    assert [p.name for p in val] == ["sample_val_000000.bin"] and len(train) >= 2
    n_val = len(read_shard(val[0]))
    assert n_val >= sample_cfg.val_tokens + 1 and n_val >= 0.05 * manifest["num_tokens"] - 1
    assert read_shard(val[0])[:8].tolist() == [50256, *tok.encode(docs[0])][:8]


def test_ensure_prepared_reuses_repairs_and_refuses(sample_cfg, tmp_path):
    out = Path(sample_cfg.dir)
    manifest = (out / MANIFEST).read_text()
    mtimes = {p: p.stat().st_mtime_ns for p in out.iterdir()}
    assert ensure_prepared(sample_cfg) == out
    assert {p: p.stat().st_mtime_ns for p in out.iterdir()} == mtimes  # not rebuilt

    # A damaged sample is rebuilt; a damaged or missing real dataset is an error naming the fix.
    copy = tmp_path / "sample"
    copy.mkdir()
    for p in out.iterdir():
        (copy / p.name).write_bytes(p.read_bytes())
    train1 = copy / "sample_train_000001.bin"
    train1.write_bytes(train1.read_bytes()[:-10])
    ensure_prepared(OmegaConf.merge(sample_cfg, {"dir": str(copy)}))
    assert (copy / MANIFEST).read_text() == manifest
    with pytest.raises(ShardError, match="python -m data.prepare data=fineweb_edu"):
        ensure_prepared(data_cfg("fineweb_edu", tmp_path / "nothing"))

    bad = json.loads(manifest)
    bad["tokenizer"]["vocab_size"] = 128256
    (copy / MANIFEST).write_text(json.dumps(bad))
    with pytest.raises(ShardError, match="tokenized with .*128256.*config asks for .*50257"):
        ensure_prepared(OmegaConf.merge(sample_cfg, {"dir": str(copy)}))


def make_dm(cfg, step=0, rank=0, world=1, workers=0, accum=ACCUM, mbs=MBS, seed=0):
    dm = TokenDataModule(OmegaConf.merge(cfg, {"num_workers": workers}), SEQ_LEN, mbs, accum, seed)
    dm.trainer = SimpleNamespace(global_step=step, global_rank=rank, world_size=world)  # what Lightning provides
    dm.setup("fit")
    return dm


def take(loader, n):
    return [batch.clone() for batch in itertools.islice(loader, n)]


@pytest.mark.parametrize("workers", [0, 2])
def test_resumed_loader_continues_with_the_same_batches(sample_cfg, workers):
    full = take(make_dm(sample_cfg, workers=workers).train_dataloader(), 7)
    assert full[0].shape == (ACCUM, MBS, SEQ_LEN + 1) and full[0].dtype == torch.int64
    assert full[0][..., 0].min() >= 0 and full[0].max() < 50257
    assert len({tuple(b.flatten().tolist()) for b in full}) == 7
    resumed = take(make_dm(sample_cfg, step=4, workers=workers).train_dataloader(), 3)
    assert all(torch.equal(a, b) for a, b in zip(full[4:], resumed, strict=True))
    if workers:
        single = take(make_dm(sample_cfg, workers=0).train_dataloader(), 7)
        assert all(torch.equal(a, b) for a, b in zip(full, single, strict=True))


def test_ranks_split_the_same_global_batch(sample_cfg):
    def rows(batch):
        return {tuple(r) for r in batch.reshape(-1, SEQ_LEN + 1).tolist()}

    one = make_dm(sample_cfg, step=3, accum=4)
    reference = rows(take(one.train_dataloader(), 1)[0])
    assert len(reference) == 4 * MBS
    parts = [
        rows(take(make_dm(sample_cfg, step=3, rank=r, world=2, accum=2).train_dataloader(), 1)[0]) for r in range(2)
    ]
    assert not parts[0] & parts[1] and parts[0] | parts[1] == reference
    assert one.tokens_per_step == 4 * MBS * SEQ_LEN
    assert make_dm(sample_cfg, world=2, accum=2).tokens_per_step == one.tokens_per_step


@pytest.mark.parametrize("workers", [0, 2])
def test_val_batches_are_fixed_and_disjoint_across_ranks(sample_cfg, workers):
    n_windows = sample_cfg.val_tokens // SEQ_LEN
    single = make_dm(sample_cfg, workers=workers)
    batches = list(single.val_dataloader())
    assert single.val_batches == len(batches) == n_windows // MBS
    assert all(b.shape == (MBS, SEQ_LEN + 1) and b.dtype == torch.int64 for b in batches)
    val_tokens = read_shard(find_shards(sample_cfg.dir)[0][0])
    inputs = torch.cat(batches)[:, :-1].flatten()
    assert torch.equal(inputs, torch.from_numpy(val_tokens[: n_windows * SEQ_LEN].astype(np.int64)))
    per_rank = [list(make_dm(sample_cfg, rank=r, world=2, workers=workers).val_dataloader()) for r in range(2)]
    assert len(per_rank[0]) == len(per_rank[1]) == n_windows // (2 * MBS)
    rows = [{tuple(r) for b in batches for r in b.tolist()} for batches in per_rank]
    assert not rows[0] & rows[1] and len(rows[0] | rows[1]) == 2 * MBS * len(per_rank[0])


def test_datamodule_accepts_a_plain_dict(sample_cfg):
    plain = OmegaConf.to_container(sample_cfg, resolve=True)
    dm = TokenDataModule(plain, SEQ_LEN, MBS, ACCUM, seed=0)
    dm.setup()
    batch = next(iter(dm.train_dataloader()))
    assert batch.shape == (ACCUM, MBS, SEQ_LEN + 1)
    assert dm.tokens_per_step == ACCUM * MBS * SEQ_LEN


def test_too_small_val_shard_is_reported(sample_cfg, tmp_path):
    small = tmp_path / "small"
    write_shard(small / "s_val_000000.bin", np.arange(100))
    write_shard(small / "s_train_000001.bin", np.arange(1000))
    write_manifest(small, load_tokenizer(), num_docs=1, source="test")
    dm = TokenDataModule(OmegaConf.merge(sample_cfg, {"dir": str(small), "name": "tiny"}), SEQ_LEN, MBS, ACCUM, 0)
    with pytest.raises(ValueError, match="needs 32769 tokens in the val shard, which holds 100"):
        dm.setup()


@pytest.mark.filterwarnings("ignore:You passed in a `val_dataloader` but have no `validation_step`")
def test_lightning_resume_starts_the_loader_at_the_restored_step(sample_cfg, tmp_path):
    """With a real Trainer: fit 3 steps, checkpoint, resume to 6 == fit 6 steps (batch for batch)."""
    import lightning as L

    class Recorder(L.LightningModule):
        def __init__(self, seen):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))
            self.seen = seen

        def training_step(self, batch, batch_idx):
            self.seen.append((self.global_step, batch.clone()))
            return self.w.sum() * batch.float().mean()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.0)

    def fit(max_steps, seen, ckpt=None):
        trainer = L.Trainer(
            max_steps=max_steps,
            accelerator="cpu",
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            limit_val_batches=0,
            default_root_dir=tmp_path,
        )
        trainer.fit(Recorder(seen), TokenDataModule(sample_cfg, SEQ_LEN, MBS, ACCUM, seed=0), ckpt_path=ckpt)
        return trainer

    full, resumed = [], []
    fit(6, full)
    fit(3, resumed).save_checkpoint(tmp_path / "step3.ckpt")
    fit(6, resumed, ckpt=str(tmp_path / "step3.ckpt"))
    assert [s for s, _ in resumed] == [s for s, _ in full] == list(range(6))
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(full, resumed, strict=True))
