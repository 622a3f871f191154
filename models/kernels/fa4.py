"""`fa4` backend: FlashAttention-4 (`flash-attn-4`, CuTe DSL kernels JIT-built on first use; Hopper and
Blackwell), installed by `pip install pelab[flash]`. Causal attention, GQA, and a `LowRankBias`
sum_r a[i, r] * b[j, r] added in fp32 by a `score_mod` that reads the factors.

FlashAttention-4 returns no gradient for the tensors a `score_mod` reads. The factor gradients come
from extra head dimensions in the backward pass instead, with G = dLoss/dlogits (logits =
scale * q.k + bias):

* dq'[i, e] = scale * sum_j G[i, j] k'[j, e] and dk'[j, e] = scale * sum_i G[i, j] q'[i, e], so a
  key-side column k'[:, e] = b_r / scale next to a zero query-side column gives
  dq'[:, e] = sum_j G[i, j] b_r[j] = dLoss/da_r[i], and q'[:, e] = a_r / scale next to a zero key
  column gives dk'[:, e] = dLoss/db_r[j]. The products of the extra columns are zero, so the
  scores, the softmax and dq, dk, dv are unchanged (`extra_columns`, `factor_grads`).
* The columns are bf16 like q and k: each fp32 value is split into a bf16 pair hi + lo (about 16
  significant bits; positions up to 2^16 stay exact).
* Query-side gradients sum_j G[i, j] b[j] are tiny differences of large terms (each row of G sums to
  zero, and b holds positions or cumulative gates). The kernel rounds G to bf16 before its dQ
  product, so one more key column of ones gives the rounded rows' sums s[i], and
  sum_j G[i, j] b[j] - b[i] * s[i] cancels that rounding (GRAPE-A-Q at T=1024 in an fp64 emulation:
  6.8e-2 -> 4.9e-3 relative error, against 1.8e-3 from bf16 inputs alone; tests/test_fa4.py).
* Key-side gradients are written as bf16 dk' columns without such a correction: exact enough for one
  rank term (FoX: the column sums of G), not when several terms cancel (GRAPE-A-K/QK: their key gate
  gradient w * sum_i G[i, j] (p_j - p_i) would come out as the difference of two bf16-rounded large
  columns, ~5% off). So key-side gradients are supported for rank-1 biases only; the others run on
  the `triton` kernel.
The forward uses plain q and k (head dim D); only the backward runs at D + extra columns, rounded up
to a multiple of 16 by the kernel (D=128: 144). On the H200 that backward is slower than the triton
kernel's, so `auto` uses fa4 for plain causal attention and constant biases only (`AUTO`).

Two `torch.library` custom ops (`pelab::fa4_fwd/bwd`) with fake implementations and an autograd formula
keep the kernel inside one `torch.compile` graph. Document masking is not offered (FlashAttention-4
takes a mask_mod only without its causal block skipping, i.e. at twice the work; `auto` uses the
`triton` kernel for documents).
"""

from __future__ import annotations

import functools

import torch
from pelab.models.kernels.bias import LowRankBias
from torch import Tensor

MAX_RANK = 4
MAX_EXTRA = 16  # extra backward head dims (supported biases: 2R + 1 <= 9 for da, 2 for db)


@functools.cache
def available() -> bool:
    try:
        from flash_attn.cute import interface  # noqa: F401
    except Exception:  # noqa: BLE001  (ImportError, or a CUDA/CuTe DSL runtime missing)
        return False
    return True


def missing() -> str | None:
    """Why fa4 cannot run on this machine, or None."""
    if not available():
        return "flash-attn-4 is not installed (pip install pelab[flash]; Hopper or Blackwell GPUs)"
    if not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] not in (9, 10):
        return "FlashAttention-4 needs a Hopper (sm_90) or Blackwell (sm_100) GPU"
    return None


def _interface():
    from flash_attn.cute import interface

    return interface


# ---- the extra-dimension construction (pure PyTorch; tested on the CPU against autograd) -------------


def _split(x: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    hi = x.to(dtype)
    return hi, (x - hi.to(x.dtype)).to(dtype)


def extra_columns(
    q: Tensor, k: Tensor, a: Tensor, b: Tensor, scale: float, need_da: bool, need_db: bool
) -> tuple[Tensor, Tensor]:
    """q' and k' for the backward: q, k (B, T, H, D) (k with as many heads as q) and the factors a, b
    (B, T, H, R) fp32. Columns after D: [da block: b_r / scale as R bf16 pairs, then a ones column]
    (zeros in q'), [db block: a_r / scale as R pairs] (zeros in k'), zero padding to a multiple of 8."""
    qx, kx = [], []
    if need_da:
        for r in range(b.shape[-1]):
            kx += _split(b[..., r] / scale, k.dtype)
        kx.append(torch.full_like(b[..., 0], 1.0 / scale).to(k.dtype))
        qx += [torch.zeros_like(q[..., 0])] * (2 * b.shape[-1] + 1)
    if need_db:
        for r in range(a.shape[-1]):
            qx += _split(a[..., r] / scale, q.dtype)
        kx += [torch.zeros_like(k[..., 0])] * (2 * a.shape[-1])
    n = len(qx)
    pad = -(q.shape[-1] + n) % 8
    qx += [torch.zeros_like(q[..., 0])] * pad
    kx += [torch.zeros_like(k[..., 0])] * pad
    return torch.cat([q, torch.stack(qx, -1)], -1), torch.cat([k, torch.stack(kx, -1)], -1)


def factor_grads(
    dq: Tensor, dk: Tensor, b: Tensor, scale: float, head_dim: int, need_da: bool, need_db: bool
) -> tuple[Tensor | None, Tensor | None]:
    """dLoss/da and dLoss/db (B, T, H, R), at least fp32, from the columns after `head_dim` of dq' and
    dk' (`extra_columns`)."""
    D = head_dim
    acc = torch.promote_types(dq.dtype, torch.float32)
    da = db = None
    col = D
    if need_da:
        R = b.shape[-1]
        x = dq[..., D : D + 2 * R + 1].to(acc)
        ones = float(torch.tensor(1.0 / scale, dtype=torch.float64).to(dq.dtype)) * scale  # as the kernel saw it
        rowsum = x[..., 2 * R] / ones
        da = torch.stack([x[..., 2 * r] + x[..., 2 * r + 1] - b[..., r] * rowsum for r in range(R)], -1)
        col += 2 * R + 1
    if need_db:
        x = dk[..., col : col + 2 * b.shape[-1]].to(acc)
        db = torch.stack([x[..., 2 * r] + x[..., 2 * r + 1] for r in range(b.shape[-1])], -1)
    return da, db


# ---- custom ops ----------------------------------------------------------------------------------


@functools.cache
def _mods(rank: int, heads: int, seq_len: int):
    """(score_mod, score_mod_bwd) adding sum_r a[b, h, i, r] * b[b, h, j, r] from the flat fp32 factors
    (aux_tensors[0] = a, aux_tensors[1] = b, each (B, H, T, R) contiguous)."""
    import cutlass
    import cutlass.cute as cute

    @cute.jit
    def score_mod(score, b_idx, h_idx, q_idx, kv_idx, seqlen_info, aux_tensors):
        a_terms = aux_tensors[0]
        b_terms = aux_tensors[1]
        row = (b_idx * cute.full_like(b_idx, heads) + h_idx) * cute.full_like(b_idx, seq_len)
        qi = (row + q_idx) * cute.full_like(b_idx, rank)
        ki = (row + kv_idx) * cute.full_like(b_idx, rank)
        idx = cute.make_rmem_tensor(1, cutlass.Int32)
        val = cute.make_rmem_tensor(1, cutlass.Float32)
        out = score
        for r in cutlass.range_constexpr(rank):
            idx.store(qi + cute.full_like(qi, r))
            val[0] = a_terms[idx[0]]
            a_r = val.load()
            idx.store(ki + cute.full_like(ki, r))
            val[0] = b_terms[idx[0]]
            out = out + a_r * val.load()
        return out

    @cute.jit
    def score_mod_bwd(grad, score, b_idx, h_idx, q_idx, kv_idx, seqlen_info, aux_tensors):
        return grad  # d(score + bias)/d score

    return score_mod, score_mod_bwd


def _aux(a: Tensor, b: Tensor, rank: int):
    if rank == 0:
        return {}
    B, H, T, _ = a.shape
    score_mod, score_mod_bwd = _mods(rank, H, T)
    return {"score_mod": score_mod, "score_mod_bwd": score_mod_bwd, "aux_tensors": [a.reshape(-1), b.reshape(-1)]}


@torch.library.custom_op("pelab::fa4_fwd", mutates_args=())
def fa4_fwd(q: Tensor, k: Tensor, v: Tensor, a: Tensor, b: Tensor, scale: float, rank: int) -> tuple[Tensor, Tensor]:
    """q, k, v (B, T, H, D) bf16/fp16; a, b fp32 (B, Hq, T, R) contiguous (ignored for rank 0).
    Returns out (B, T, H, D) and the log-sum-exp (B, H, T) fp32."""
    aux = _aux(a, b, rank)
    aux.pop("score_mod_bwd", None)
    out, lse, *_ = _interface()._flash_attn_fwd(q, k, v, softmax_scale=scale, causal=True, return_lse=True, **aux)
    return out, lse


@fa4_fwd.register_fake
def _(q, k, v, a, b, scale, rank):
    B, T, H, _ = q.shape
    return torch.empty_like(q), q.new_empty(B, H, T, dtype=torch.float32)


@torch.library.custom_op("pelab::fa4_bwd", mutates_args=())
def fa4_bwd(
    do: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    a: Tensor,
    b: Tensor,
    out: Tensor,
    lse: Tensor,
    scale: float,
    rank: int,
    need_da: bool,
    need_db: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    B, T, H, D = q.shape
    Hkv = k.shape[2]
    group = H // Hkv
    aux = _aux(a, b, rank)
    f32 = torch.float32
    if not (need_da or need_db):
        dq, dk, dv = _interface()._flash_attn_bwd(q, k, v, out, do, lse, scale, True, **aux)
        return dq, dk, dv, q.new_empty(0, dtype=f32), q.new_empty(0, dtype=f32)
    # per-query-head factor columns need a key head per query head (GQA: expand, sum back below)
    ke, ve = (k, v) if group == 1 else (k.repeat_interleave(group, 2), v.repeat_interleave(group, 2))
    at, bt = a.transpose(1, 2), b.transpose(1, 2)  # (B, T, H, R)
    qx, kx = extra_columns(q, ke, at, bt, scale, need_da, need_db)
    dqx, dkx, dv = _interface()._flash_attn_bwd(qx, kx, ve, out, do, lse, scale, True, **aux)
    da, db = factor_grads(dqx, dkx, bt, scale, D, need_da, need_db)
    dq, dk = dqx[..., :D].contiguous(), dkx[..., :D]
    if group > 1:
        dk = dk.unflatten(2, (Hkv, group)).sum(3, dtype=f32).to(k.dtype)
        dv = dv.unflatten(2, (Hkv, group)).sum(3, dtype=f32).to(v.dtype)
    empty = q.new_empty(0, dtype=f32)
    da = empty if da is None else da.transpose(1, 2).contiguous()
    db = empty if db is None else db.transpose(1, 2).contiguous()
    return dq, dk.contiguous(), dv, da, db


@fa4_bwd.register_fake
def _(do, q, k, v, a, b, out, lse, scale, rank, need_da, need_db):
    f32 = torch.float32
    B, T, H, _ = q.shape
    da = a.new_empty(B, H, T, rank, dtype=f32) if need_da else q.new_empty(0, dtype=f32)
    db = b.new_empty(B, H, T, rank, dtype=f32) if need_db else q.new_empty(0, dtype=f32)
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), da, db


def _setup_context(ctx, inputs, output):
    q, k, v, a, b, scale, rank = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, a, b, out, lse)
    ctx.scale, ctx.rank = scale, rank


def _backward(ctx, dout, _dlse):
    q, k, v, a, b, out, lse = ctx.saved_tensors
    need_da = ctx.rank > 0 and ctx.needs_input_grad[3]
    need_db = ctx.rank > 0 and ctx.needs_input_grad[4]
    dq, dk, dv, da, db = fa4_bwd(dout.contiguous(), q, k, v, a, b, out, lse, ctx.scale, ctx.rank, need_da, need_db)
    return dq, dk, dv, (da if need_da else None), (db if need_db else None), None, None


fa4_fwd.register_autograd(_backward, setup_context=_setup_context)


# ---- registry entry -----------------------------------------------------------------------------------


def _needs_grad(t: Tensor) -> bool:
    return torch.is_grad_enabled() and t.requires_grad


def bias_supported(bias) -> bool:
    """Device-independent part of `supports`: no bias, or a LowRankBias of rank <= 4 whose key-side
    factors need no gradient unless the rank is 1 (module docstring)."""
    if bias is None:
        return True
    if not isinstance(bias, LowRankBias) or bias.rank > MAX_RANK:
        return False
    return not (_needs_grad(bias.k_terms) and bias.rank > 1)


def bias_kind(bias) -> str:
    """causal | constant (no factor gradients) | query_grad | key_grad (rank 1; FoX) | query_key_grad."""
    if bias is None:
        return "causal"
    da, db = _needs_grad(bias.q_terms), _needs_grad(bias.k_terms)
    return {(False, False): "constant", (True, False): "query_grad", (False, True): "key_grad"}.get(
        (da, db), "query_key_grad"
    )


# Where `auto` prefers fa4 over the other kernels that run the same inputs: fwd+bwd of one call at
# B20 H8 T4096 D128 on the H200 (bench/RESULTS.md), causal 4.54 ms vs cuDNN 5.02, constant (ALiBi) 5.87
# vs flex 7.44 (forward alone, as in evaluation, 1.86 vs 2.06); with factor gradients the backward at
# head dim 144 loses to the triton kernel: FoX 8.23 vs 7.49, GRAPE-A-Q 8.32 vs 7.58.
AUTO = {"causal": True, "constant": True, "query_grad": False, "key_grad": False, "query_key_grad": False}


def auto_preferred(q: Tensor, k: Tensor, v: Tensor, bias) -> bool:
    return AUTO[bias_kind(bias)]


def shape_supported(q: Tensor, k: Tensor, v: Tensor) -> bool:
    D = q.shape[-1]
    same = k.shape[-1] == D and v.shape[-1] == D and q.dtype == k.dtype == v.dtype
    return same and q.dtype in (torch.bfloat16, torch.float16) and D % 8 == 0 and 8 <= D <= 256 - MAX_EXTRA


def device_supported(q: Tensor) -> bool:
    """CUDA with compute capability 9.x (Hopper) or 10.x (Blackwell), and flash-attn-4 importable."""
    return q.is_cuda and torch.cuda.get_device_capability(q.device)[0] in (9, 10) and available()


def supports(q: Tensor, k: Tensor, v: Tensor, bias) -> bool:
    return shape_supported(q, k, v) and bias_supported(bias) and device_supported(q)


def run(q: Tensor, k: Tensor, v: Tensor, bias: LowRankBias | None, scale: float) -> Tensor:
    """q: (B, Hq, T, D), k, v: (B, Hkv, T, D) views of (B, T, H, D) tensors -> (B, Hq, T, D) view."""
    B, H, T, _ = q.shape
    qt, kt, vt = (x.transpose(1, 2).contiguous() for x in (q, k, v))
    if bias is None:
        a = b = qt.new_empty(0, dtype=torch.float32)
        rank = 0
    else:
        # expand's backward sums the (B, H, T, R) factor gradients over broadcast dims
        a = bias.q_terms.float().expand(B, H, T, bias.rank).contiguous()
        b = bias.k_terms.float().expand(B, H, T, bias.rank).contiguous()
        rank = bias.rank
    out, _ = fa4_fwd(qt, kt, vt, a, b, float(scale), rank)
    return out.transpose(1, 2)
