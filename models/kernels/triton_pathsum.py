"""`triton` backend for `PathSumBias` (GRAPE-AP): flash attention whose path-integral bias
b(t, j) = sum_{l=j+1..t} alpha_h * logsigmoid(scale * <qp_t, kp_l>) is built inside the kernel
from the (B, H, T, P) probes, forward and backward, gradients to q, k, v, both probes and alpha.

Checked against the fp32 reference on the CPU interpreter (tests/test_kernels.py) and on the H200
at T=4096 (bf16-level errors for every output; bench/NOTES.md). The dK/dV kernel lays its tiles out
as (query rows, key columns) like the dQ sweep: a transposed layout was exact in the interpreter but
made illegal memory accesses on the H200.

No T x T tensor exists. The backward keeps two transient (B, H, T, T/TB) fp32 prefix tables
(TB = the dK/dV kernel's key block), freed after the call; see `_tl_pathsum.py`. The probe
products and the in-tile prefix sums run on the tensor cores as bf16 hi+lo pairs (~2^-16 relative).
"""

from __future__ import annotations

import torch
from pelab.models.kernels.bias import PathSumBias
from pelab.models.kernels.triton_lowrank import (
    _empty_bhtd,
    _last_contig,
    _s,
    apply_config_override,
    runnable,
    triton_cdiv,
)
from torch import Tensor

MAX_PROBE_DIM = 64

# (BLOCK_M, BLOCK_N, num_warps, num_stages); the dK/dV BLOCK_N is the prefix-table stride TB and
# must be a multiple of the dQ BLOCK_N.
CONFIGS: dict[str, dict[int, tuple[int, int, int, int]]] = {
    "fwd": {16: (128, 64, 4, 2), 32: (128, 64, 4, 2), 64: (128, 64, 4, 2), 128: (128, 64, 8, 2)},
    "dkdv": {16: (16, 64, 4, 2), 32: (16, 64, 4, 2), 64: (16, 64, 4, 2), 128: (16, 64, 4, 2)},
    "dq": {16: (64, 32, 4, 2), 32: (64, 32, 4, 2), 64: (64, 32, 4, 2), 128: (128, 32, 8, 2)},
}

INTERPRET_CONFIGS = {"fwd": (32, 16, 4, 1), "dkdv": (16, 32, 4, 1), "dq": (32, 16, 4, 1)}


def _jit():
    from pelab.models.kernels import _tl_pathsum

    return _tl_pathsum


def _cfg(kind: str, D: int, device) -> tuple[int, int, int, int]:
    return CONFIGS[kind][D] if device.type == "cuda" else INTERPRET_CONFIGS[kind]


def _pp(P: int) -> int:
    return max(16, 1 << (P - 1).bit_length())


@torch.library.custom_op("pelab::pathsum_attn_fwd", mutates_args=())
def pathsum_attn_fwd(
    q: Tensor, k: Tensor, v: Tensor, qp: Tensor, kp: Tensor, alpha: Tensor, scale: float, pscale: float
) -> tuple[Tensor, Tensor]:
    B, H, T, D = q.shape
    Hkv, P = k.shape[1], qp.shape[-1]
    qp, kp, alpha = _last_contig(qp), _last_contig(kp), alpha.contiguous()
    o = _empty_bhtd(B, H, T, D, q)
    lse = torch.empty(B, H, T, device=q.device, dtype=torch.float32)
    BM, BN, warps, stages = _cfg("fwd", D, q.device)
    _jit().pathsum_fwd_kernel[(B * H, triton_cdiv(T, BM))](
        q,
        k,
        v,
        qp,
        kp,
        alpha,
        o,
        lse,
        *_s(q),
        *_s(k),
        *_s(v),
        *_s(o),
        *_s(qp),
        *_s(kp),
        H,
        T,
        H // Hkv,
        P,
        scale * 1.4426950408889634,
        pscale,
        D=D,
        PP=_pp(P),
        BLOCK_M=BM,
        BLOCK_N=BN,
        EVEN_T=T % BM == 0 and T % BN == 0,
        num_warps=warps,
        num_stages=stages,
    )
    return o, lse


@pathsum_attn_fwd.register_fake
def _(q, k, v, qp, kp, alpha, scale, pscale):
    B, H, T, D = q.shape
    return _empty_bhtd(B, H, T, D, q), q.new_empty(B, H, T, dtype=torch.float32)


@torch.library.custom_op("pelab::pathsum_attn_bwd", mutates_args=())
def pathsum_attn_bwd(
    do: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    qp: Tensor,
    kp: Tensor,
    alpha: Tensor,
    o: Tensor,
    lse: Tensor,
    scale: float,
    pscale: float,
    need_dalpha: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    B, H, T, D = q.shape
    Hkv, P = k.shape[1], qp.shape[-1]
    tlk = _jit()
    from pelab.models.kernels import _tl_lowrank  # its delta kernel

    do, qp, kp, alpha = _last_contig(do), _last_contig(qp), _last_contig(kp), alpha.contiguous()
    delta = torch.empty(B, H, T, device=q.device, dtype=torch.float32)
    blk = 64 if q.device.type == "cuda" else 16
    _tl_lowrank.bwd_delta_kernel[(B * H, triton_cdiv(T, blk))](
        o, do, delta, o, *_s(o), *_s(do), H, T, D=D, BLOCK=blk, HAS_LO=False
    )
    bm_kv, tb, w_kv, st_kv = _cfg("dkdv", D, q.device)
    bm_q, bn_q, w_q, st_q = _cfg("dq", D, q.device)
    assert tb % bn_q == 0 and tb % bm_kv == 0, (
        "dK/dV BLOCK_N must be a multiple of the dQ BLOCK_N and the dK/dV BLOCK_M"
    )
    nt = triton_cdiv(T, tb)
    ct = torch.empty(B, H, T, nt, device=q.device, dtype=torch.float32)
    et = torch.empty(B, H, T, nt, device=q.device, dtype=torch.float32)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    dqp = torch.empty(B, H, T, P, device=q.device, dtype=torch.float32)
    dkp = torch.empty(B, H, T, P, device=q.device, dtype=torch.float32)
    dal = (
        torch.empty(B, H, T, device=q.device, dtype=torch.float32)
        if need_dalpha
        else q.new_empty(0, dtype=torch.float32)
    )
    sm2, PP = scale * 1.4426950408889634, _pp(P)
    tlk.pathsum_bwd_dq_kernel[(B * H, triton_cdiv(T, bm_q))](
        q,
        k,
        v,
        qp,
        kp,
        alpha,
        do,
        lse,
        delta,
        dq,
        dqp,
        dal,
        ct,
        et,
        *_s(q),
        *_s(k),
        *_s(v),
        *_s(qp),
        *_s(kp),
        *_s(do),
        *_s(dq),
        H,
        T,
        H // Hkv,
        P,
        nt,
        scale,
        sm2,
        pscale,
        D=D,
        PP=PP,
        BLOCK_M=bm_q,
        BLOCK_N=bn_q,
        TB=tb,
        EVEN_T=T % bm_q == 0 and T % bn_q == 0,
        NEED_DALPHA=need_dalpha,
        num_warps=w_q,
        num_stages=st_q,
    )
    tlk.pathsum_bwd_dkdv_kernel[(B * Hkv, nt)](
        q,
        k,
        v,
        qp,
        kp,
        alpha,
        do,
        lse,
        delta,
        dk,
        dv,
        dkp,
        ct,
        et,
        *_s(q),
        *_s(k),
        *_s(v),
        *_s(qp),
        *_s(kp),
        *_s(do),
        *_s(dk),
        *_s(dv),
        H,
        Hkv,
        T,
        H // Hkv,
        P,
        nt,
        scale,
        sm2,
        pscale,
        D=D,
        PP=PP,
        BLOCK_M=bm_kv,
        BLOCK_N=tb,
        num_warps=w_kv,
        num_stages=st_kv,
    )
    dalpha = dal.sum(dim=(0, 2)) if need_dalpha else q.new_empty(0, dtype=torch.float32)
    return dq, dk, dv, dqp, dkp, dalpha


@pathsum_attn_bwd.register_fake
def _(do, q, k, v, qp, kp, alpha, o, lse, scale, pscale, need_dalpha):
    B, H, T, _ = q.shape
    P = qp.shape[-1]
    f32 = torch.float32
    dalpha = q.new_empty(H, dtype=f32) if need_dalpha else q.new_empty(0, dtype=f32)
    return (
        torch.empty_like(q),
        torch.empty_like(k),
        torch.empty_like(v),
        q.new_empty(B, H, T, P, dtype=f32),
        q.new_empty(B, H, T, P, dtype=f32),
        dalpha,
    )


def _setup_context(ctx, inputs, output):
    q, k, v, qp, kp, alpha, scale, pscale = inputs
    o, lse = output
    ctx.save_for_backward(q, k, v, qp, kp, alpha, o, lse)
    ctx.scale, ctx.pscale = scale, pscale


def _backward(ctx, do, _dlse):
    q, k, v, qp, kp, alpha, o, lse = ctx.saved_tensors
    need_dalpha = ctx.needs_input_grad[5]
    dq, dk, dv, dqp, dkp, dalpha = pathsum_attn_bwd(
        do, q, k, v, qp, kp, alpha, o, lse, ctx.scale, ctx.pscale, need_dalpha
    )
    return dq, dk, dv, dqp, dkp, (dalpha if need_dalpha else None), None, None


pathsum_attn_fwd.register_autograd(_backward, setup_context=_setup_context)


def pathsum_attention(q: Tensor, k: Tensor, v: Tensor, bias: PathSumBias, scale: float) -> Tensor:
    """q: (B, Hq, T, D); k, v: (B, Hkv, T, D); probes fp32 (B|1, Hq, T, P); alpha (Hq,)."""
    B, H, T, D = q.shape
    q, k, v = _last_contig(q), _last_contig(k), _last_contig(v)
    qp = bias.q_probe.float().expand(B, H, T, bias.q_probe.shape[-1])
    kp = bias.k_probe.float().expand(B, H, T, bias.k_probe.shape[-1])
    alpha = bias.alpha.float().reshape(-1).expand(H)
    o, _ = pathsum_attn_fwd(q, k, v, qp, kp, alpha, float(scale), float(bias.scale))
    return o


def supports(q: Tensor, k: Tensor, v: Tensor, bias) -> bool:
    if not isinstance(bias, PathSumBias):
        return False
    if bias.q_probe.shape[-1] != bias.k_probe.shape[-1] or bias.q_probe.shape[-1] > MAX_PROBE_DIM:
        return False
    if bias.alpha.numel() not in (1, q.shape[1]):
        return False
    return runnable(q, k, v)


def run(q, k, v, bias, scale):
    return pathsum_attention(q, k, v, bias, scale)


apply_config_override("pathsum", CONFIGS)
