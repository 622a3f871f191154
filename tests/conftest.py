"""Shared fixtures: composed configs for tiny CPU runs, and one embedded-data build per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")

REPO = Path(__file__).resolve().parent.parent

# Small enough for a 2-core CPU: 2 micro-batches of 4 x 64 tokens per step.
TINY = [
    "model=gpt_tiny",
    "trainer.seq_len=64",
    "trainer.micro_batch_size=4",
    "trainer.global_batch_tokens=512",
    "trainer.log_every=2",
    "trainer.val_every=5",
    "trainer.ckpt_every=5",
    "data.val_tokens=2048",
    "optim.warmup_steps=2",
]


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors: one intra-op thread avoids OpenMP oversubscription on busy 2-core hosts
    (use with `pytestmark = pytest.mark.usefixtures("one_thread")`)."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def data_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("data_cache")


@pytest.fixture
def tiny_cfg(data_root):
    """compose(overrides) for a tiny CPU run whose data lives in the session's data dir."""
    from pelab.train.config import compose

    def make(*overrides: str):
        return compose([*TINY, f"paths.data={data_root}", *overrides])

    return make


def scale_loss(monkeypatch, factor: float, bad_call, grad_only: bool = False) -> None:
    """Wrap `GPT.loss` so that the n-th call (1-based; with `grad_only`, counting training calls only)
    returns its loss times `factor` when `bad_call(n)`: a loss spike or a NaN on chosen micro-batches."""
    import torch
    from pelab.models.gpt import GPT

    real_loss = GPT.loss
    calls = {"n": 0}

    def loss(self, idx, targets, z_loss=0.0):
        out = real_loss(self, idx, targets, z_loss)
        if grad_only and not torch.is_grad_enabled():
            return out
        calls["n"] += 1
        if bad_call(calls["n"]):
            out["loss"] = out["loss"] * factor
        return out

    monkeypatch.setattr(GPT, "loss", loss)
