"""A short plain-PyTorch training run of gpt_tiny with every PE lowers the loss (CPU)."""

from __future__ import annotations

import math

import pytest
import torch
from pelab.models.gpt import GPT
from pelab.models.pe import available
from pelab.train.config import compose, model_config

ALL_PES = available()

VOCAB, T, B, STEPS = 64, 32, 8, 25

ARMS = [(pe, []) for pe in ALL_PES] + [
    ("fox", ["pe.output_gate=true", "pe.output_norm=true", "kv_shift=true"]),  # FoX-Pro extras
    ("grape_ap", ["kv_shift=true"]),
    ("grape_m", ["pe.form=rodrigues"]),
    ("grape_m_ctx", ["pe.init_mode=first_release"]),
]


def tiny_model(pe: str, overrides: list[str]) -> GPT:
    cfg = compose(["model=gpt_tiny", f"pe={pe}", "model.loss_chunk_rows=0", *overrides])
    return GPT(model_config(cfg, vocab_size=VOCAB))


def batch(gen: torch.Generator, perm: torch.Tensor) -> torch.Tensor:
    """Learnable random data: each sequence follows a fixed random successor map from a random start."""
    x = torch.empty(B, T + 1, dtype=torch.long)
    x[:, 0] = torch.randint(0, VOCAB, (B,), generator=gen)
    for t in range(T):
        x[:, t + 1] = perm[x[:, t]]
    return x


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("pe,overrides", ARMS, ids=[f"{p}{'+' + ','.join(o) if o else ''}" for p, o in ARMS])
def test_short_training_run_lowers_the_loss(pe, overrides):
    torch.manual_seed(0)
    model = tiny_model(pe, overrides)
    assert model.cfg.pe["name"] == pe and model.cfg.n_layer == 4 and model.cfg.d_model == 128
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    gen = torch.Generator().manual_seed(1)
    perm = torch.randperm(VOCAB, generator=gen)
    losses = []
    for _ in range(STEPS):
        x = batch(gen, perm)
        loss = model.loss(x[:, :-1], x[:, 1:])["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    assert abs(losses[0] - math.log(VOCAB)) < 0.5  # starts near uniform
    assert sum(losses[-3:]) / 3 < losses[0] - 1.5, losses
    for p in model.pes():
        assert all(torch.isfinite(v) for v in p.stats().values())


def test_cli_matrix_of_every_pe_completes(data_root, tmp_path):
    """`python -m train -m +sweep=pe_matrix` over all PEs, through Lightning, on the embedded data."""
    import json
    import os
    import subprocess
    import sys

    from tests.conftest import REPO

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "train",
            "-m",
            "+sweep=pe_matrix",
            "experiment=tiny",
            "trainer.max_steps=2",
            "monitor.enabled=false",
            f"paths.data={data_root}",
            f"paths.runs={tmp_path}",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    (summary,) = tmp_path.glob("multirun/*/summary.json")
    rows = json.loads(summary.read_text())["rows"]
    assert sorted(row["pe"] for row in rows) == sorted(ALL_PES)
    assert all(row["status"] == "ok" and row["steps"] == 2 and math.isfinite(row["val_loss"]) for row in rows), rows
