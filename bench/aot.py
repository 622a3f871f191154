"""Compile the pelab Triton kernels for sm_90 ahead of time, without a GPU (catches front-end errors and
reports registers / spills / shared memory per launch config). `python -m bench.aot [--d 128] [--docs]`."""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def _sig(fn, types: dict, consts: dict):
    names = fn.arg_names
    sig = {}
    for n in names:
        if n in consts:
            sig[n] = "constexpr"
        else:
            sig[n] = types.get(n, "i32")
    return sig


def compile_one(fn, ptr_types: dict, consts: dict, num_warps: int, num_stages: int, float_args=()):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    types = dict(ptr_types)
    for a in float_args:
        types[a] = "fp32"
    # what the JIT specializes at run time: 16-aligned pointers, strides/lengths divisible by 16
    div = [
        i
        for i, n in enumerate(fn.arg_names)
        if n not in consts
        and (
            types.get(n, "").startswith("*")
            or (n.startswith("s_") and n[2:4] not in ("ab", "ah", "at", "bb", "bh", "bt"))
            or n in ("T", "NT")
        )
    ]
    attrs = {(i,): [["tt.divisibility", 16]] for i in div}
    src = ASTSource(fn, _sig(fn, types, consts), consts, attrs)
    k = triton.compile(
        src, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps, "num_stages": num_stages}
    )
    md = k.metadata
    import os
    import subprocess
    import tempfile

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(k.asm["cubin"])
    res = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True).stdout
    sass = subprocess.run([tool, "-sass", f.name], capture_output=True, text=True).stdout
    os.unlink(f.name)
    m = re.search(r"REG:(\d+).*?STACK:(\d+).*?SHARED:(\d+).*?LOCAL:(\d+)", res)
    regs, stack, _, local = (int(x) for x in m.groups()) if m else (None,) * 4
    return {
        "regs": regs,
        "stack": stack,
        "local": local,
        "shared": md.shared,
        "hgmma": sass.count("HGMMA"),
        "hmma": sass.count("HMMA"),
        "mufu": sass.count("MUFU"),
        "ldl_stl": sass.count("LDL") + sass.count("STL"),
    }


SWEEP = {
    "fwd": [(128, 64, 8, 2), (128, 64, 8, 3), (64, 64, 4, 2), (128, 32, 8, 2), (128, 128, 8, 2)],
    "dkdv": [(16, 64, 8, 2), (32, 64, 8, 2), (64, 64, 8, 2), (32, 64, 4, 2), (64, 128, 8, 2)],
    "dq": [(128, 32, 8, 2), (64, 32, 4, 2), (128, 64, 8, 2), (64, 64, 8, 2), (64, 64, 4, 2)],
    "bwd": [(128, 32, 8, 2), (128, 32, 8, 1), (64, 32, 4, 2), (128, 64, 8, 2)],
}


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--d", type=int, default=128)
    ap.add_argument("--dtype", default="bf16")
    ap.add_argument("--sweep", action="store_true", help="try a list of launch configs per kernel")
    ap.add_argument("--only", default="", help="comma list of kernel names")
    ap.add_argument("--rank", type=int, default=3)
    ap.add_argument("--docs", action="store_true", help="the document-masked variants (HAS_DOC)")
    args = ap.parse_args(argv)
    from pelab.models.kernels import _tl_lowrank as L
    from pelab.models.kernels import _tl_pathsum as P
    from pelab.models.kernels import triton_lowrank as TL
    from pelab.models.kernels import triton_pathsum as TP

    D, dt = args.d, "*" + args.dtype
    f32p = "*fp32"
    out = []
    lr_ptr = {
        "Q": dt,
        "K": dt,
        "V": dt,
        "A": f32p,
        "Bk": f32p,
        "O": dt,
        "OLO": dt,
        "L": f32p,
        "DO": dt,
        "DELTA": f32p,
        "DK": dt,
        "DV": dt,
        "DB": f32p,
        "DQ": dt,
        "DA": f32p,
        "DOC": "*i32",
        "DSTART": "*i32",
        "DEND": "*i32",
    }
    ps_ptr = {
        "Q": dt,
        "K": dt,
        "V": dt,
        "QZ": "*bf16",
        "KZP": "*bf16",
        "QBP": "*bf16",
        "KBP": "*bf16",
        "ALPHA": f32p,
        "O": dt,
        "L": f32p,
        "DO": dt,
        "DELTA": f32p,
        "DQ": dt,
        "DK32": f32p,
        "DV32": f32p,
        "DQP": f32p,
        "DKP": f32p,
        "DAL": f32p,
        "DOC": "*i32",
        "DSTART": "*i32",
    }
    fl = ("sm_scale", "sm_scale2", "pscale")
    for name, fn, ptrs, kind, mod, extra in [
        ("lowrank_fwd", L.lowrank_fwd_kernel, lr_ptr, "fwd", TL, {"R": 3}),
        ("lowrank_dkdv", L.lowrank_bwd_dkdv_kernel, lr_ptr, "dkdv", TL, {"R": 3, "NEED_DB": True}),
        ("lowrank_dq", L.lowrank_bwd_dq_kernel, lr_ptr, "dq", TL, {"R": 3, "NEED_DA": True}),
        ("pathsum_fwd", P.pathsum_fwd_kernel, ps_ptr, "fwd", TP, {"KZ": 32}),
        ("pathsum_bwd", P.pathsum_bwd_kernel, ps_ptr, "bwd", TP, {"KZ": 32, "KB": 16, "NEED_DALPHA": True}),
    ]:
        if args.only and name not in args.only.split(","):
            continue
        if "R" in extra:
            extra = dict(extra, R=args.rank)
        cfgs = SWEEP.get(kind, []) if args.sweep else [mod.CONFIGS[kind][D]]
        for bm, bn, w, st in cfgs:
            flags = {"EVEN_T": True, "STORE_LO": False, "HAS_DOC": args.docs}  # those the kernel takes
            consts = dict(extra, D=D, BLOCK_M=bm, BLOCK_N=bn, **{k: v for k, v in flags.items() if k in fn.arg_names})
            types = ptrs
            if name == "pathsum_bwd":  # TMA reductions into the fp32 dK / dV / d(key probe) buffers
                consts.update(USE_TMA=TP.TMA_REDUCE[0])
                desc = {
                    k: f"tensordesc<fp32[1,{bn},{c}]>" for k, c in (("DK_DESC", D), ("DV_DESC", D), ("DKP_DESC", 16))
                }
                types = dict(ptrs, **desc) if TP.TMA_REDUCE[0] else ptrs
                if not TP.TMA_REDUCE[0]:
                    consts.update(dict.fromkeys(desc))
            try:
                r = compile_one(fn, types, consts, w, st, fl)
                print(f"{name:<14} cfg={(bm, bn, w, st)} {r}", flush=True)
            except Exception as e:  # noqa: BLE001
                print(f"{name:<14} cfg={(bm, bn, w, st)} FAILED {type(e).__name__}: {str(e)[:300]}", flush=True)
    return out


if __name__ == "__main__":
    main()
