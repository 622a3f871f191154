"""Portable attention paths: the dense fp32 reference and a memory-frugal chunked kernel.

Both accept every bias type through `AttentionBias.tile`, and document masking (`doc_ids`, see
`models.kernels.documents`). The chunked kernel processes query blocks against their key prefix in
fp32 and recomputes each block in its backward, so memory stays O(block * T) instead of O(T^2); it
runs anywhere, including CPU. It is a custom op (`pelab::chunked_attn`), opaque to torch.compile:
traced into a compiled step, its 16 unrolled blocks (T=4096) took minutes to compile, and the
document-masked GRAPE-AP step it produced on the H200 had non-finite gradients (bench/RESULTS.md).
"""

from __future__ import annotations

import torch
from pelab.models.kernels.bias import AttentionBias
from pelab.models.kernels.documents import same_document
from torch import Tensor


def _expand_kv(k: Tensor, n_heads: int) -> Tensor:
    """(B, Hkv, T, D) -> (B, Hq, T, D): query head h reads KV head h // group (repeat_interleave)."""
    group = n_heads // k.shape[1]
    return k if group == 1 else k.repeat_interleave(group, dim=1)


def _block(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    bias: Tensor | None,
    start: int,
    scale: float,
    docs: tuple[Tensor, Tensor] | None = None,
) -> Tensor:
    """Causal softmax attention of query rows start.. against keys 0..k.shape[2]-1, in fp32.
    docs: (query rows' doc ids (B, M), keys' doc ids (B, N)) to mask keys of other documents."""
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
    if bias is not None:
        scores = scores + bias
    rows = torch.arange(start, start + q.shape[2], device=q.device)[:, None]
    cols = torch.arange(k.shape[2], device=q.device)[None, :]
    hidden = cols > rows
    if docs is not None:
        hidden = hidden | ~same_document(*docs)
    scores = scores.masked_fill(hidden, float("-inf"))
    return torch.matmul(scores.softmax(dim=-1), v.float())


def dense_attention(
    q: Tensor, k: Tensor, v: Tensor, bias: AttentionBias | None, scale: float, doc_ids: Tensor | None = None
) -> Tensor:
    """fp32 reference. q: (B, Hq, T, D), k/v: (B, Hkv, T, D) -> (B, Hq, T, D) in q's dtype;
    doc_ids: optional (B, T) document ids (attention stays within each document)."""
    k, v = _expand_kv(k, q.shape[1]), _expand_kv(v, q.shape[1])
    docs = None if doc_ids is None else (doc_ids, doc_ids)
    out = _block(q, k, v, None if bias is None else bias.dense(), 0, scale, docs)
    return out.to(q.dtype)


def _block_rows(q, k, v, tensors, kind, floats, scale, start, end, doc_ids):
    """Output rows start..end-1 of chunked attention: q (B, Hq, end - start, D) against keys 0..end-1 of
    the unexpanded k, v (B, Hkv, T, D); the bias is rebuilt from its flattened fields."""
    k, v = _expand_kv(k[:, :, :end], q.shape[1]), _expand_kv(v[:, :, :end], q.shape[1])
    tile = None if not kind else AttentionBias.unflatten(kind, tensors, floats).tile(slice(start, end), end)
    docs = None if doc_ids is None else (doc_ids[:, start:end], doc_ids[:, :end])
    return _block(q, k, v, tile, start, scale, docs)


@torch.library.custom_op("pelab::chunked_attn", mutates_args=())
def chunked_attn(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    bias_tensors: list[Tensor],
    bias_kind: str,
    bias_floats: list[float],
    scale: float,
    block: int,
    doc_ids: Tensor | None,
) -> Tensor:
    with torch.autocast(q.device.type, enabled=False):
        T = q.shape[2]
        outs = [
            _block_rows(
                q[:, :, s : s + block], k, v, bias_tensors, bias_kind, bias_floats, scale, s, min(T, s + block), doc_ids
            )
            for s in range(0, T, block)
        ]
    return _bhtd_like(q).copy_(torch.cat(outs, dim=2))


def _bhtd_like(q: Tensor) -> Tensor:
    """A (B, H, T, D) view of a new (B, T, H, D) tensor, the layout the model reads back."""
    B, H, T, D = q.shape
    return q.new_empty(B, T, H, D).transpose(1, 2)


@chunked_attn.register_fake
def _(q, k, v, bias_tensors, bias_kind, bias_floats, scale, block, doc_ids):
    return _bhtd_like(q)


@torch.library.custom_op("pelab::chunked_attn_bwd", mutates_args=())
def chunked_attn_bwd(
    do: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    bias_tensors: list[Tensor],
    bias_kind: str,
    bias_floats: list[float],
    scale: float,
    block: int,
    doc_ids: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor, list[Tensor]]:
    """Gradients of `chunked_attn`: each query block is recomputed and differentiated on its own
    (torch.func.vjp works inside a custom op, where autograd does not)."""
    T = q.shape[2]
    f32 = [t.float() for t in (q, k, v)]
    dq = torch.empty_like(f32[0])
    dk, dv = torch.zeros_like(f32[1]), torch.zeros_like(f32[2])
    dts = [torch.zeros_like(t, dtype=torch.float32) for t in bias_tensors]
    with torch.autocast(q.device.type, enabled=False):
        for s in range(0, T, block):
            e = min(T, s + block)

            def rows(qb, kk, vv, *ts, s=s, e=e):
                return _block_rows(qb, kk, vv, list(ts), bias_kind, bias_floats, scale, s, e, doc_ids)

            _, vjp = torch.func.vjp(rows, f32[0][:, :, s:e], f32[1], f32[2], *bias_tensors)
            g = vjp(do[:, :, s:e].float())
            dq[:, :, s:e] = g[0]
            dk += g[1]
            dv += g[2]
            for acc, x in zip(dts, g[3:]):
                acc += x
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), [d.to(t.dtype) for d, t in zip(dts, bias_tensors)]


@chunked_attn_bwd.register_fake
def _(do, q, k, v, bias_tensors, bias_kind, bias_floats, scale, block, doc_ids):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), [torch.empty_like(t) for t in bias_tensors]


def _setup_context(ctx, inputs, output):
    q, k, v, bias_tensors, kind, floats, scale, block, doc_ids = inputs
    ctx.save_for_backward(q, k, v, doc_ids, *bias_tensors)
    ctx.args = (kind, floats, scale, block)


def _backward(ctx, do):
    q, k, v, doc_ids, *tensors = ctx.saved_tensors
    kind, floats, scale, block = ctx.args
    dq, dk, dv, dts = chunked_attn_bwd(do, q, k, v, tensors, kind, floats, scale, block, doc_ids)
    # the gradient structure mirrors the inputs' pytree, where an empty list is a node, not a leaf
    return dq, dk, dv, dts, None, ([] if not floats else None), None, None, None


chunked_attn.register_autograd(_backward, setup_context=_setup_context)


def chunked_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    bias: AttentionBias | None,
    scale: float,
    block: int = 256,
    doc_ids: Tensor | None = None,
) -> Tensor:
    kind, tensors, floats = ("", [], []) if bias is None else bias.flatten()
    return chunked_attn(q, k, v, tensors, kind, floats, float(scale), block, doc_ids)
