"""GRAPE-AP path-sum attention kernels on one GPU: every launch variant checked against the fp32
reference, then timed at the training shape, in one process (bench/NOTES.md records the results).

    python -m bench.pathsum --out bench/out/pathsum.json --best bench/out/pathsum_best.json
    python -m bench.pathsum --precompile I/N     # compile every N-th variant (run N of these in parallel first)

Correctness, per variant and input set (fresh random inputs per set): bf16 q/k/v at T=4096, D=128,
probes at the init scale and at 4x that (|z| ~ 1.4), alpha with a gradient, documents and a ragged T
in one set; every buffer the op allocates is filled with NaN first. Each output (o, dq, dk, dv, dqp,
dkp, dalpha) is compared with the fp32 eager reference by relative L2 error; the yardstick is the bf16
floor (the same reference fed bf16-rounded q/k/v, and plain bf16 SDPA's own error for o/dq/dk/dv):
pass = all finite and err < 3 floor + 2e-3 everywhere.
Timing: B20 H8 T4096 D128 bf16 (gpt_355m's attention), q/k/v and probes as leaves, alpha fixed (as in
training), `triton.testing.do_bench` medians; cuDNN causal attention of the same shape as yardstick.
`--best` writes the fastest passing variant as PELAB_TRITON_CONFIGS JSON.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from contextlib import contextmanager
from pathlib import Path

# (name, fwd config, bwd config, TMA reductions); "default" = the configs in models/kernels/triton_pathsum.py.
# The others are what the 2026-12-03 H200 sweep compared (bench/NOTES.md; "default" was then
# fwd (128, 64, 8, 2) + bwd (128, 32, 8, 2)).
VARIANTS = [
    ("default", None, None, True),
    ("fwd_128x64_8w", (128, 64, 8, 2), None, True),
    ("fwd_128x32_8w", (128, 32, 8, 2), None, True),
    ("bwd_128x32_8w", None, (128, 32, 8, 2), True),
    ("bwd_128x32_1st", None, (128, 32, 8, 1), True),
    ("bwd_64x32_4w", None, (64, 32, 4, 2), True),
    ("bwd_128x32_atom", None, (128, 32, 8, 2), False),
    ("bwd_atomics", None, None, False),
]
NAMES = ["out", "dq", "dk", "dv", "dqp", "dkp", "dalpha"]


@contextmanager
def variant(fwd, bwd, tma, D=128):
    from pelab.models.kernels import triton_pathsum as tp

    keep = (tp.CONFIGS["fwd"][D], tp.CONFIGS["bwd"][D], tp.TMA_REDUCE[0])
    tp.CONFIGS["fwd"][D], tp.CONFIGS["bwd"][D], tp.TMA_REDUCE[0] = fwd or keep[0], bwd or keep[1], tma
    try:
        yield {"fwd": tp.CONFIGS["fwd"][D], "bwd": tp.CONFIGS["bwd"][D], "TMA_REDUCE": tma}
    finally:
        tp.CONFIGS["fwd"][D], tp.CONFIGS["bwd"][D], tp.TMA_REDUCE[0] = keep


@contextmanager
def poisoned_outputs():
    """Every float buffer the path-sum ops allocate uninitialised starts as NaN (zeros stay zeros)."""
    import torch
    from pelab.models.kernels import triton_pathsum as tp

    def nan(t):
        return t.fill_(float("nan")) if t.is_floating_point() else t

    class PoisonTorch:
        def __getattr__(self, name):
            return getattr(torch, name)

        @staticmethod
        def empty(*a, **k):
            return nan(torch.empty(*a, **k))

        @staticmethod
        def empty_like(*a, **k):
            return nan(torch.empty_like(*a, **k))

    real = (tp.torch, tp._empty_bhtd)
    tp.torch, tp._empty_bhtd = PoisonTorch(), lambda *a: nan(real[1](*a))
    try:
        yield
    finally:
        tp.torch, tp._empty_bhtd = real


def _rel(x, y) -> float:
    return ((x.float() - y.float()).norm() / y.float().norm().clamp_min(1e-30)).item()


DEVICE = ["cuda"]  # "cpu" for a dry run of this script under the Triton interpreter (--dry-run)


def make_set(seed, B, H, Hkv, T, probe_scale, docs):
    """Fresh inputs: fp32 q/k/v/dO, fp32 probes as the PE makes them (raw query probe, RMS-normalised
    key probe), ALiBi slopes as alpha (with a gradient), optional document ids."""
    import torch
    import torch.nn.functional as F
    from pelab.models.kernels.bias import PathSumBias

    dev = torch.device(DEVICE[0])
    g = torch.Generator(device=dev).manual_seed(seed)
    D, P = 128, 8
    f32 = dict(device=dev, dtype=torch.float32)
    q = torch.randn(B, T, H, D, generator=g, **f32)
    k, v = (torch.randn(B, T, Hkv, D, generator=g, **f32) for _ in range(2))
    do = torch.randn(B, T, H, D, generator=g, **f32)
    qp = torch.randn(B, H, T, P, generator=g, **f32) * probe_scale
    kp = F.rms_norm(torch.randn(B, H, T, P, generator=g, **f32), (P,))
    alpha = torch.tensor([2 ** (-8 * (h + 1) / H) for h in range(H)], **f32)
    doc = None
    if docs:
        cuts = sorted(torch.randint(1, T, (B, 5), generator=g, device=dev).tolist()[0])
        doc = torch.zeros(B, T, dtype=torch.int32, device=dev)
        for c in cuts:
            doc[:, c:] += 1
    return dict(q=q, k=k, v=v, do=do, qp=qp, kp=kp, alpha=alpha, doc=doc, bias_cls=PathSumBias, P=P)


def run_grads(s, dtype, backend, with_bias=True, alpha_grad=True):
    """[out, dq, dk, dv, (dqp, dkp, dalpha)] of attend(...) on the set's inputs cast to dtype."""
    import torch
    from pelab.models.kernels import attend

    ins = [s[n].detach().to(dtype).requires_grad_() for n in ("q", "k", "v")]
    leaves = list(ins)
    bias = None
    if with_bias:
        qp, kp = (s[n].detach().clone().requires_grad_() for n in ("qp", "kp"))
        al = s["alpha"].detach().clone().requires_grad_(alpha_grad)
        bias = s["bias_cls"](qp, kp, al, 1.0 / s["P"])
        leaves += [qp, kp] + ([al] if alpha_grad else [])
    out = attend(*ins, bias, backend=backend, doc_ids=s["doc"] if with_bias else None)
    grads = torch.autograd.grad(out, leaves, s["do"].to(dtype))
    return [out.detach(), *grads]


def references(s):
    import torch

    ref = run_grads(s, torch.float32, "eager")
    s_r = dict(s, **{n: s[n].bfloat16().float() for n in ("q", "k", "v")})
    rounded = run_grads(s_r, torch.float32, "eager")
    floors = {n: _rel(x, y) for n, x, y in zip(NAMES, rounded, ref)}
    if s["doc"] is None:  # plain bf16 flash attention's own error for out/dq/dk/dv
        base = run_grads(s, torch.bfloat16, "sdpa_flash" if DEVICE[0] == "cuda" else "sdpa", with_bias=False)
        bref = run_grads(s, torch.float32, "eager", with_bias=False)
        for n, x, y in zip(NAMES, base, bref):
            floors[n] = max(floors[n], _rel(x, y))
    return ref, floors


def check(s, ref, floors) -> dict:
    import torch

    with poisoned_outputs():
        got = run_grads(s, torch.bfloat16 if DEVICE[0] == "cuda" else torch.float32, "triton")
    rep = {"finite": all(bool(torch.isfinite(x).all()) for x in got)}
    ok = rep["finite"]
    for n, x, y in zip(NAMES, got, ref):
        err = _rel(x, y) if x.shape == y.shape else float("inf")
        rep[n] = {"err": err, "floor": floors[n]}
        ok = ok and err < 3 * floors[n] + 2e-3
    rep["pass"] = bool(ok)
    return rep


def timing(B, H, T, D, reps=200) -> dict:
    import torch
    from pelab.models.kernels import attend
    from pelab.models.kernels.testing import leaf_bias
    from triton.testing import do_bench

    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(7)
    q, k, v = (torch.randn(B, T, H, D, device=dev, generator=g, dtype=torch.bfloat16).requires_grad_() for _ in "qkv")
    do = torch.randn_like(q)
    out = {}
    for name, (bias, leaves), backend in (
        ("pathsum", leaf_bias("grape_ap", B, H, T, dev, g), "triton"),
        ("cudnn", (None, []), "cudnn"),
    ):
        ins = [q, k, v, *leaves]

        def fb():
            for t in ins:
                t.grad = None
            attend(q, k, v, bias, backend=backend).backward(do)

        def fwd():
            with torch.no_grad():
                attend(q, k, v, bias, backend=backend)

        fb()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fb()
        peak = torch.cuda.max_memory_allocated() - base
        out[name] = {
            "fwd_ms": do_bench(fwd, warmup=25, rep=reps, return_mode="median"),
            "fwd_bwd_ms": do_bench(fb, warmup=25, rep=reps, return_mode="median"),
            "fb_peak_extra_gib": peak / 2**30,
        }
        if name == "pathsum":
            out[name]["fwd_bwd_ms_again"] = do_bench(fb, warmup=25, rep=reps, return_mode="median")
    return out


def flops_per_layer(B, H, T, D) -> float:
    """Causal fwd+bwd work of plain attention (2 + 5 products of T x T x D), for TFLOP/s."""
    return 7 * 2 * B * H * T * T / 2 * D


def precompile(part: str) -> None:
    """Compile every n-th variant (alpha with and without a gradient: two backward specialisations)."""
    import torch

    i, n = (int(x) for x in part.split("/"))
    sets = [make_set(1, 1, 2, 2, 4096, 1.0, False)]
    if i == 0:  # the document / ragged-T specialisations of the default variant
        sets.append(make_set(2, 1, 2, 1, 4000, 1.0, True))
    for vi, (name, fwd, bwd, tma) in enumerate(VARIANTS):
        if vi % n != i:
            continue
        with variant(fwd, bwd, tma):
            for s in sets if vi == 0 else sets[:1]:
                t0 = time.time()
                for alpha_grad in (True, False):
                    run_grads(s, torch.bfloat16, "triton", alpha_grad=alpha_grad)
                torch.cuda.synchronize()
                print(f"precompiled {name} T={s['q'].shape[1]} in {time.time() - t0:.1f}s", flush=True)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="bench/out/pathsum.json")
    ap.add_argument("--best", default="", help="write the fastest passing variant here (PELAB_TRITON_CONFIGS JSON)")
    ap.add_argument("--variants", default="", help="comma list of variant names (default: all)")
    ap.add_argument("--precompile", default="", help="I/N: only compile every N-th variant, starting at I")
    ap.add_argument("--batch", type=int, default=20)
    ap.add_argument("--report", default="", help="print the table of a JSON written by an earlier run")
    ap.add_argument("--dry-run", action="store_true", help="CPU, Triton interpreter, tiny T: checks this script")
    args = ap.parse_args(argv)
    if args.report:
        print(table(json.loads(Path(args.report).read_text())))
        return
    if args.dry_run:
        from pelab.models.kernels import triton_lowrank

        DEVICE[0] = "cpu"
        triton_lowrank.ALLOW_CPU_INTERPRET[0] = True
    if args.precompile:
        precompile(args.precompile)
        return
    import torch

    chosen = [v for v in VARIANTS if not args.variants or v[0] in args.variants.split(",")]
    # input sets: (seed, B, Hq, Hkv, T, probe scale, documents)
    specs = [(11, 1, 4, 4, 4096, 1.0, False), (12, 2, 4, 2, 4096, 4.0, False), (13, 2, 2, 1, 4000, 1.0, True)]
    if args.dry_run:
        specs = [(11, 1, 2, 2, 64, 1.0, False), (12, 1, 2, 1, 64, 4.0, False), (13, 2, 2, 1, 50, 1.0, True)]
    rows = []
    t0 = time.time()
    for si, spec in enumerate(specs):
        s = make_set(*spec)
        ref, floors = references(s)
        for name, fwd, bwd, tma in chosen:
            if spec[-1] and name != "default":
                continue  # documents / ragged T: the default variant only
            with variant(fwd, bwd, tma) as cfg:
                try:
                    rep = check(s, ref, floors)
                except Exception as e:  # noqa: BLE001
                    rep = {"pass": False, "error": f"{type(e).__name__}: {str(e)[:300]}"}
            rows.append({"variant": name, "set": si, "spec": spec, "config": cfg, **rep})
            print(json.dumps(rows[-1]), flush=True)
            if "illegal" in rep.get("error", ""):
                raise SystemExit("CUDA context lost")
        del s, ref
        if DEVICE[0] == "cuda":
            torch.cuda.empty_cache()
    print(f"checks done in {time.time() - t0:.0f}s", flush=True)
    timings = {}
    if args.dry_run:
        print(json.dumps(rows, indent=1)[-3000:])
        return
    B, H, T, D = args.batch, 8, 4096, 128
    for name, fwd, bwd, tma in chosen:
        with variant(fwd, bwd, tma) as cfg:
            try:
                timings[name] = dict(timing(B, H, T, D), config=cfg)
            except Exception as e:  # noqa: BLE001
                timings[name] = {"error": f"{type(e).__name__}: {str(e)[:300]}", "config": cfg}
        print(name, json.dumps(timings[name]), flush=True)
        torch.cuda.empty_cache()
    passed = {n for n, *_ in chosen if all(r.get("pass") for r in rows if r["variant"] == n)}
    result = {
        "device": torch.cuda.get_device_name(),
        "date": time.strftime("%Y-%m-%d"),
        "checks": rows,
        "timings": timings,
        "passed": sorted(passed),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    ok = [n for n in passed if "pathsum" in timings.get(n, {})]
    if ok and args.best:
        best = min(ok, key=lambda n: timings[n]["pathsum"]["fwd_bwd_ms"])
        cfg = timings[best]["config"]
        Path(args.best).write_text(json.dumps({"pathsum": {"fwd": cfg["fwd"], "bwd": cfg["bwd"]}}))
        print("best", best, json.dumps(cfg), flush=True)
    print(table(result, B, H, T, D))


def table(result, B=20, H=8, T=4096, D=128) -> str:
    """Per variant: checks passed, worst error / bf16 floor, times, ratio to cuDNN, attention TFLOP/s."""
    fl = flops_per_layer(B, H, T, D)
    rows, timings = result["checks"], result["timings"]
    lines = [f"{'variant':<16}{'pass':>5}{'err/floor':>10}{'fwd ms':>8}{'fb ms':>8}{'x cuDNN':>8}{'TFLOP/s':>8}"]
    for name, t in timings.items():
        worst = max(
            (r[n]["err"] / max(r[n]["floor"], 1e-12) for r in rows if r["variant"] == name for n in NAMES if n in r),
            default=math.nan,
        )
        p, c = t.get("pathsum", {}), t.get("cudnn", {})
        fb = p.get("fwd_bwd_ms", math.nan)
        lines.append(
            f"{name:<16}{'yes' if name in result['passed'] else 'NO':>5}{worst:>10.2f}{p.get('fwd_ms', math.nan):>8.2f}"
            f"{fb:>8.2f}{fb / c.get('fwd_bwd_ms', math.nan):>8.2f}{fl / fb / 1e9:>8.0f}"
        )
    c = next((t["cudnn"] for t in timings.values() if "cudnn" in t), {})
    fwd, fb = c.get("fwd_ms", math.nan), c.get("fwd_bwd_ms", math.nan)
    lines.append(f"cuDNN causal (no bias): fwd {fwd:.2f} ms, fwd+bwd {fb:.2f} ms, {fl / fb / 1e9:.0f} TFLOP/s")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
