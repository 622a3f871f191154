"""The CPU path of the default job (`make train`): the fused LM-head loss in cache-sized chunks, and a
console that prints each Lightning line once."""

from __future__ import annotations

import subprocess
import sys

import pelab.models.loss as loss_module
import pytest
import torch
from pelab.models.loss import linear_cross_entropy

from tests.conftest import REPO, TINY


@pytest.mark.parametrize("z_loss", [0.0, 1e-3])
def test_cpu_chunks_match_plain_logits_with_and_without_grad(monkeypatch, z_loss):
    monkeypatch.setattr(loss_module, "CPU_CHUNK_LOGITS", 7 * 50)  # 7-row chunks (V=50), below chunk_rows
    torch.manual_seed(0)
    h = torch.randn(37, 16, requires_grad=True)
    w = torch.randn(50, 16, requires_grad=True)
    t = torch.randint(0, 50, (37,))
    t[[3, 20]] = -100
    with torch.no_grad():  # validation: sums only
        no_grad = linear_cross_entropy(h, w, t, chunk_rows=8192, z_loss=z_loss)
    fused = linear_cross_entropy(h, w, t, chunk_rows=8192, z_loss=z_loss)
    fused[0].backward()
    grads = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    plain = linear_cross_entropy(h, w, t, chunk_rows=0, z_loss=z_loss)
    plain[0].backward()
    for a, b, c in zip(no_grad, fused, plain):
        torch.testing.assert_close(a, c)
        torch.testing.assert_close(b, c)
    torch.testing.assert_close(grads, (h.grad, w.grad))


def test_cli_prints_each_lightning_line_once(data_root, tmp_path):
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "train",
            *TINY,
            "trainer.max_steps=2",
            "trainer.val_every=2",
            f"paths.data={data_root}",
            f"paths.runs={tmp_path}",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    out = r.stdout + r.stderr
    assert out.count("GPU available:") == 1 and out.count("TPU available:") == 1, out[-3000:]
    assert "litlogger" not in out


def test_lightning_lines_reach_the_root_handlers_once_when_lightning_was_imported_first():
    # A submitit job imports Lightning before Hydra configures logging: Lightning then adds its own console
    # handler and stops propagation, so without the fix its lines never reach the run's log file.
    code = """
import logging, io
import lightning.pytorch
from lightning.pytorch.utilities.rank_zero import rank_zero_info
stream = io.StringIO()
logging.getLogger().addHandler(logging.StreamHandler(stream))
from pelab.train.loggers import quiet_lightning_logging
quiet_lightning_logging()
rank_zero_info("Restoring states from the checkpoint")
print(stream.getvalue().count("Restoring states from the checkpoint"))
"""
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.split()[-1] == "1" and "Restoring states" not in r.stderr, (r.stdout, r.stderr)
