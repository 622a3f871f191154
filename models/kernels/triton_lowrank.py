"""`triton` backend for `LowRankBias`: causal flash attention (forward + backward) with an fp32
low-rank additive bias sum_r a[i, r] * b[j, r] (R <= 4), GQA, gradients to q, k, v and both
bias factors. Covers ALiBi (rank 1), FoX (rank 1, |c| in the thousands) and GRAPE-A-Q/K/QK
(rank <= 3). The JIT code is in `_tl_lowrank.py`; see its docstring for the numerics.

The kernel is exposed as two `torch.library` custom ops (`pelab::lowrank_attn_fwd/bwd`) with fake
implementations and a registered autograd formula, so `torch.compile` keeps it in one graph.

Document masking: `doc_ids` (int32 (B, T), non-decreasing per row; `models.kernels.documents`)
keeps attention within each document, in the forward and every gradient; blocks that lie wholly
in other documents are skipped. `lowrank_attention` also takes packed `cu_seqlens` and converts them.
"""

from __future__ import annotations

import os

import torch
from pelab.models.kernels.bias import LowRankBias
from pelab.models.kernels.documents import doc_bounds, doc_ids_from_cu_seqlens
from torch import Tensor

MAX_RANK = 4
HEAD_DIMS = (16, 32, 64, 128)

# Launch configurations: (BLOCK_M, BLOCK_N, num_warps, num_stages) per kernel and head dim.
# Chosen on one H200 (bench/NOTES.md). Tests and benchmarks may override entries.
CONFIGS: dict[str, dict[int, tuple[int, int, int, int]]] = {
    "fwd": {16: (128, 64, 4, 3), 32: (128, 64, 4, 3), 64: (128, 64, 4, 3), 128: (128, 64, 8, 3)},
    "dkdv": {16: (64, 128, 8, 3), 32: (64, 128, 8, 3), 64: (64, 128, 8, 3), 128: (64, 128, 8, 3)},
    "dq": {16: (128, 64, 8, 3), 32: (128, 64, 8, 3), 64: (128, 64, 8, 3), 128: (128, 64, 8, 3)},
}


def apply_config_override(section: str, configs: dict) -> None:
    """PELAB_TRITON_CONFIGS='{"lowrank": {"dkdv": [64, 128, 8, 2]}, "pathsum": {...}}' overrides launch
    configs of one kernel module (`section`) for all head dims."""
    import json

    raw = os.environ.get("PELAB_TRITON_CONFIGS")
    if raw:
        for kind, cfg in json.loads(raw).get(section, {}).items():
            for d in configs[kind]:
                configs[kind][d] = tuple(cfg)


# Form delta = rowsum(dO * O) from O in ~fp32 (bf16 O plus its bf16 rounding residual, one extra
# (B, H, T, D) activation) when bias factors need gradients. Those gradients are column sums of dS
# pushed through long cumulative sums (FoX gates), where the row-sum error that bf16 O puts into
# dS accumulates (bench/NOTES.md). Off: plain flash-attention practice (delta from bf16 O).
FP32_DELTA = [False]
# Small blocks for the CPU interpreter (tests): several blocks even at tiny T.
INTERPRET_CONFIGS: dict[str, tuple[int, int, int, int]] = {
    "fwd": (32, 16, 4, 1),
    "dkdv": (16, 32, 4, 1),
    "dq": (32, 16, 4, 1),
}


def interpret_mode() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _jit():
    # Imported on first use: Triton decides "interpreted or compiled" when the kernels are defined
    # (TRITON_INTERPRET=1 must be set before, as tests/test_kernels.py's CPU subprocess does).
    from pelab.models.kernels import _tl_lowrank

    return _tl_lowrank


def _cfg(kind: str, D: int, device: torch.device) -> tuple[int, int, int, int]:
    if device.type != "cuda":
        return INTERPRET_CONFIGS[kind]
    return CONFIGS[kind][D]


def _s(t: Tensor) -> tuple[int, int, int]:
    """(batch, head, time) strides of a (B, H, T, D) tensor whose last dim is contiguous."""
    return t.stride(0), t.stride(1), t.stride(2)


def _last_contig(t: Tensor) -> Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _empty_bhtd(B: int, H: int, T: int, D: int, like: Tensor) -> Tensor:
    """A (B, H, T, D) view of a (B, T, H, D) buffer: `attend` transposes it back for free."""
    return torch.empty(B, T, H, D, dtype=like.dtype, device=like.device).transpose(1, 2)


def _dummy_factor(T: int, device) -> Tensor:
    return torch.zeros(1, 1, T, 1, device=device, dtype=torch.float32)


def _factor_view(f: Tensor, B: int, H: int) -> Tensor:
    """fp32 (B|1, H|1, T, R) -> a (B, H, T, R) view (broadcast dims get stride 0), r-contiguous."""
    f = f.float()
    if f.stride(-1) != 1:
        f = f.contiguous()
    return f.expand(B, H, f.shape[2], f.shape[3])


def _doc_args(doc: Tensor | None, like: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(ids, document starts, document ends) for the kernels; without documents three placeholders
    that the kernels never read (HAS_DOC=False)."""
    if doc is None:
        return like, like, like
    doc = doc.to(torch.int32).contiguous()
    return (doc, *doc_bounds(doc))


# ---- custom ops ---------------------------------------------------------------------------------


@torch.library.custom_op("pelab::lowrank_attn_fwd", mutates_args=())
def lowrank_attn_fwd(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    a: Tensor,
    b: Tensor,
    scale: float,
    rank: int,
    store_lo: bool,
    doc: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    B, H, T, D = q.shape
    Hkv = k.shape[1]
    tlk = _jit()
    a, b = _last_contig(a), _last_contig(b)
    doc_ids, doc_start, _ = _doc_args(doc, q)
    o = _empty_bhtd(B, H, T, D, q)
    lse = torch.empty(B, H, T, device=q.device, dtype=torch.float32)
    o_lo = _empty_bhtd(B, H, T, D, q) if store_lo else q.new_empty(0)
    BM, BN, warps, stages = _cfg("fwd", D, q.device)
    grid = (B * H, triton_cdiv(T, BM))
    tlk.lowrank_fwd_kernel[grid](
        q,
        k,
        v,
        a,
        b,
        o,
        lse,
        o_lo if store_lo else o,
        doc_ids,
        doc_start,
        *_s(q),
        *_s(k),
        *_s(v),
        *_s(o),
        *_s(a),
        *_s(b),
        H,
        T,
        H // Hkv,
        scale * 1.4426950408889634,
        R=rank,
        D=D,
        BLOCK_M=BM,
        BLOCK_N=BN,
        EVEN_T=T % BM == 0 and T % BN == 0,
        STORE_LO=store_lo,
        HAS_DOC=doc is not None,
        num_warps=warps,
        num_stages=stages,
    )
    return o, lse, o_lo


@lowrank_attn_fwd.register_fake
def _(q, k, v, a, b, scale, rank, store_lo, doc=None):
    B, H, T, D = q.shape
    o_lo = _empty_bhtd(B, H, T, D, q) if store_lo else q.new_empty(0)
    return _empty_bhtd(B, H, T, D, q), q.new_empty(B, H, T, dtype=torch.float32), o_lo


@torch.library.custom_op("pelab::lowrank_attn_bwd", mutates_args=())
def lowrank_attn_bwd(
    do: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    a: Tensor,
    b: Tensor,
    o: Tensor,
    lse: Tensor,
    o_lo: Tensor,
    scale: float,
    rank: int,
    need_da: bool,
    need_db: bool,
    doc: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    B, H, T, D = q.shape
    Hkv = k.shape[1]
    tlk = _jit()
    do, a, b = _last_contig(do), _last_contig(a), _last_contig(b)
    doc_ids, doc_start, doc_end = _doc_args(doc, q)
    delta = torch.empty(B, H, T, device=q.device, dtype=torch.float32)
    blk = 64 if q.device.type == "cuda" else 16
    has_lo = o_lo.numel() > 0
    tlk.bwd_delta_kernel[(B * H, triton_cdiv(T, blk))](
        o, do, delta, o_lo if has_lo else o, *_s(o), *_s(do), H, T, D=D, BLOCK=blk, HAS_LO=has_lo
    )
    dq = torch.empty_like(q)
    dk = torch.empty_like(k)
    dv = torch.empty_like(v)
    R = max(rank, 1)
    da = (
        torch.empty(B, H, T, R, device=q.device, dtype=torch.float32)
        if need_da
        else q.new_empty(0, dtype=torch.float32)
    )
    db = (
        torch.empty(B, H, T, R, device=q.device, dtype=torch.float32)
        if need_db
        else q.new_empty(0, dtype=torch.float32)
    )
    sm2 = scale * 1.4426950408889634
    BM, BN, warps, stages = _cfg("dkdv", D, q.device)
    tlk.lowrank_bwd_dkdv_kernel[(B * Hkv, triton_cdiv(T, BN))](
        q,
        k,
        v,
        a,
        b,
        do,
        lse,
        delta,
        dk,
        dv,
        db,
        doc_ids,
        doc_end,
        *_s(q),
        *_s(k),
        *_s(v),
        *_s(a),
        *_s(b),
        *_s(do),
        *_s(dk),
        *_s(dv),
        H,
        Hkv,
        T,
        H // Hkv,
        scale,
        sm2,
        R=rank,
        D=D,
        BLOCK_M=BM,
        BLOCK_N=BN,
        EVEN_T=T % BM == 0 and T % BN == 0,
        NEED_DB=need_db and rank > 0,
        HAS_DOC=doc is not None,
        num_warps=warps,
        num_stages=stages,
    )
    BM, BN, warps, stages = _cfg("dq", D, q.device)
    tlk.lowrank_bwd_dq_kernel[(B * H, triton_cdiv(T, BM))](
        q,
        k,
        v,
        a,
        b,
        do,
        lse,
        delta,
        dq,
        da,
        doc_ids,
        doc_start,
        *_s(q),
        *_s(k),
        *_s(v),
        *_s(a),
        *_s(b),
        *_s(do),
        *_s(dq),
        H,
        T,
        H // Hkv,
        scale,
        sm2,
        R=rank,
        D=D,
        BLOCK_M=BM,
        BLOCK_N=BN,
        EVEN_T=T % BM == 0 and T % BN == 0,
        NEED_DA=need_da and rank > 0,
        HAS_DOC=doc is not None,
        num_warps=warps,
        num_stages=stages,
    )
    return dq, dk, dv, da, db


@lowrank_attn_bwd.register_fake
def _(do, q, k, v, a, b, o, lse, o_lo, scale, rank, need_da, need_db, doc=None):
    B, H, T, _ = q.shape
    R = max(rank, 1)
    f32 = torch.float32
    da = q.new_empty(B, H, T, R, dtype=f32) if need_da else q.new_empty(0, dtype=f32)
    db = q.new_empty(B, H, T, R, dtype=f32) if need_db else q.new_empty(0, dtype=f32)
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), da, db


def _setup_context(ctx, inputs, output):
    q, k, v, a, b, scale, rank, _store_lo, doc = inputs
    o, lse, o_lo = output
    ctx.save_for_backward(q, k, v, a, b, o, lse, o_lo, doc)
    ctx.scale, ctx.rank = scale, rank


def _backward(ctx, do, _dlse, _dlo):
    q, k, v, a, b, o, lse, o_lo, doc = ctx.saved_tensors
    need_da, need_db = ctx.needs_input_grad[3], ctx.needs_input_grad[4]
    dq, dk, dv, da, db = lowrank_attn_bwd(do, q, k, v, a, b, o, lse, o_lo, ctx.scale, ctx.rank, need_da, need_db, doc)
    return dq, dk, dv, (da if need_da else None), (db if need_db else None), None, None, None, None


lowrank_attn_fwd.register_autograd(_backward, setup_context=_setup_context)


def triton_cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


# ---- public entry ---------------------------------------------------------------------------------


def lowrank_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    bias: LowRankBias | None,
    scale: float,
    cu_seqlens: Tensor | None = None,
    doc_ids: Tensor | None = None,
) -> Tensor:
    """q: (B, Hq, T, D); k, v: (B, Hkv, T, D) (last dim contiguous); bias factors fp32
    (B|1, Hq|1, T, R). Documents (optional, one of): doc_ids int32 (B, T), non-decreasing per row,
    or cu_seqlens, packed boundaries over the B*T flattened tokens (`doc_ids_from_cu_seqlens`).
    Returns (B, Hq, T, D)."""
    B, H, T, D = q.shape
    if cu_seqlens is not None:
        if doc_ids is not None:
            raise ValueError("pass doc_ids or cu_seqlens, not both")
        doc_ids = doc_ids_from_cu_seqlens(cu_seqlens, B, T)
    q, k, v = _last_contig(q), _last_contig(k), _last_contig(v)
    if bias is None:
        a = b = _dummy_factor(T, q.device).expand(B, H, T, 1)
        rank = 0
    else:
        # expand's backward sums the kernel's (B, H, T, R) factor gradients over broadcast dims
        a, b, rank = _factor_view(bias.q_terms, B, H), _factor_view(bias.k_terms, B, H), bias.rank
    store_lo = FP32_DELTA[0] and rank > 0 and torch.is_grad_enabled() and (a.requires_grad or b.requires_grad)
    o, _, _ = lowrank_attn_fwd(q, k, v, a, b, float(scale), rank, bool(store_lo), doc_ids)
    return o


def supports(q: Tensor, k: Tensor, v: Tensor, bias) -> bool:
    if bias is not None and not isinstance(bias, LowRankBias):
        return False
    if bias is not None and (
        bias.rank > MAX_RANK
        or bias.q_terms.shape[1] not in (1, q.shape[1])
        or bias.k_terms.shape[1] not in (1, q.shape[1])
    ):
        return False
    return runnable(q, k, v)


def runnable(q: Tensor, k: Tensor, v: Tensor) -> bool:
    """Head dims, dtypes and device the pelab Triton kernels (both modules) take."""
    if q.shape[-1] not in HEAD_DIMS or k.shape[-1] != q.shape[-1] or v.shape[-1] != q.shape[-1]:
        return False
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        return False
    if q.is_cuda:
        return _has_triton()
    # CPU: only under the interpreter, and only when asked for explicitly (tests).
    return interpret_mode() and ALLOW_CPU_INTERPRET[0] and _has_triton()


ALLOW_CPU_INTERPRET = [False]


def _has_triton() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def run(q, k, v, bias, scale, doc_ids=None):
    return lowrank_attention(q, k, v, bias, scale, doc_ids=doc_ids)


apply_config_override("lowrank", CONFIGS)
