"""Portable attention paths: the dense fp32 reference and a memory-frugal chunked kernel.

Both accept every bias type through `AttentionBias.tile`, and document masking (`doc_ids`, see
`models.kernels.documents`). The chunked kernel processes query
blocks against their key prefix and recomputes each block in backward (activation
checkpointing), so memory stays O(block * T) instead of O(T^2); it runs anywhere, including CPU.
"""

from __future__ import annotations

import torch
from pelab.models.kernels.bias import AttentionBias
from pelab.models.kernels.documents import same_document
from torch import Tensor
from torch.utils.checkpoint import checkpoint


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


def chunked_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    bias: AttentionBias | None,
    scale: float,
    block: int = 256,
    doc_ids: Tensor | None = None,
) -> Tensor:
    k, v = _expand_kv(k, q.shape[1]), _expand_kv(v, q.shape[1])
    T = q.shape[2]
    outs = []
    for start in range(0, T, block):
        end = min(T, start + block)

        def run(qb, kb, vb, start=start, end=end):
            tile = None if bias is None else bias.tile(slice(start, end), end)
            docs = None if doc_ids is None else (doc_ids[:, start:end], doc_ids[:, :end])
            return _block(qb, kb, vb, tile, start, scale, docs)

        qb, kb, vb = q[:, :, start:end], k[:, :, :end], v[:, :, :end]
        needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (qb, kb, vb))
        outs.append(checkpoint(run, qb, kb, vb, use_reentrant=False) if needs_grad else run(qb, kb, vb))
    return torch.cat(outs, dim=2).to(q.dtype)
