"""`triton` backend for `PathSumBias` (GRAPE-AP): flash attention whose path-integral bias
b(t, j) = sum_{l=j+1..t} alpha_h * logsigmoid(scale * <qp_t, kp_l>) is built inside the kernel
from the (B, H, T, P) probes, forward and backward, gradients to q, k, v, both probes and alpha;
optionally with document masking (`doc_ids`).

Two kernels (`_tl_pathsum.py`): the forward, and one fused backward per query block that computes
the potentials once and adds dK, dV and d(key probe) into fp32 buffers by TMA bulk reductions (or
atomics). Memory is O(T): besides the outputs, the backward holds fp32 dK/dV/dkp buffers of
(B, H, T, .); no tensor grows as T^2. Checked against the fp32 reference on the CPU interpreter
and on the H200 at T=4096 (tests/test_pathsum_kernel.py; bench/NOTES.md).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pelab.models.kernels.bias import PathSumBias
from pelab.models.kernels.documents import doc_bounds
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

# (BLOCK_M, BLOCK_N, num_warps, num_stages) per head dim; BLOCK_M must be a multiple of BLOCK_N.
# D=128 from the H200 sweep (bench/NOTES.md): the backward at 128 x 64 spills (~900 B of stack) and
# still beats the spill-free 128 x 32 (whose dK/dV products fall back to mma.sync).
CONFIGS: dict[str, dict[int, tuple[int, int, int, int]]] = {
    "fwd": {16: (64, 64, 4, 2), 32: (64, 64, 4, 2), 64: (64, 64, 4, 2), 128: (64, 64, 4, 2)},
    "bwd": {16: (64, 32, 4, 2), 32: (64, 32, 4, 2), 64: (128, 32, 8, 2), 128: (128, 64, 8, 2)},
}
INTERPRET_CONFIGS = {"fwd": (32, 16, 4, 1), "bwd": (32, 16, 4, 1)}
# GPU: add the backward's dK/dV/dkp blocks with TMA bulk reductions (True) or per-element atomics
# (measured within 1.5% of each other). The CPU interpreter has no TMA reduction: always atomics.
TMA_REDUCE = [True]


def _jit():
    from pelab.models.kernels import _tl_pathsum

    return _tl_pathsum


def _cfg(kind: str, D: int, device) -> tuple[int, int, int, int]:
    cfg = CONFIGS[kind][D] if device.type == "cuda" else INTERPRET_CONFIGS[kind]
    assert cfg[0] % cfg[1] == 0, f"pathsum {kind} config {cfg}: BLOCK_M must be a multiple of BLOCK_N"
    return cfg


def _pad(x: Tensor) -> Tensor:
    """Zero-pad the last dim to a power of two >= 16 (a tensor-core K / N extent for tl.arange)."""
    return F.pad(x, (0, max(16, 1 << (x.shape[-1] - 1).bit_length()) - x.shape[-1])).contiguous()


def _hi_lo(x: Tensor) -> tuple[Tensor, Tensor]:
    hi = x.bfloat16()
    return hi, (x - hi.float()).bfloat16()


def pack_probes(qp: Tensor, kp: Tensor, pscale: float, backward: bool) -> tuple[Tensor, ...]:
    """The kernels' bf16 probe operands, (B, H, T, 2^k >= 16) each (see `_tl_pathsum`): QZ, KZ for
    z = QZ @ KZ^T = pscale <qp, kp> to ~2^-16; with `backward`, also QB, KB for the probe gradients."""
    q_hi, q_lo = _hi_lo(qp.float() * pscale)
    k_hi, k_lo = _hi_lo(kp.float())
    packs = [_pad(torch.cat((q_hi, q_lo, q_hi), -1)), _pad(torch.cat((k_hi, k_hi, k_lo), -1))]
    if backward:
        packs += [_pad(torch.cat((q_hi, q_lo), -1)), _pad(torch.cat((k_hi, k_lo), -1))]
    return tuple(packs)


def _alpha(alpha: Tensor) -> Tensor:
    """alpha with |alpha| >= 1e-30: the backward recovers logsigmoid from psi / alpha (the bias
    changes by ~1e-30 at alpha = 0; the alpha gradient is exact)."""
    alpha = alpha.float().contiguous()
    return torch.where(alpha.abs() < 1e-30, torch.full_like(alpha, 1e-30), alpha)


def _doc_args(doc: Tensor | None, like: Tensor) -> tuple[Tensor, Tensor]:
    """(ids, document starts) for the kernels; placeholders the kernels never read without documents."""
    if doc is None:
        return like, like
    doc = doc.to(torch.int32).contiguous()
    return doc, doc_bounds(doc)[0]


@torch.library.custom_op("pelab::pathsum_attn_fwd", mutates_args=())
def pathsum_attn_fwd(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    qp: Tensor,
    kp: Tensor,
    alpha: Tensor,
    scale: float,
    pscale: float,
    doc: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    B, H, T, D = q.shape
    qz, kz = pack_probes(qp, kp, pscale, backward=False)
    doc_ids, doc_start = _doc_args(doc, q)
    o = _empty_bhtd(B, H, T, D, q)
    lse = torch.empty(B, H, T, device=q.device, dtype=torch.float32)
    alpha_c = _alpha(alpha)
    BM, BN, warps, stages = _cfg("fwd", D, q.device)
    _jit().pathsum_fwd_kernel[(B * H, triton_cdiv(T, BM))](
        q,
        k,
        v,
        qz,
        kz,
        alpha_c,
        o,
        lse,
        doc_ids,
        doc_start,
        *_s(q),
        *_s(k),
        *_s(v),
        *_s(o),
        H,
        T,
        H // k.shape[1],
        scale * 1.4426950408889634,
        D=D,
        KZ=qz.shape[-1],
        BLOCK_M=BM,
        BLOCK_N=BN,
        EVEN_T=T % BM == 0,
        HAS_DOC=doc is not None,
        num_warps=warps,
        num_stages=stages,
    )
    return o, lse


@pathsum_attn_fwd.register_fake
def _(q, k, v, qp, kp, alpha, scale, pscale, doc=None):
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
    doc: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    from pelab.models.kernels import _tl_lowrank  # its delta kernel

    B, H, T, D = q.shape
    Hkv, P = k.shape[1], qp.shape[-1]
    do = _last_contig(do)
    f32 = dict(device=q.device, dtype=torch.float32)
    delta = torch.empty(B, H, T, **f32)
    blk = 64 if q.device.type == "cuda" else 16
    _tl_lowrank.bwd_delta_kernel[(B * H, triton_cdiv(T, blk))](
        o, do, delta, o, *_s(o), *_s(do), H, T, D=D, BLOCK=blk, HAS_LO=False
    )
    qz, kz, qb, kb = pack_probes(qp, kp, pscale, backward=True)
    doc_ids, doc_start = _doc_args(doc, q)
    KB = qb.shape[-1]
    dq = torch.empty_like(q)
    dk32 = torch.zeros(B, Hkv, T, D, **f32)
    dv32 = torch.zeros(B, Hkv, T, D, **f32)
    dqp2 = torch.empty(B, H, T, KB, **f32)
    dkp2 = torch.zeros(B, H, T, KB, **f32)
    dal = torch.empty(B, H, T, **f32) if need_dalpha else torch.empty(0, **f32)
    alpha_c = _alpha(alpha)
    BM, BN, warps, stages = _cfg("bwd", D, q.device)
    tma = TMA_REDUCE[0] and q.is_cuda
    descs = [None] * 3
    if tma:
        from triton.tools.tensor_descriptor import TensorDescriptor

        descs = [
            TensorDescriptor.from_tensor(x.view(-1, T, x.shape[-1]), [1, BN, x.shape[-1]]) for x in (dk32, dv32, dkp2)
        ]
    _jit().pathsum_bwd_kernel[(B * H, triton_cdiv(T, BM))](
        q,
        k,
        v,
        qz,
        kz,
        qb,
        kb,
        alpha_c,
        do,
        lse,
        delta,
        dq,
        dk32,
        dv32,
        dqp2,
        dkp2,
        dal,
        *descs,
        doc_ids,
        doc_start,
        *_s(q),
        *_s(k),
        *_s(v),
        *_s(do),
        *_s(dq),
        *_s(dk32),
        *_s(dv32),
        H,
        T,
        H // Hkv,
        scale,
        scale * 1.4426950408889634,
        D=D,
        KZ=qz.shape[-1],
        KB=KB,
        BLOCK_M=BM,
        BLOCK_N=BN,
        EVEN_T=T % BM == 0,
        HAS_DOC=doc is not None,
        NEED_DALPHA=need_dalpha,
        USE_TMA=tma,
        num_warps=warps,
        num_stages=stages,
    )
    # The probe gradients come as [hi | lo] halves of the packed operands.
    dqp = (dqp2[..., :P] + dqp2[..., P : 2 * P]) * pscale
    dkp = dkp2[..., :P] + dkp2[..., P : 2 * P]
    # the kernel sums E * psi * log2(e) = alpha log2(e) E logsigmoid
    dalpha = dal.sum(dim=(0, 2)) / (alpha_c * 1.4426950408889634) if need_dalpha else torch.empty(0, **f32)
    # dK accumulated dS^T q; both land in buffers laid out like k and v (what the fake kernel says)
    dk, dv = torch.empty_like(k), torch.empty_like(v)
    torch.mul(dk32, scale, out=dk)
    dv.copy_(dv32)
    return dq, dk, dv, dqp, dkp, dalpha


@pathsum_attn_bwd.register_fake
def _(do, q, k, v, qp, kp, alpha, o, lse, scale, pscale, need_dalpha, doc=None):
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
    q, k, v, qp, kp, alpha, scale, pscale, doc = inputs
    o, lse = output
    ctx.save_for_backward(q, k, v, qp, kp, alpha, o, lse, doc)
    ctx.scale, ctx.pscale = scale, pscale


def _backward(ctx, do, _dlse):
    q, k, v, qp, kp, alpha, o, lse, doc = ctx.saved_tensors
    need_dalpha = ctx.needs_input_grad[5]
    dq, dk, dv, dqp, dkp, dalpha = pathsum_attn_bwd(
        do, q, k, v, qp, kp, alpha, o, lse, ctx.scale, ctx.pscale, need_dalpha, doc
    )
    return dq, dk, dv, dqp, dkp, (dalpha if need_dalpha else None), None, None, None


pathsum_attn_fwd.register_autograd(_backward, setup_context=_setup_context)


def pathsum_attention(
    q: Tensor, k: Tensor, v: Tensor, bias: PathSumBias, scale: float, doc_ids: Tensor | None = None
) -> Tensor:
    """q: (B, Hq, T, D); k, v: (B, Hkv, T, D); probes fp32 (B|1, Hq, T, P); alpha (Hq,);
    doc_ids: optional int32 (B, T) document ids, non-decreasing per row (`models.kernels.documents`)."""
    B, H, T, D = q.shape
    q, k, v = _last_contig(q), _last_contig(k), _last_contig(v)
    qp = bias.q_probe.float().expand(B, H, T, bias.q_probe.shape[-1])
    kp = bias.k_probe.float().expand(B, H, T, bias.k_probe.shape[-1])
    alpha = bias.alpha.float().reshape(-1).expand(H)
    o, _ = pathsum_attn_fwd(q, k, v, qp, kp, alpha, float(scale), float(bias.scale), doc_ids)
    return o


def supports(q: Tensor, k: Tensor, v: Tensor, bias) -> bool:
    if not isinstance(bias, PathSumBias):
        return False
    if bias.q_probe.shape[-1] != bias.k_probe.shape[-1] or bias.q_probe.shape[-1] > MAX_PROBE_DIM:
        return False
    if bias.alpha.numel() not in (1, q.shape[1]):
        return False
    return runnable(q, k, v)


def run(q, k, v, bias, scale, doc_ids=None):
    return pathsum_attention(q, k, v, bias, scale, doc_ids=doc_ids)


apply_config_override("pathsum", CONFIGS)
