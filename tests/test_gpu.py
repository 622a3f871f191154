"""GPU suite (`make test-gpu`, `pytest -m gpu`): every attention path users run, on one CUDA GPU.

1. Through the real model (one layer, 2 heads x 128, T=4096, B=2, bf16 autocast) for every PE (and
   KV-shift on RoPE) x document masking off/on x {training step, no-grad evaluation}: the kernel `auto`
   picks and every backend that can run the inputs, against the fp32 model with the `eager` attention
   reference: the loss and every parameter gradient (training), the logits (evaluation). The yardstick
   is what bf16 costs anyway: the same bf16 model with the `eager` attention. Each row goes to
   $PELAB_GPU_REPORT (JSON lines) when set.
2. `python -m train` for every PE with document masking off and on (compiled blocks, bf16, 8 steps
   with validation at the end, all runs at once beside the tests above): the loss falls and stays
   finite; then `python -m train.eval ... suite=ppl_vs_length` on one run.
Under ten minutes on one H200 with FlashAttention-4 installed is the budget (`bench/gpu_check.sh 1 OUT`
runs this file with a pass/fail table). CI has no GPU: everything here is skipped there.
bench/RESULTS.md records the H200 runs.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

T, B, VOCAB = 4096, 2, 512
EOT = VOCAB - 1


def _pes() -> list[str]:
    from pelab.models.pe import available

    return available()


CASES = [(pe, False) for pe in _pes()] + [("rope", True)]  # (pe, kv_shift)


def _config(pe: str, kv_shift: bool, docs: bool):
    from pelab.models.config import GPTConfig
    from pelab.train.config import compose, to_dict

    cfg = compose([f"pe={pe}", "model=gpt_tiny"])
    m = to_dict(cfg.model)
    m.update(n_layer=1, d_model=256, n_head=2, head_dim=128, mlp_hidden=512, vocab_size=VOCAB, max_seq_len=T)
    m.update(pe=to_dict(cfg.pe), kv_shift=kv_shift, document_mask=docs, eot_id=EOT, attention_backend="eager")
    return GPTConfig.from_dict(m)


def _batch(gen):
    """Token ids with documents of 1 to ~1500 tokens (each opened by EOT), and next-token targets."""
    idx = torch.randint(0, EOT, (B, T + 1), generator=gen)
    for row in range(B):
        pos = 0
        while pos < T:
            idx[row, pos] = EOT
            pos += int(torch.randint(1, 1500, (1,), generator=gen))
    return idx[:, :-1].cuda(), idx[:, 1:].cuda()


def _outputs(model, idx, tgt, mode: str, bf16: bool) -> list[torch.Tensor]:
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
        if mode == "eval":
            with torch.no_grad():
                return [model(idx).float()]
        loss = model.loss(idx, tgt)["loss"]
    params = list(model.parameters())
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return [loss.detach().float(), *(torch.zeros_like(p) if g is None else g.float() for p, g in zip(params, grads))]


def _backends(model, idx, mode: str) -> list[str]:
    """`auto` and every backend that runs layer 0's attention inputs in this mode."""
    from pelab.models.kernels import kernel_names, select_kernel

    attn = model.blocks[0].attn
    docs = model.document_ids(idx)
    x = model.blocks[0].attn_norm(model.embed(idx))
    with torch.autocast("cuda", dtype=torch.bfloat16), torch.set_grad_enabled(mode == "train"):
        q, k, v, bias = attn.project(x, torch.arange(T, device=idx.device), docs)
        qh, kh, vh = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        names = ["auto"]
        for name in kernel_names():
            try:
                select_kernel(qh, kh, vh, bias, name, docs=docs is not None)
            except ValueError:
                continue
            if name != "eager":
                names.append(name)
        return names


def _rel(x, y) -> float:
    return ((x - y).norm() / y.norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("docs", [False, True], ids=["nodocs", "docs"])
@pytest.mark.parametrize("pe,kv_shift", CASES, ids=[p + ("+kvshift" if s else "") for p, s in CASES])
def test_model_attention_paths(pe, kv_shift, docs, mode):
    from pelab.models.gpt import GPT

    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    cfg = _config(pe, kv_shift, docs)
    ref_model = GPT(cfg).cuda()
    with torch.no_grad():  # trained-looking PE parameters: random instead of their (often zero) init
        for name, p in ref_model.named_parameters():
            if ".pe." in name:
                p.add_(0.02 * torch.randn(p.shape, generator=gen).to(p.device))
    idx, tgt = _batch(gen)
    ref = _outputs(ref_model, idx, tgt, mode, bf16=False)
    floor = [_rel(x, y) for x, y in zip(_outputs(ref_model, idx, tgt, mode, bf16=True), ref)]
    failures, report = [], []
    for backend in _backends(ref_model, idx, mode):
        model = GPT(dataclasses.replace(cfg, attention_backend=backend)).cuda()
        model.load_state_dict(ref_model.state_dict())
        got = _outputs(model, idx, tgt, mode, bf16=True)
        errs = [_rel(x, y) for x, y in zip(got, ref)]
        worst = max(range(len(errs)), key=lambda i: errs[i] / (3 * floor[i] + 2e-3))
        finite = all(bool(torch.isfinite(x).all()) for x in got)
        ok = finite and all(e <= 3 * f + 2e-3 for e, f in zip(errs, floor))
        row = {
            "pe": pe + ("+kvshift" if kv_shift else ""),
            "docs": docs,
            "mode": mode,
            "backend": backend,
            "kernel": _kernel_of(model, idx, mode) if backend == "auto" else backend,
            "finite": finite,
            "worst_err": errs[worst],
            "worst_floor": floor[worst],
            "worst_tensor": "loss/logits" if worst == 0 else list(dict(model.named_parameters()))[worst - 1],
            "ok": ok,
        }
        report.append(row)
        if not ok:
            failures.append(row)
        del model
        torch.cuda.empty_cache()
    path = os.environ.get("PELAB_GPU_REPORT")
    if path:
        with open(path, "a") as f:
            for row in report:
                f.write(json.dumps(row) + "\n")
    assert not failures, json.dumps(failures, indent=1)


def _kernel_of(model, idx, mode) -> str:
    from pelab.models.kernels import select_kernel

    attn = model.blocks[0].attn
    docs = model.document_ids(idx)
    with torch.autocast("cuda", dtype=torch.bfloat16), torch.set_grad_enabled(mode == "train"):
        x = model.blocks[0].attn_norm(model.embed(idx))
        q, k, v, bias = attn.project(x, torch.arange(T, device=idx.device), docs)
        return select_kernel(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), bias, docs=docs is not None).name


# ---- the real entry points ---------------------------------------------------------------------------

TRAIN = [
    "model=gpt_tiny",
    "model.n_layer=2",
    "model.d_model=256",
    "model.n_head=2",
    "model.head_dim=128",
    "model.max_seq_len=8192",
    "data=sample",
    "trainer.seq_len=4096",
    "trainer.micro_batch_size=2",
    "trainer.global_batch_tokens=8192",
    "trainer.max_steps=8",
    "trainer.val_every=8",
    "trainer.ckpt_every=8",
    "trainer.log_every=1",
    "optim.warmup_steps=2",
    "optim.lr=3e-3",
    "resume=false",
]


def _start_train_runs(root: Path, names: set[str]) -> dict[str, dict]:
    """Start one `python -m train` per selected PE x document masking ("fox-docs") at once: they compile
    on the CPU cores and share the GPU while the model tests above run (one compile thread each: two
    dozen processes share the cores anyway). {name: {"dir", "proc", "log"}}."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", WANDB_MODE="offline", TORCHINDUCTOR_COMPILE_THREADS="1")
    env.setdefault("OMP_NUM_THREADS", "2")
    data = root / "data"
    if names:
        subprocess.run(
            [sys.executable, "-m", "data.prepare", "data=sample", f"paths.data={data}"], cwd=REPO, env=env, check=True
        )
    runs = {}
    for name in sorted(names):
        pe, _, docs = name.rpartition("-")
        run_dir = root / name
        args = [*TRAIN, f"pe={pe}", f"model.document_mask={str(docs == 'docs').lower()}", f"paths.data={data}"]
        log = root / f"{name}.log"
        with open(log, "w") as f:
            proc = subprocess.Popen(
                [sys.executable, "-m", "train", *args, f"hydra.run.dir={run_dir}"],
                cwd=REPO,
                env=env,
                stdout=f,
                stderr=f,
            )
        runs[name] = {"dir": run_dir, "proc": proc, "log": log}
    return runs


@pytest.fixture(scope="module", autouse=True)
def train_runs(request, tmp_path_factory):
    """The runs the selected entry-point tests read (`-k` may pick a few), started before any test."""
    names = set()
    for item in request.session.items:
        spec = getattr(item, "callspec", None)
        if item.originalname == "test_train_entry_point" and spec is not None:
            names.add(f"{spec.params['pe']}-{'docs' if spec.params['docs'] else 'nodocs'}")
        if item.originalname == "test_eval_entry_point":
            names.add("fox-docs")
    runs = _start_train_runs(tmp_path_factory.mktemp("gpu_train"), names)
    yield runs
    for info in runs.values():
        if info["proc"].poll() is None:
            info["proc"].kill()


def _finished(info: dict) -> int | str:
    try:
        return info["proc"].wait(timeout=600)
    except subprocess.TimeoutExpired:
        return "timeout"


def _losses(run_dir: Path) -> tuple[list[float], list[float]]:
    with open(run_dir / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    train = [float(r["train/loss"]) for r in rows if r.get("train/loss")]
    val = [float(r["val/loss"]) for r in rows if r.get("val/loss")]
    return train, val


@pytest.mark.parametrize("docs", [False, True], ids=["nodocs", "docs"])
@pytest.mark.parametrize("pe", _pes())
def test_train_entry_point(pe, docs, train_runs):
    info = train_runs[f"{pe}-{'docs' if docs else 'nodocs'}"]
    rc = _finished(info)
    tail = info["log"].read_text()[-3000:]
    assert rc == 0, tail
    train, val = _losses(info["dir"])
    summary = json.loads((info["dir"] / "summary.json").read_text())
    kernels = summary.get("attention_kernels")
    row = {"pe": pe, "docs": docs, "first": train[0], "last": train[-1], "val": val, "kernels": kernels}
    path = os.environ.get("PELAB_GPU_REPORT")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps({"entry": "train", **row}) + "\n")
    assert all(math.isfinite(x) for x in train + val), row
    assert val and train[-1] < train[0] - 0.5, row


def test_eval_entry_point(train_runs, tmp_path):
    info = train_runs["fox-docs"]
    assert _finished(info) == 0, info["log"].read_text()[-3000:]
    run_dir = info["dir"]
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "train.eval",
            f"checkpoint={run_dir}",
            "suite=ppl_vs_length",
            "ppl.multiples=[1,2]",
            f"eval.out_dir={tmp_path}",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    doc = json.loads((tmp_path / "eval.json").read_text())
    lengths = doc["suites"]["ppl_vs_length"]["lengths"]
    path = os.environ.get("PELAB_GPU_REPORT")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps({"entry": "eval", "run": "fox-docs", "lengths": lengths}) + "\n")
    assert set(lengths) == {"1x", "2x"} and all(math.isfinite(v["loss"]) for v in lengths.values()), lengths
