"""End-to-end training on the embedded data: loss falls, outputs are complete, resume is exact,
and bad input stops early with one clear message."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from pelab.train.config import ConfigError
from pelab.train.run import run

from tests.conftest import REPO, TINY, scale_loss


def _params(ckpt: Path) -> dict[str, torch.Tensor]:
    return torch.load(ckpt, map_location="cpu", weights_only=False)["state_dict"]


def _rows(run_dir: Path) -> list[dict]:
    with open(run_dir / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_short_run_learns_and_writes_its_outputs(tiny_cfg, tmp_path):
    cfg = tiny_cfg("trainer.max_steps=20", "optim.lr=3e-3")
    summary = run(cfg, tmp_path)
    for name in ("config.yaml", "metrics.csv", "summary.json", "loss.png", "checkpoints/last.ckpt"):
        assert (tmp_path / name).exists(), name
    rows = _rows(tmp_path)
    assert [int(r["step"]) for r in rows] == sorted({2 * i for i in range(1, 11)} | {5, 15})
    train = [float(r["train/loss"]) for r in rows if r["train/loss"]]
    assert train[-1] < train[0] - 1.0, train  # starts near ln(50257) = 10.8
    assert {"step", "tokens", "train/loss", "val/loss", "lr", "grad_norm", "tokens_per_s"} <= set(rows[0])
    assert int(rows[-1]["tokens"]) == 20 * 512
    saved = json.loads((tmp_path / "summary.json").read_text())
    assert saved == summary
    assert saved["steps"] == 20 and saved["tokens"] == 20 * 512 and saved["model"] == "gpt_tiny"
    assert saved["val_loss"] == pytest.approx(float(rows[-1]["val/loss"]))
    assert saved["val_loss"] < 10.0 and saved["params"] > 0 and saved["tokens_per_s"] > 0
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("*.ckpt")) == [
        "last.ckpt",
        "step-00000015.ckpt",
        "step-00000020.ckpt",
    ]  # keep_checkpoints=2


def test_resume_is_bit_exact(tiny_cfg, tmp_path):
    # The schedule must not depend on max_steps for an interrupted run to match: fix decay_steps.
    common = ["optim.decay_steps=10", "trainer.ckpt_every=5"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    run(tiny_cfg("trainer.max_steps=10", *common), straight)
    run(tiny_cfg("trainer.max_steps=5", *common), split)
    first_half = _params(split / "checkpoints" / "last.ckpt")
    run(tiny_cfg("trainer.max_steps=10", *common), split)  # same command again: continues from step 5
    a, b = _params(straight / "checkpoints" / "last.ckpt"), _params(split / "checkpoints" / "last.ckpt")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert any(not torch.equal(a[k], first_half[k]) for k in a)
    steps = [int(r["step"]) for r in _rows(split)]
    assert steps == sorted(set(steps)) and steps[-1] == 10  # no step logged twice across the resume


def test_bad_config_is_reported_before_training(tiny_cfg, tmp_path):
    with pytest.raises(ConfigError, match=r"trainer.seq_len=8192 is longer than model.max_seq_len=4096"):
        run(tiny_cfg("trainer.seq_len=8192"), tmp_path)
    with pytest.raises(
        ConfigError, match=r"global_batch_tokens=1000 is not a multiple .* e.g. trainer.global_batch_tokens=1024"
    ):
        run(tiny_cfg("trainer.global_batch_tokens=1000"), tmp_path)
    with pytest.raises(ConfigError, match="resume=true but"):
        run(tiny_cfg("resume=true"), tmp_path)
    with pytest.raises(ValueError, match="model.vocab_size=1000 is smaller than the gpt2 tokenizer's 50257"):
        run(tiny_cfg("model.vocab_size=1000"), tmp_path)
    assert not (tmp_path / "checkpoints").exists()


def test_existing_run_dir_is_not_silently_reused(tiny_cfg, tmp_path):
    run(tiny_cfg("trainer.max_steps=2"), tmp_path)
    with pytest.raises(ConfigError, match="already holds a run"):
        run(tiny_cfg("trainer.max_steps=4", "resume=false"), tmp_path)
    with pytest.raises(ConfigError, match="different pe"):
        run(tiny_cfg("trainer.max_steps=4", "pe=nope"), tmp_path)


def test_nonfinite_loss_stops_and_keeps_last_good_checkpoint(tiny_cfg, tmp_path, monkeypatch):
    from pelab.train.module import NonFiniteLoss

    scale_loss(monkeypatch, float("nan"), lambda n: n > 2 * 6)  # from step 7 on (2 micro-batches per step)
    with pytest.raises(NonFiniteLoss, match="non-finite loss"):
        run(tiny_cfg("trainer.max_steps=12", "trainer.ckpt_every=5"), tmp_path)
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["global_step"] == 5
    assert all(torch.isfinite(t).all() for t in ckpt["state_dict"].values())


def test_nonfinite_loss_can_skip_the_step(tiny_cfg, tmp_path, monkeypatch):
    scale_loss(monkeypatch, float("nan"), lambda n: n in (5, 6))  # step 3 only
    summary = run(tiny_cfg("trainer.max_steps=6", "trainer.stop_on_nonfinite=false"), tmp_path)
    assert summary["steps"] == 6 and summary["val_loss"] == summary["val_loss"]  # finite, not NaN


def test_unknown_choice_is_one_clear_error(data_root):
    r = subprocess.run(
        [sys.executable, "-m", "train", "pe=rope_typo", f"paths.data={data_root}"],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert r.returncode != 0
    assert "Could not find 'pe/rope_typo'" in r.stderr and "Available options in 'pe'" in r.stderr


def test_cli_multirun_two_cells(data_root, tmp_path):
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "train",
            "-m",
            "pe=rope,nope",
            "trainer.max_steps=3",
            *TINY,
            f"paths.data={data_root}",
            f"paths.runs={tmp_path}",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    summaries = sorted(tmp_path.glob("multirun/*/*/summary.json"))
    assert len(summaries) == 2
    assert sorted(json.loads(p.read_text())["pe"] for p in summaries) == ["nope", "rope"]
