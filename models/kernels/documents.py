"""Document masking: which keys a query may see when several documents share one sequence.

The attention interface describes documents per token: `doc_ids` is an int32 (B, T) tensor whose
entries are non-decreasing along each row (documents are contiguous runs; the usual form is the
cumulative count of document starts). Key j is visible to query i iff j <= i and
doc_ids[b, j] == doc_ids[b, i], so every query sees at least itself. Packed-style boundaries
(`cu_seqlens`, as in varlen flash-attention) convert to this form with `doc_ids_from_cu_seqlens`.
All helpers are device-side tensor ops (no host sync).
"""

from __future__ import annotations

import torch
from torch import Tensor


def doc_ids_from_tokens(idx: Tensor, eot_id: int) -> Tensor:
    """(B, T) int32 document ids of token ids whose documents each begin with the end-of-text token
    (the shard format `[eot] + tokens`): the eot opens a new document, and tokens before a row's
    first eot (the tail of an earlier document) form document 0."""
    return (idx == eot_id).cumsum(dim=1, dtype=torch.int32)


def doc_ids_from_cu_seqlens(cu_seqlens: Tensor, batch: int, seq_len: int) -> Tensor:
    """(B, T) int32 ids from packed boundaries: documents cover tokens cu_seqlens[d]..cu_seqlens[d+1]-1
    of the (B * T) flattened batch (cu_seqlens[0] = 0, cu_seqlens[-1] = B * T, increasing). A
    document that runs over the end of a row continues as a separate document in the next row (rows
    never attend to each other anyway)."""
    flat = torch.arange(batch * seq_len, device=cu_seqlens.device, dtype=cu_seqlens.dtype)
    ids = torch.searchsorted(cu_seqlens[1:].contiguous(), flat, right=True)
    return ids.view(batch, seq_len).to(torch.int32)


def doc_bounds(doc_ids: Tensor) -> tuple[Tensor, Tensor]:
    """Per token, the first position of its document and one past its last, both int32 (B, T); the
    kernels derive the key range of a query block (and the query range of a key block) from them."""
    B, T = doc_ids.shape
    pos = torch.arange(T, device=doc_ids.device, dtype=torch.int32).expand(B, T)
    first = torch.ones_like(doc_ids, dtype=torch.bool)
    first[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    last = torch.ones_like(first)
    last[:, :-1] = first[:, 1:]
    start = torch.where(first, pos, 0).cummax(dim=1).values
    end = torch.where(last, pos + 1, T).flip(1).cummin(dim=1).values.flip(1)
    return start.to(torch.int32).contiguous(), end.to(torch.int32).contiguous()


def same_document(q_docs: Tensor, k_docs: Tensor) -> Tensor:
    """(B, 1, M, N) bool: query row m and key column n lie in the same document."""
    return q_docs[:, None, :, None] == k_docs[:, None, None, :]
