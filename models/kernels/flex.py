"""`flex` backend (CUDA only): PyTorch FlexAttention (Triton templates) with a causal BlockMask
and a `score_mod` that adds a `LowRankBias` (captured fp32 tensors; gradients flow to them).

Pitfalls handled (kernels_and_pe_notes.md section 8.3):
- flex must run compiled: outside a compiled region one `torch.compile(flex_attention,
  dynamic=False)` wrapper is used, and Dynamo's recompile limit is raised so per-shape
  recompiles never drop to the ~25x slower unfused path.
- The same grad-requiring tensor may not be indexed twice in a score_mod: every rank term gets
  its own query-side and key-side tensor, and the diagonal shift uses a detached copy (its
  gradient is zero because the rows of dS sum to zero).
- Captured-tensor gradients fail once B*H*T^2 >= 2^31: such calls are split along the batch.
- The causal BlockMask is built once per (T, device) and cached.
The bias is evaluated in the row-shifted form sum_r a_r[i] * (b_r[j] - b_r[i]) like the triton
kernel, so large position or cumulative-gate terms keep their fp32 precision.

Document masking (`doc_ids`), outside torch.compile only (`supports_docs`): a per-call BlockMask (it
depends on the data, so it is not cached) computed from the document bounds at block level, with the
mask_mod "causal and same document" for the partial blocks; fully masked blocks are skipped.
"""

from __future__ import annotations

import torch
from pelab.models.kernels.bias import LowRankBias
from pelab.models.kernels.documents import doc_bounds
from torch import Tensor

MAX_RANK = 4
BLOCK = 128  # FlexAttention's default sparse block size
_INT_LIMIT = 2**31
_MASKS: dict[tuple[int, str], object] = {}
_COMPILED: list = []


def available() -> bool:
    try:
        from torch.nn.attention.flex_attention import flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


def _compiled_flex():
    if not _COMPILED:
        import torch._dynamo
        from torch.nn.attention.flex_attention import flex_attention

        cfg = torch._dynamo.config
        for name in ("recompile_limit", "cache_size_limit"):
            if hasattr(cfg, name):
                setattr(cfg, name, max(getattr(cfg, name), 64))
        _COMPILED.append(torch.compile(flex_attention, dynamic=False))
    return _COMPILED[0]


def _causal(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


def _key(T: int, device) -> tuple[int, str, int]:
    device = torch.device(device)
    index = device.index if device.index is not None else (torch.cuda.current_device() if device.type == "cuda" else 0)
    return T, device.type, index


@torch.compiler.disable
def _build_mask(T: int, device: torch.device):
    from torch.nn.attention.flex_attention import create_block_mask

    key = _key(T, device)
    if key not in _MASKS:
        _MASKS[key] = create_block_mask(_causal, None, None, T, T, device=torch.device(key[1], key[2]))
    return _MASKS[key]


def _dense_to_ordered(dense: Tensor) -> tuple[Tensor, Tensor]:
    """(..., rows, cols) 0/1 block mask -> (blocks per row, their column indices first), int32."""
    dense = dense.to(torch.int32)
    order = torch.argsort(dense, dim=-1, descending=True, stable=True)
    return dense.sum(-1).to(torch.int32).contiguous(), order.to(torch.int32).contiguous()


def _document_block_mask(doc_ids: Tensor, block: int = BLOCK):
    """BlockMask for (B, T) document ids: key j visible to query i iff j <= i and same document.

    Built from block-level arithmetic on the document bounds (O(B (T/128)^2) work) instead of
    create_block_mask's evaluation of the mask_mod at all B T^2 (i, j) pairs on every call; both give
    the same mask (tests). Query block m (rows r0..r1) sees keys start(r0)..r1, since a query's
    visible keys are start(i)..i and start is non-decreasing; a key block (c0..c1) is fully visible
    to every row iff c1 <= r0 and start(r1) <= c0. The mask_mod still masks the partial blocks."""
    from torch.nn.attention.flex_attention import BlockMask

    B, T = doc_ids.shape
    n = -(-T // block)
    start, _ = doc_bounds(doc_ids)
    lo = torch.arange(n, device=doc_ids.device) * block  # first row / column of each block
    hi = torch.clamp(lo + block - 1, max=T - 1)  # last row / column
    start_lo = start[:, lo][:, None, :, None]  # (B, 1, M, 1): document start of each block's first row
    start_hi = start[:, hi][:, None, :, None]
    c_lo, c_hi = lo[None, None, None, :], hi[None, None, None, :]
    r_lo, r_hi = lo[None, None, :, None], hi[None, None, :, None]
    visible = (c_lo <= r_hi) & (c_hi >= start_lo)
    whole = (hi - lo + 1 == block)[None, None, None, :] & (hi - lo + 1 == block)[None, None, :, None]
    full = (c_hi <= r_lo) & (start_hi <= c_lo) & whole
    partial = visible & ~full

    def document_causal(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (doc_ids[b, q_idx] == doc_ids[b, kv_idx])

    kv_num, kv_idx = _dense_to_ordered(partial)
    full_kv_num, full_kv_idx = _dense_to_ordered(full)
    q_num, q_idx = _dense_to_ordered(partial.transpose(-2, -1))
    full_q_num, full_q_idx = _dense_to_ordered(full.transpose(-2, -1))
    return BlockMask(
        (T, T),
        kv_num,
        kv_idx,
        full_kv_num,
        full_kv_idx,
        q_num,
        q_idx,
        full_q_num,
        full_q_idx,
        (block, block),
        document_causal,
    )


def causal_block_mask(T: int, device: torch.device):
    """Cached causal BlockMask. Call once before a compiled step (the benchmark does) to avoid a
    graph break at the first trace; a cache hit inside a compiled region is a plain global read."""
    mask = _MASKS.get(_key(T, device))
    return mask if mask is not None else _build_mask(T, device)


def _score_mod(a_terms, b_terms, d_terms, batch_bcast: bool, head_bcast: bool):
    def score_mod(score, b, h, q_idx, kv_idx):
        bi = 0 if batch_bcast else b
        hi = 0 if head_bcast else h
        for a_r, b_r, d_r in zip(a_terms, b_terms, d_terms):
            score = score + a_r[bi, hi, q_idx] * (b_r[bi, hi, kv_idx] - d_r[bi, hi, q_idx])
        return score

    return score_mod


def flex_lowrank_attention(
    q: Tensor, k: Tensor, v: Tensor, bias: LowRankBias | None, scale: float, doc_ids: Tensor | None = None
) -> Tensor:
    B, H, T, D = q.shape
    fn = None
    if torch.compiler.is_compiling():
        from torch.nn.attention.flex_attention import flex_attention as fn
    else:
        fn = _compiled_flex()

    def mask_for(sl: slice):
        return causal_block_mask(T, q.device) if doc_ids is None else _document_block_mask(doc_ids[sl])

    gqa = H != k.shape[1]
    if bias is None:
        return fn(q, k, v, block_mask=mask_for(slice(None)), scale=scale, enable_gqa=gqa)
    a, b = bias.q_terms.float(), bias.k_terms.float()
    R = bias.rank
    # one distinct tensor per (side, rank term): never index a grad tensor twice in a score_mod
    a_terms = [a[..., r].contiguous() for r in range(R)]
    b_terms = [b[..., r].contiguous() for r in range(R)]
    d_terms = [b[..., r].detach().contiguous() for r in range(R)]
    bb, hb = a.shape[0] == 1, a.shape[1] == 1
    if (bb, hb) != (b.shape[0] == 1, b.shape[1] == 1):  # mixed broadcast: expand both to full
        a_terms = [t.expand(B, H, T).contiguous() for t in a_terms]
        b_terms = [t.expand(B, H, T).contiguous() for t in b_terms]
        d_terms = [t.expand(B, H, T).contiguous() for t in d_terms]
        bb = hb = False
    needs_grad = torch.is_grad_enabled() and (a.requires_grad or b.requires_grad)
    chunk = B
    if needs_grad:
        chunk = max(1, (_INT_LIMIT - 1) // (H * T * T))
    if chunk >= B:
        return fn(
            q,
            k,
            v,
            score_mod=_score_mod(a_terms, b_terms, d_terms, bb, hb),
            block_mask=mask_for(slice(None)),
            scale=scale,
            enable_gqa=gqa,
        )
    outs = []
    for s in range(0, B, chunk):
        sl = slice(s, s + chunk)
        at = a_terms if bb else [t[sl] for t in a_terms]
        bt = b_terms if bb else [t[sl] for t in b_terms]
        dt = d_terms if bb else [t[sl] for t in d_terms]
        outs.append(
            fn(
                q[sl],
                k[sl],
                v[sl],
                score_mod=_score_mod(at, bt, dt, bb, hb),
                block_mask=mask_for(sl),
                scale=scale,
                enable_gqa=gqa,
            )
        )
    return torch.cat(outs, dim=0)


def _needs_grad(bias: LowRankBias) -> bool:
    return bias.q_terms.requires_grad or bias.k_terms.requires_grad


def supports_constant(q: Tensor, k: Tensor, v: Tensor, bias) -> bool:
    """Constant biases only (no factor needs a gradient, e.g. ALiBi): there flex beats the triton
    kernel (fwd+bwd 1.42x vs 1.61x cuDNN at B20 H8 T4096 D128), with gradients it loses."""
    return isinstance(bias, LowRankBias) and not _needs_grad(bias) and supports(q, k, v, bias)


def supports(q: Tensor, k: Tensor, v: Tensor, bias) -> bool:
    if bias is None:
        return False  # plain causal: cuDNN / FlashAttention are faster
    return _runs(q, k, v, bias)


def _runs(q: Tensor, k: Tensor, v: Tensor, bias) -> bool:
    if not (q.is_cuda and q.dtype in (torch.bfloat16, torch.float16) and available()):
        return False
    if bias is not None and (not isinstance(bias, LowRankBias) or bias.rank > MAX_RANK):
        return False
    return q.shape[-1] in (16, 32, 64, 128) and q.shape[-1] == k.shape[-1] == v.shape[-1]


def supports_docs(q: Tensor, k: Tensor, v: Tensor, bias) -> bool:
    """With document ids: also plain causal attention (which cuDNN / FlashAttention cannot mask), but
    only outside torch.compile. Inside a compiled step the document-masked FlexAttention call hit an
    illegal memory access on the H200 (torch 2.11: no-grad evaluation with create_block_mask and with
    `_document_block_mask`, training with the latter; bench/RESULTS.md), so there `auto` takes the
    triton kernel."""
    return not torch.compiler.is_compiling() and _runs(q, k, v, bias)


def supports_constant_docs(q: Tensor, k: Tensor, v: Tensor, bias) -> bool:
    return supports_constant(q, k, v, bias) and supports_docs(q, k, v, bias)


def run(q, k, v, bias, scale, doc_ids=None):
    return flex_lowrank_attention(q, k, v, bias, scale, doc_ids)
