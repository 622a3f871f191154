"""Throughput benchmark: real training steps of pelab per (backbone, PE) cell, plus kernel micro-benchmarks.

    python -m bench.bench --models gpt_355m --pes rope,nope,alibi,fox,grape_ap --seq-len 4096 --micro-batch 20 \
        --dense-ref alibi:20,grape_a_qk:4,grape_ap:1 --out bench/out/results.json
    python -m bench.bench --micro --micro-batch 20 --seq-len 4096      # attention kernels alone

Each cell runs in its own process (fresh Dynamo caches, clean peak-memory counters) and trains with the
framework's own step: `train.module.LMModule` under a Lightning `Trainer` (bf16-mixed, torch.compile of
every block, fused AdamW, grad clipping, the fused chunked LM-head cross-entropy), fed by the framework's
sampler (`data.sampler.TrainWindows`) over a synthetic uint16 shard through a DataLoader, as `make train`
does. Per cell: warm-up steps (compilation), timed steps (median), one step with CUDA sync debugging
(counts host syncs), one profiled step (attention-kernel share, top kernels). Also timed separately: one
layer's attention call (fwd+bwd, x n_layer) and the fused cross-entropy (fwd+bwd) at the cell's shapes.
Model, PE and optimizer configs come from the Hydra compose helper (`pelab.train.config.compose`), as
`python -m train model=<m> pe=<p>` would compose them; `--pes all` (the default) is every registered PE.
`--backends auto,fa4,...` adds, per PE, a cell for each listed backend that can run its training step
and differs from `auto`'s choice. `--docs rope,fox,...` (or `pe+docs` in `--pes`) adds a cell with
document masking (`model.document_mask=true`; the synthetic shard holds documents of 1-2048 tokens,
each opened by the end-of-text token), compared with the same PE's cell without it.
`bench/results/latest.json` gets one object per cell (pe, backend, document_mask, tokens_per_s, x_rope
against the same call's RoPE `auto` row, x_no_docs, peak_gib, date, gpu).

Tokens/s = tokens per optimizer step / median step interval (CUDA events between consecutive step
starts, so the optimizer, Lightning and data loading are all inside). MFU uses flops_per_token from
`models.inspect.describe` and 989 TFLOP/s (H100/H200 dense bf16).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

PEAK = 989e12
EOT = 50256  # the GPT-2 end-of-text id: it opens each document of the synthetic shard
ATTN_PATTERNS = [  # (label, regex over CUDA kernel names)
    ("cudnn", r"cudnn.*(sdpa|fmha|flash|fprop|bprop)|sdpa.*cudnn|fort_native_sdpa"),
    ("flash", r"flash_(fwd|bwd)|pytorch_flash|flash::"),
    (
        "mem_efficient",
        r"fmha_cutlass|efficient_attention|mem_eff|attention_kernel_batched|AttentionKernel|AttentionBackwardKernel",
    ),
    ("triton_pelab", r"lowrank_|pathsum_|bwd_delta_kernel"),
    ("flex", r"flex_attention|flex_decoding|triton_tem_fused_flex"),
]


# ---- config through the Hydra compose helper (what `python -m train model=<m> pe=<p>` composes) -----------


def _composed(model: str, pe: str):
    from pelab.train.config import compose

    return compose([f"model={model}", f"pe={pe}"])


def model_config(model: str, pe: str, backend: str, seq_len: int, docs: bool = False, vocab: int = 50257):
    from pelab.models.config import GPTConfig
    from pelab.train.config import to_dict

    cfg = _composed(model, pe)
    m = to_dict(cfg.model)
    m["vocab_size"] = m.get("vocab_size") or vocab
    m["max_seq_len"] = max(int(m.get("max_seq_len") or seq_len), seq_len)
    m["pe"] = to_dict(cfg.pe)
    m["attention_backend"] = backend
    if docs:
        m.update(document_mask=True, eot_id=EOT)
    return GPTConfig.from_dict(m)


def optim_config() -> dict:
    from pelab.train.config import to_dict

    return to_dict(_composed("gpt_tiny", "rope").optim)


def all_pes() -> list[str]:
    from pelab.models.pe import available

    return available()


def applicable_backends(model: str, pe: str, backends: list[str], seq_len: int) -> dict[str, str]:
    """{backend: kernel it runs} for the backends that can run this cell's training-step attention
    (`auto` included, resolved to its kernel), from one layer built on the GPU."""
    import torch
    from pelab.models.attention import CausalSelfAttention
    from pelab.models.kernels import select_kernel

    cfg = model_config(model, pe, "auto", seq_len)
    attn = CausalSelfAttention(cfg, 0).cuda()
    x = torch.randn(1, seq_len, cfg.d_model, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        q, k, v, bias = attn.project(x, torch.arange(seq_len, device="cuda"))
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    out = {}
    for name in backends:
        try:
            out[name] = select_kernel(q, k, v, bias, name).name
        except (ValueError, RuntimeError):
            pass
    return out


# ---- data: the framework's sampler over a synthetic shard --------------------------------------------


def synthetic_tokens(n_tokens: int, vocab: int = 50257, seed: int = 0, max_doc: int = 2048):
    """Random token ids in documents of 1..max_doc tokens, each opened by EOT (the shard format)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, EOT, size=n_tokens, dtype=np.int64)
    starts = np.cumsum(rng.integers(1, max_doc + 1, size=n_tokens // max(1, max_doc // 4)))
    tokens[np.concatenate(([0], starts[starts < n_tokens]))] = EOT
    return tokens.astype(np.uint16)


def write_synthetic_shard(folder: Path, n_tokens: int) -> Path:
    from pelab.data.shards import write_shard

    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "bench_train_000001.bin"
    if not path.exists():
        write_shard(path, synthetic_tokens(n_tokens))
    return path


def make_loader(shard: Path, seq_len: int, micro_batch: int, accum: int, workers: int):
    import torch
    from pelab.data.sampler import TrainWindows, seq_ids_for
    from torch.utils.data import DataLoader, IterableDataset

    windows = TrainWindows([str(shard)], seq_len, seed=0)

    class Steps(IterableDataset):  # data.datamodule.TrainSteps for rank 0 of 1 (no Hydra/omegaconf import)
        def __iter__(self):
            from torch.utils.data import get_worker_info

            info = get_worker_info()
            w, n = (0, 1) if info is None else (info.id, info.num_workers)
            step = w
            while True:
                ids = [seq_ids_for(0, 1, m, micro_batch) for m in range(accum)]
                yield torch.stack([torch.from_numpy(windows.windows(step, i)) for i in ids])
                step += n

    return DataLoader(
        Steps(),
        batch_size=None,
        num_workers=workers,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=workers > 0,
    )


# ---- one cell (runs in its own process) -------------------------------------------------------------


def run_cell(spec: dict) -> dict:
    import lightning as L
    import torch
    from pelab.models.inspect import describe
    from pelab.models.kernels import kernels_used
    from pelab.train.module import LMModule

    cuda = torch.cuda.is_available()
    torch.manual_seed(0)
    if cuda:
        torch.set_float32_matmul_precision("high")
    T, mb, accum = spec["seq_len"], spec["micro_batch"], spec["accum"]
    cfg = model_config(spec["model"], spec["pe"], spec["backend"], T, spec.get("docs", False))
    cell = describe(cfg, T)
    tokens_per_step = mb * T * accum
    warm, steps = spec["warmup"], spec["steps"]
    total = warm + steps + 2  # + sync-check step + profiled step
    module = LMModule(
        cfg,
        optim_config(),
        max_steps=total + 1,
        tokens_per_step=tokens_per_step,
        flops_per_token=cell["flops_per_token"],
        compile=cuda and spec["compile"],
        log_every=10**9,
    )
    if cuda and spec["backend"] in ("auto", "flex"):
        from pelab.models.kernels import flex

        flex.causal_block_mask(T, torch.device("cuda"))  # built once, read by the compiled blocks
    timer = StepTimer(warm, steps, cuda)
    trainer = L.Trainer(
        accelerator="gpu" if cuda else "cpu",
        devices=1,
        precision="bf16-mixed" if cuda else "32-true",
        max_steps=total,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        callbacks=[timer],
    )
    loader = make_loader(Path(spec["shard"]), T, mb, accum, spec["workers"])
    t0 = time.perf_counter()
    trainer.fit(module, train_dataloaders=loader)
    wall = time.perf_counter() - t0
    res = timer.results()
    step_ms = res["step_ms"]
    out = dict(spec)
    out.update(
        {
            "params": cell["total_params"],
            "flops_per_token": cell["flops_per_token"],
            "tokens_per_step": tokens_per_step,
            "step_ms": step_ms,
            "gpu_step_ms": res["gpu_step_ms"],
            "step_ms_all": res["step_ms_all"],
            "tokens_per_s": tokens_per_step / (step_ms / 1e3),
            "mfu": tokens_per_step / (step_ms / 1e3) * cell["flops_per_token"] / PEAK,
            "peak_alloc_gib": res["peak_alloc_gib"],
            "peak_reserved_gib": res["peak_reserved_gib"],
            "warmup_s": res["warmup_s"],
            "wall_s": wall,
            "host_gap_ms": res["host_gap_ms"],
            "host_syncs_in_step": res["syncs"],
            "sync_examples": res["sync_examples"],
            "kernels_used": kernels_used(),
        }
    )
    try:
        from torch._dynamo.utils import counters

        breaks = dict(counters["graph_break"])
        out["graph_breaks"] = sum(breaks.values())
        out["graph_break_reasons"] = [k[:160] for k in list(breaks)[:5]]
    except Exception:  # noqa: BLE001
        pass
    out.update(res["profile"])
    if cuda and spec.get("isolated", True):
        try:
            out.update(
                _isolated_timings(module.model, cfg, mb, T, spec["backend"], accum, step_ms, spec.get("ce", True))
            )
        except Exception as e:  # noqa: BLE001  (never lose the training numbers)
            out["isolated_error"] = f"{type(e).__name__}: {str(e)[:300]}"
    return out


def StepTimer(warm: int, steps: int, cuda: bool):  # noqa: N802  (Lightning callback factory)
    import lightning as L
    import torch

    class _Timer(L.Callback):
        def __init__(self):
            self.starts, self.ends, self.host_start, self.host_end = {}, {}, {}, {}
            self.t_first = time.perf_counter()
            self.warmup_s = None
            self.syncs, self.sync_examples = None, []
            self.prof = None
            self.peak = (None, None)

        def _event(self):
            if not cuda:
                return time.perf_counter()
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            return e

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            i = trainer.global_step
            self.host_start[i] = time.perf_counter()
            if i == warm:
                if cuda:
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                self.warmup_s = time.perf_counter() - self.t_first
            if i == warm + steps and cuda:  # sync-check step (not timed)
                torch.cuda.synchronize()
                self.peak = (torch.cuda.max_memory_allocated() / 2**30, torch.cuda.max_memory_reserved() / 2**30)
                self._wctx = warnings.catch_warnings(record=True)
                self._wlist = self._wctx.__enter__()
                warnings.simplefilter("always")
                torch.cuda.set_sync_debug_mode("warn")
            if i == warm + steps + 1 and cuda:
                from torch.profiler import ProfilerActivity, profile

                self.prof = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA])
                self.prof.__enter__()
                self._prof_t0 = time.perf_counter()
            self.starts[i] = self._event()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            i = trainer.global_step - 1  # global_step already counts this update
            self.ends[i] = self._event()
            self.host_end[i] = time.perf_counter()
            if i == warm + steps and cuda:
                torch.cuda.set_sync_debug_mode(0)
                msgs = [str(w.message) for w in self._wlist if "called a synchronizing" in str(w.message)]
                self._wctx.__exit__(None, None, None)
                self.syncs = len(msgs)
                self.sync_examples = sorted(set(m[:160] for m in msgs))[:5]
            if i == warm + steps + 1 and self.prof is not None:
                torch.cuda.synchronize()
                self.prof_wall_ms = (time.perf_counter() - self._prof_t0) * 1e3
                self.prof.__exit__(None, None, None)

        def results(self) -> dict:
            if cuda:
                torch.cuda.synchronize()
            timed = list(range(warm, warm + steps))
            if cuda:
                iv = [self.starts[i].elapsed_time(self.starts[i + 1]) for i in timed]
                gpu = [self.starts[i].elapsed_time(self.ends[i]) for i in timed]
            else:
                iv = [(self.starts[i + 1] - self.starts[i]) * 1e3 for i in timed]
                gpu = [(self.ends[i] - self.starts[i]) * 1e3 for i in timed]
            gaps = [(self.host_start[i + 1] - self.host_end[i]) * 1e3 for i in timed]
            med = lambda xs: sorted(xs)[len(xs) // 2]  # noqa: E731
            peak = self.peak
            if peak[0] is None and cuda:
                peak = (torch.cuda.max_memory_allocated() / 2**30, torch.cuda.max_memory_reserved() / 2**30)
            return {
                "step_ms": med(iv),
                "step_ms_all": [round(x, 2) for x in iv],
                "gpu_step_ms": med(gpu),
                "host_gap_ms": med(gaps),
                "peak_alloc_gib": peak[0],
                "peak_reserved_gib": peak[1],
                "warmup_s": self.warmup_s,
                "syncs": self.syncs,
                "sync_examples": self.sync_examples,
                "profile": _profile_summary(self.prof, getattr(self, "prof_wall_ms", None)) if self.prof else {},
            }

    return _Timer()


def _profile_summary(prof, wall_ms) -> dict:
    """Attention share of the profiled step's CUDA kernel time, and the top kernels."""
    from torch.autograd import DeviceType

    kernels = {}
    for evt in prof.key_averages():
        if getattr(evt, "device_type", None) != DeviceType.CUDA:
            continue
        t = getattr(evt, "self_device_time_total", None)
        if t is None:
            t = getattr(evt, "self_cuda_time_total", 0.0)
        kernels[evt.key] = kernels.get(evt.key, 0.0) + t / 1e3  # ms
    total = sum(kernels.values())
    by_label = {}
    for name, ms in kernels.items():
        for label, pat in ATTN_PATTERNS:
            if re.search(pat, name):
                by_label[label] = by_label.get(label, 0.0) + ms
                break
    attn = sum(by_label.values())
    top = sorted(kernels.items(), key=lambda kv: -kv[1])[:12]
    return {
        "prof_kernel_ms": total,
        "prof_wall_ms": wall_ms,
        "attn_kernel_ms": attn,
        "attn_share": attn / total if total else None,
        "attn_by_kernel": by_label,
        "top_kernels": [(n[:90], round(ms, 2)) for n, ms in top],
    }


def _time_ms(fn, reps: int = 5) -> float:
    import torch

    fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        ts.append(a.elapsed_time(b))
    return sorted(ts)[len(ts) // 2]


def _isolated_timings(model, cfg, mb: int, T: int, backend: str, accum: int, step_ms: float, ce: bool = True) -> dict:
    """One layer's attention call (fwd+bwd, the inputs its PE really produces) x n_layer, and the fused
    LM-head cross-entropy (fwd+bwd) per micro-batch; shares of the step."""
    import torch
    from pelab.models.kernels import attend, select_kernel
    from pelab.models.kernels.bias import LowRankBias, PathSumBias
    from pelab.models.loss import linear_cross_entropy

    out = {}
    dev = torch.device("cuda")
    model.cuda()  # Lightning's teardown moved it back to the CPU
    attn = model.blocks[0].attn
    x = torch.randn(mb, T, cfg.d_model, device=dev) * 0.5
    pos = torch.arange(T, device=dev)
    ids = torch.from_numpy(synthetic_tokens(mb * T, seed=1).astype("int64")).view(mb, T).to(dev)
    doc = model.document_ids(ids)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        q, k, v, bias = attn.project(x, pos, doc)
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    leaves = [q, k, v]
    if isinstance(bias, LowRankBias):
        a = bias.q_terms.detach().clone().requires_grad_(bias.q_terms.requires_grad)
        b = bias.k_terms.detach().clone().requires_grad_(bias.k_terms.requires_grad)
        bias = LowRankBias(a, b)
        leaves += [t for t in (a, b) if t.requires_grad]
    elif isinstance(bias, PathSumBias):
        qp, kp = bias.q_probe.detach().clone().requires_grad_(), bias.k_probe.detach().clone().requires_grad_()
        alpha = bias.alpha.detach().clone().requires_grad_(bias.alpha.requires_grad)
        bias = PathSumBias(qp, kp, alpha, bias.scale)
        leaves += [t for t in (qp, kp, alpha) if t.requires_grad]
    qh, kh, vh = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    name = select_kernel(qh, kh, vh, bias, backend, docs=doc is not None).name
    do = torch.randn_like(q)

    def fb():
        for t in leaves:
            t.grad = None
        attend(q, k, v, bias, backend=backend, doc_ids=doc).backward(do)

    try:
        ms = _time_ms(fb)
        out.update(
            {
                "attn_isolated_kernel": name,
                "attn_layer_fb_ms": ms,
                "attn_isolated_share": ms * cfg.n_layer * accum / step_ms,
            }
        )
    except Exception as e:  # noqa: BLE001
        out["attn_isolated_error"] = f"{type(e).__name__}: {e}"[:300]
    q = k = v = bias = leaves = do = None  # free the timing inputs before the next measurement
    torch.cuda.empty_cache()
    if not ce:
        return out
    h = (torch.randn(mb * T, cfg.d_model, device=dev) * 0.5).bfloat16().requires_grad_()
    w = model.head_weight
    tgt = torch.randint(0, cfg.vocab_size, (mb * T,), device=dev)

    def ce():
        h.grad = None
        loss, _, _ = linear_cross_entropy(h, w, tgt, cfg.loss_chunk_rows)
        loss.backward()

    try:
        ms = _time_ms(ce)
        out.update({"ce_fb_ms": ms, "ce_share": ms * accum / step_ms})
    except Exception as e:  # noqa: BLE001
        out["ce_error"] = f"{type(e).__name__}: {e}"[:300]
    w.grad = None
    return out


# ---- kernel micro-benchmark ---------------------------------------------------------------------------


def micro(args) -> list[dict]:
    """fwd+bwd of one attention call at the training shape for every bias kind and backend."""
    import torch
    from pelab.models.kernels import attend, triton_lowrank, triton_pathsum
    from pelab.models.kernels.testing import leaf_bias
    from triton.testing import do_bench

    dev = torch.device("cuda")
    B, T, H, D = args.micro_batch, args.seq_len, args.heads, args.head_dim
    g = torch.Generator(device=dev).manual_seed(0)
    rows = []

    def bench(kind, backend, Bx, note=""):
        q, k, v = (
            torch.randn(Bx, T, H, D, device=dev, generator=g, dtype=torch.bfloat16).requires_grad_() for _ in range(3)
        )
        bias, leaves = (None, []) if kind == "causal" else leaf_bias(kind, Bx, H, T, dev, g)
        do = torch.randn_like(q)
        ins = [q, k, v] + leaves

        def fb():
            for t in ins:
                t.grad = None
            attend(q, k, v, bias, backend=backend).backward(do)

        def fwd():
            with torch.no_grad():
                attend(q, k, v, bias, backend=backend)

        try:
            fb()
            ms_fb = do_bench(fb, warmup=25, rep=100, return_mode="median") * B / Bx
            ms_f = do_bench(fwd, warmup=25, rep=100, return_mode="median") * B / Bx
            row = {"kind": kind, "backend": backend, "B": B, "fwd_ms": ms_f, "fwd_bwd_ms": ms_fb, "note": note}
        except Exception as e:  # noqa: BLE001
            row = {
                "kind": kind,
                "backend": backend,
                "B": B,
                "error": f"{type(e).__name__}: {str(e)[:200]}",
                "note": note,
            }
        torch.cuda.empty_cache()
        rows.append(row)
        print(json.dumps(row), flush=True)
        if args.micro_log:
            with open(args.micro_log, "a") as f:
                f.write(json.dumps(row) + "\n")
        return row

    base = bench("causal", "cudnn", B)
    backends = args.micro_backends.split(",")
    if "fa4" in backends:
        bench("causal", "fa4", B)
    kinds = args.micro_kinds.split(",")
    for kind in kinds:
        for backend in backends:
            if backend == "flex" and kind == "grape_ap":
                continue
            if backend == "fa4" and kind in ("grape_a_k", "grape_a_qk", "grape_ap"):
                continue  # fa4 does not take their key-side gradients (models/kernels/fa4.py)
            bench(kind, backend, B)
        if args.micro_dense and kind in ("alibi", "grape_a_qk", "grape_ap"):
            bench(kind, "sdpa_dense_bias", 1, "timed at B=1, scaled to B")
    # launch-config sweep of the triton kernels (one kernel's config varied at a time)
    for mod, kind, sweep in ((triton_lowrank, "fox", LOWRANK_SWEEP), (triton_pathsum, "grape_ap", PATHSUM_SWEEP)):
        if kind not in kinds or not args.sweep:
            continue
        for which, cfgs in sweep.items():
            keep = mod.CONFIGS[which][D]
            for c in cfgs:
                mod.CONFIGS[which][D] = c
                r = bench(kind, "triton", B, f"{which}={c}")
                r["sweep"] = which
            mod.CONFIGS[which][D] = keep
    for r in rows:
        if "fwd_bwd_ms" in r:
            r["x_cudnn"] = r["fwd_bwd_ms"] / base["fwd_bwd_ms"]
    return rows


def micro_ce(args) -> list[dict]:
    """fwd+bwd of the LM head + cross-entropy at (micro_batch * seq_len) rows: the trainer's fused
    chunked path (models.loss, chunk 8192) vs plain full logits (chunk 0); losses and gradients compared."""
    import torch
    from pelab.models.loss import linear_cross_entropy

    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(0)
    n, C, V = args.micro_batch * args.seq_len, args.ce_dim, 50304
    h = (torch.randn(n, C, device=dev, generator=g) * 0.5).bfloat16().requires_grad_()
    w = (torch.randn(V, C, device=dev, generator=g) * 0.02).requires_grad_()
    t = torch.randint(0, 50257, (n,), device=dev, generator=g)
    rows, grads = [], {}
    for name, chunk in (("plain", 0), ("fused", 8192)):

        def step():
            h.grad = w.grad = None
            loss, _, _ = linear_cross_entropy(h, w, t, chunk)
            loss.backward()
            return loss

        try:
            loss = step()
            grads[name] = (loss.item(), h.grad.float().clone(), w.grad.float().clone())
            torch.cuda.reset_peak_memory_stats()
            base_mem = torch.cuda.memory_allocated()
            ms = _time_ms(step, reps=5)
            row = {
                "ce": name,
                "rows": n,
                "fwd_bwd_ms": ms,
                "extra_peak_gib": (torch.cuda.max_memory_allocated() - base_mem) / 2**30,
                "loss": grads[name][0],
            }
        except Exception as e:  # noqa: BLE001
            row = {"ce": name, "error": f"{type(e).__name__}: {str(e)[:300]}"}
        rows.append(row)
        print(json.dumps(row), flush=True)
    if len(grads) == 2:
        a, b = grads["plain"], grads["fused"]
        rel = lambda x, y: ((x - y).norm() / y.norm()).item()  # noqa: E731
        print(
            json.dumps({"loss_diff": abs(a[0] - b[0]), "dh_rel": rel(b[1], a[1]), "dw_rel": rel(b[2], a[2])}),
            flush=True,
        )
    return rows


LOWRANK_SWEEP = {  # one kernel's config varied at a time (bench/NOTES.md)
    "dq": [(128, 64, 4, 2), (64, 64, 4, 2), (128, 32, 8, 2), (128, 64, 8, 3)],
    "fwd": [(128, 64, 8, 2), (64, 64, 4, 3), (128, 32, 4, 3)],
    "dkdv": [(64, 128, 8, 3), (64, 64, 4, 2)],
}
PATHSUM_SWEEP = {  # BLOCK_M a multiple of BLOCK_N; bench.pathsum also checks each variant's accuracy
    "fwd": [(128, 64, 8, 2), (128, 32, 8, 2), (64, 32, 4, 2)],
    "bwd": [(128, 32, 8, 2), (128, 32, 8, 1), (64, 32, 4, 2)],
}


# ---- driver -------------------------------------------------------------------------------------------


def _fmt(x, spec):
    return "-" if x is None else format(x, spec)


def _cell_key(r: dict) -> tuple:
    return r["model"], r["pe"], r["backend"], r["micro_batch"], bool(r.get("docs"))


def _measured(rows: list[dict]) -> dict[tuple, dict]:
    return {_cell_key(r) + (r["seq_len"],): r for r in rows if "tokens_per_s" in r}


def rope_row(rows: list[dict], r: dict) -> dict | None:
    """The RoPE `auto` cell (no document masking) of r's model and length, at r's micro-batch if
    measured: the x RoPE yardstick."""
    refs = [
        x
        for k, x in _measured(rows).items()
        if k[:3] == (r["model"], "rope", "auto") and k[4:] == (False, r["seq_len"])
    ]
    return min(refs, key=lambda x: x["micro_batch"] != r["micro_batch"], default=None)


def no_docs_row(rows: list[dict], r: dict) -> dict | None:
    """The cell r without document masking (None for a cell without it)."""
    if not r.get("docs"):
        return None
    return _measured(rows).get(_cell_key(r)[:4] + (False, r["seq_len"]))


def _pe_label(r: dict) -> str:
    return r["pe"] + ("+docs" if r.get("docs") else "")


def _kernels(r: dict) -> str:
    return ",".join(sorted(set(r.get("kernels_used", {}).values()))) or r.get("attn_isolated_kernel", "?")


def table(rows: list[dict]) -> str:
    hdr = (
        f"{'model':<9} {'pe':<11} {'backend':<15} {'mb':>3} {'tok/s':>9} {'MFU':>6} {'step ms':>8} {'peak GiB':>8} "
        f"{'attn%':>6} {'CE%':>5} {'x tok/s':>7} {'x mem':>6} {'syncs':>5}  kernel"
    )
    lines = [hdr, "-" * len(hdr)]
    ce_ms = {(r["model"], r["micro_batch"], r["seq_len"]): r["ce_fb_ms"] for r in rows if "ce_fb_ms" in r}
    for r in rows:
        ce = ce_ms.get((r["model"], r["micro_batch"], r["seq_len"]))
        if ce is not None and "step_ms" in r and r.get("step_ms"):
            r["ce_share"] = ce * r.get("accum", 1) / r["step_ms"]
        if "tokens_per_s" not in r:
            lines.append(
                f"{r['model']:<9} {_pe_label(r):<11} {r['backend']:<15} {r['micro_batch']:>3}  FAILED: "
                f"{r.get('error', '?')[:100]}"
            )
            continue
        base = rope_row(rows, r)
        xt = r["tokens_per_s"] / base["tokens_per_s"] if base else None
        xm = r["peak_alloc_gib"] / base["peak_alloc_gib"] if base and r.get("peak_alloc_gib") else None
        share = r.get("attn_share") if r.get("attn_share") else r.get("attn_isolated_share")
        kern = _kernels(r)
        lines.append(
            f"{r['model']:<9} {_pe_label(r):<11} {r['backend']:<15} {r['micro_batch']:>3} {r['tokens_per_s']:>9,.0f} "
            f"{100 * r['mfu']:>5.1f}% {r['step_ms']:>8.1f} {_fmt(r.get('peak_alloc_gib'), '8.1f')} "
            f"{_fmt(None if share is None else 100 * share, '5.1f')}% "
            f"{_fmt(None if r.get('ce_share') is None else 100 * r['ce_share'], '4.1f')}% "
            f"{_fmt(xt, '7.3f')} {_fmt(xm, '6.2f')} {_fmt(r.get('host_syncs_in_step'), '5d')}  {kern}"
        )
    for r in rows:
        plain = no_docs_row(rows, r)
        if plain and "tokens_per_s" in r:
            mem = (
                r.get("peak_alloc_gib")
                and plain.get("peak_alloc_gib")
                and r["peak_alloc_gib"] / plain["peak_alloc_gib"]
            )
            lines.append(
                f"document masking, {r['pe']} {r['backend']} ({_kernels(r)} vs {_kernels(plain)}): "
                f"{r['tokens_per_s'] / plain['tokens_per_s']:.3f}x tokens/s, "
                f"{_fmt(mem or None, '.2f')}x peak memory of the same cell without it"
            )
    dense = [r for r in rows if r.get("backend") == "sdpa_dense_bias" and "tokens_per_s" in r]
    for d in dense:
        ours = next(
            (
                r
                for r in rows
                if r["pe"] == d["pe"]
                and r["backend"] == "auto"
                and r["model"] == d["model"]
                and not r.get("docs")
                and "tokens_per_s" in r
            ),
            None,
        )
        if ours:
            lines.append(
                f"speed-up vs the official dense-bias approach ({d['pe']}, mb {d['micro_batch']} vs "
                f"{ours['micro_batch']}): {ours['tokens_per_s'] / d['tokens_per_s']:.2f}x tokens/s, "
                f"peak memory {_fmt(d.get('peak_alloc_gib'), '.1f')} vs {_fmt(ours.get('peak_alloc_gib'), '.1f')} GiB"
            )
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="gpt_355m")
    ap.add_argument(
        "--pes",
        default="all",
        help="comma list, or all (the registry); pe@backend[:mb] forces a cell's backend, pe+docs masks documents",
    )
    ap.add_argument(
        "--backends",
        default="auto",
        help="per PE, a cell for each of these backends that runs its training step (beside auto's choice)",
    )
    ap.add_argument("--docs", default="", help="PEs (comma list or all) that also get a document-masked auto cell")
    ap.add_argument("--latest", default="bench/results/latest.json", help="one JSON object per cell ('' to skip)")
    ap.add_argument("--seq-len", type=int, default=4096)
    ap.add_argument("--micro-batch", type=int, default=20)
    ap.add_argument("--accum", type=int, default=1, help="micro-batches per optimizer step")
    ap.add_argument("--backend", default="auto", help="attention backend for every cell (auto: the registry's choice)")
    ap.add_argument(
        "--dense-ref",
        default="",
        help="PE:micro_batch list run with backend sdpa_dense_bias, e.g. alibi:20,grape_a_qk:4,grape_ap:1",
    )
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--workers", type=int, default=2, help="DataLoader workers")
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--no-isolated", action="store_true", help="skip the separate attention / CE timings per cell")
    ap.add_argument("--cell-timeout", type=int, default=420)
    ap.add_argument("--out", default="bench/out/results.json")
    ap.add_argument("--previous", default="", help="JSON of earlier rows to include (cells already there are skipped)")
    ap.add_argument("--micro", action="store_true", help="attention-kernel micro-benchmark instead of training cells")
    ap.add_argument("--micro-kinds", default="alibi,fox,grape_a_q,grape_a_k,grape_a_qk,grape_ap")
    ap.add_argument("--micro-dense", action="store_true")
    ap.add_argument("--micro-backends", default="triton,flex,fa4", help="with --micro: backends per bias kind")
    ap.add_argument("--micro-log", default="", help="with --micro: append each row to this JSON-lines file")
    ap.add_argument("--micro-ce", action="store_true", help="time the fused LM-head cross-entropy variants")
    ap.add_argument("--sweep", action="store_true", help="with --micro: sweep the triton launch configs")
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--ce-dim", type=int, default=1024)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--report", default="", help="print the table of a results JSON written by an earlier run")
    ap.add_argument("--cell", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.cell:
        spec = json.loads(args.cell)
        try:
            res = run_cell(spec)
        except Exception as e:  # noqa: BLE001
            import traceback

            traceback.print_exc()
            res = dict(spec, error=f"{type(e).__name__}: {str(e)[:400]}")
        Path(spec["result"]).write_text(json.dumps(res, default=str))
        return

    if args.report:
        print(table(json.loads(Path(args.report).read_text())))
        return
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if args.micro_ce:
        rows = micro_ce(args)
        out.write_text(json.dumps(rows, indent=1))
        return
    if args.micro:
        rows = micro(args)
        out.write_text(json.dumps(rows, indent=1))
        print(f"\n{'kind':<11} {'backend':<16} {'fwd ms':>8} {'fwd+bwd ms':>11} {'x cudnn':>8}  note")
        for r in rows:
            print(
                f"{r['kind']:<11} {r['backend']:<16} {_fmt(r.get('fwd_ms'), '8.3f')} "
                f"{_fmt(r.get('fwd_bwd_ms'), '11.3f')} "
                f"{_fmt(r.get('x_cudnn'), '8.2f')}  {r.get('note', '')} {r.get('error', '')}"
            )
        return

    rows = json.loads(Path(args.previous).read_text()) if args.previous else []
    done = {_cell_key(r) for r in rows if "tokens_per_s" in r}
    pes = ",".join(all_pes()) if args.pes == "all" else args.pes
    with_docs = set(all_pes() if args.docs == "all" else filter(None, args.docs.split(",")))
    extra = [b for b in args.backends.split(",") if b and b != "auto"]
    cells = []  # (model, pe, backend, micro-batch, document masking)
    for m in args.models.split(","):
        for p in filter(None, pes.split(",")):
            name, _, rest = p.partition("@")
            pe, _, flag = name.partition("+")
            if flag not in ("", "docs"):
                raise SystemExit(f"--pes: {p!r}: the only suffix is +docs (document masking)")
            backend, _, mb = rest.partition(":")
            cells.append((m, pe, backend or args.backend, int(mb or args.micro_batch), flag == "docs"))
            if pe in with_docs and not flag and not backend:
                cells.append((m, pe, args.backend, args.micro_batch, True))
            if extra and not backend and not flag:
                runs = applicable_backends(m, pe, ["auto", *extra], args.seq_len)
                for b in extra:  # a second cell only where the backend is not already auto's kernel
                    if b in runs and runs[b] != runs.get("auto"):
                        cells.append((m, pe, b, args.micro_batch, False))
    for item in filter(None, args.dense_ref.split(",")):
        pe, _, mb = item.partition(":")
        cells.append((args.models.split(",")[0], pe, "sdpa_dense_bias", int(mb or args.micro_batch), False))
    tmp = Path(tempfile.mkdtemp(prefix="pelab_bench_"))
    need = max(c[3] for c in cells) * (args.seq_len + 1) * args.accum * 8 if cells else 0
    shard = write_synthetic_shard(tmp, max(8_000_000, need))
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    for model, pe, backend, mb, docs in cells:
        if (model, pe, backend, mb, docs) in done:
            continue
        spec = {
            "model": model,
            "pe": pe,
            "backend": backend,
            "micro_batch": mb,
            "docs": docs,
            "seq_len": args.seq_len,
            "accum": args.accum,
            "warmup": args.warmup,
            "steps": args.steps,
            "workers": args.workers,
            "compile": not args.no_compile,
            "shard": str(shard),
            "result": str(tmp / f"{model}-{pe}{'+docs' if docs else ''}-{backend}-{mb}.json"),
            "ce": not any("ce_fb_ms" in r for r in rows),
            "isolated": not args.no_isolated,
        }
        t0 = time.time()
        log = open(out.parent / "cells_detail.log", "a")
        log.write(f"\n===== {model} {pe}{' +docs' if docs else ''} {backend} mb{mb} =====\n")
        log.flush()
        try:
            subprocess.run(
                [sys.executable, "-m", "bench.bench", "--cell", json.dumps(spec)],
                cwd=ROOT,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                timeout=args.cell_timeout,
                check=False,
            )
            res = json.loads(Path(spec["result"]).read_text())
        except subprocess.TimeoutExpired:
            res = dict(spec, error=f"timed out after {args.cell_timeout}s")
        except (FileNotFoundError, json.JSONDecodeError) as e:
            res = dict(spec, error=f"no result ({type(e).__name__}); see {log.name}")
        log.close()
        res["cell_wall_s"] = time.time() - t0
        rows.append(res)
        out.write_text(json.dumps(rows, indent=1, default=str))
        brief = {
            k: res.get(k)
            for k in (
                "model",
                "pe",
                "docs",
                "backend",
                "micro_batch",
                "tokens_per_s",
                "mfu",
                "step_ms",
                "peak_alloc_gib",
                "attn_share",
                "kernels_used",
                "error",
                "cell_wall_s",
            )
        }
        print(json.dumps(brief, default=str), flush=True)
    print()
    print(table(rows))
    if args.latest:
        write_latest(rows, Path(args.latest))


def write_latest(rows: list[dict], path: Path) -> None:
    """One object per measured cell: pe, backend (the kernel that ran), document masking, tokens/s,
    x RoPE, x the same cell without document masking, peak GiB."""
    import datetime

    import torch

    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    date = datetime.date.today().isoformat()
    out = []
    for r in rows:
        if "tokens_per_s" not in r:
            continue
        base, plain = rope_row(rows, r), no_docs_row(rows, r)
        out.append(
            {
                "model": r["model"],
                "pe": r["pe"],
                "backend": r["backend"] if r["backend"] != "auto" else f"auto ({_kernels(r)})",
                "document_mask": bool(r.get("docs")),
                "micro_batch": r["micro_batch"],
                "seq_len": r["seq_len"],
                "tokens_per_s": round(r["tokens_per_s"], 1),
                "x_rope": None if base is None else round(r["tokens_per_s"] / base["tokens_per_s"], 4),
                "x_no_docs": None if plain is None else round(r["tokens_per_s"] / plain["tokens_per_s"], 4),
                "peak_gib": None if r.get("peak_alloc_gib") is None else round(r["peak_alloc_gib"], 2),
                "attn_share": r.get("attn_share"),
                "date": date,
                "gpu": gpu,
            }
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
