"""LM head + cross-entropy fused over row chunks, so fp32 logits for the whole batch never exist.

At T=4096 and micro-batch 20 the 355M model would need 88 GB for full fp32 logits. Here each
chunk's logits are formed, reduced to loss/logsumexp, turned into gradients for the hidden
states and the head weight, and freed, all in forward (as Liger's FLCE does). It also returns
logsumexp statistics for stability logging and supports a z-loss term (PaLM).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor

IGNORE_INDEX = -100
# CPU chunks hold at most this many logits (32 MiB in fp32; 166 rows of a 50k vocabulary), formed in
# one reused buffer: fastest of 16-1024 rows on 1 and 2 cores. GPU-sized chunks ran the CPU GEMMs
# several times slower and spent a third of the time in page faults of fresh (n, V) temporaries.
CPU_CHUNK_LOGITS = 1 << 23


def _softmax_grad(logits: Tensor, targets: Tensor, scale: Tensor, z_loss: float):
    """Gradient of sum_i scale_i * (lse_i - logit_i,t + z lse_i^2) w.r.t. the (n, V) logits (in their
    dtype), and the fp32 sums of loss, lse and lse^2 over the valid rows. One fused kernel on GPU."""
    lf = logits.float()
    lse = torch.logsumexp(lf, dim=-1)
    safe_t = targets.clamp(min=0)
    target_logit = lf.gather(1, safe_t[:, None])[:, 0]
    valid = (scale > 0).float()
    g = torch.exp(lf - lse[:, None]) * (1.0 + 2.0 * z_loss * lse[:, None])
    onehot = torch.arange(lf.shape[1], device=lf.device)[None, :] == safe_t[:, None]
    g = (g - onehot.float()) * scale[:, None]
    sums = torch.stack([((lse - target_logit) * valid).sum(), (lse * valid).sum(), (lse.square() * valid).sum()])
    return g.to(logits.dtype), sums


@functools.cache
def _compiled_softmax_grad():
    return torch.compile(_softmax_grad, dynamic=False)


def _softmax_grad_cpu(logits: Tensor, targets: Tensor, scale: Tensor, z_loss: float, need_grad: bool):
    """`_softmax_grad` for fp32 CPU chunks, in place: the logits become the gradient and no other (n, V)
    tensor is made; without `need_grad` (validation) only the sums."""
    safe_t = targets.clamp(min=0)
    target_logit = logits.gather(1, safe_t[:, None])[:, 0]
    row_max = logits.amax(dim=-1)
    p = logits.sub_(row_max[:, None]).exp_()
    exp_sum = p.sum(dim=-1)
    lse = row_max + exp_sum.log()
    valid = (scale > 0).float()
    sums = torch.stack([((lse - target_logit) * valid).sum(), (lse * valid).sum(), (lse.square() * valid).sum()])
    if not need_grad:
        return None, sums
    p.mul_((scale * (1.0 + 2.0 * z_loss * lse) / exp_sum)[:, None])
    return p.scatter_add_(1, safe_t[:, None], -scale[:, None]), sums


def _softmax_grad_fn(device_type: str):
    # Compiled on GPU: one pass over the bf16 logits instead of ~6 separate fp32 passes
    # (123 -> 48 ms per 20 x 4096-token micro-batch of the 355M model on an H200, bench/NOTES.md).
    return _compiled_softmax_grad() if device_type == "cuda" else _softmax_grad


def _chunks(hidden, weight, targets, scale, chunk, z_loss, need_h, need_w):
    """(grad_h, grad_w, sums) over row chunks: the loss sums, and the gradients of the summed loss."""
    w = weight.to(hidden.dtype)
    grad_h = torch.empty_like(hidden) if need_h else None
    # Weight gradient kept transposed (C, V): the layout cuBLAS runs with its fast Hopper kernels.
    grad_wt = (
        torch.zeros(weight.shape[1], weight.shape[0], dtype=torch.float32, device=weight.device) if need_w else None
    )
    sums = torch.zeros(3, dtype=torch.float32, device=hidden.device)
    softmax_grad = _softmax_grad_fn(hidden.device.type)
    for s in range(0, hidden.shape[0], chunk):
        h = hidden[s : s + chunk]
        logits = h @ w.t()
        g, part = softmax_grad(logits, targets[s : s + chunk], scale[s : s + chunk], z_loss)
        del logits
        sums += part
        if need_h:
            torch.mm(g, w, out=grad_h[s : s + chunk])
        if need_w:
            grad_wt += h.t() @ g  # fp32 accumulation across chunks
    return grad_h, grad_wt.t() if need_w else None, sums


def _chunks_cpu(hidden, weight, targets, scale, chunk, z_loss, need_h, need_w):
    """`_chunks` for CPU, in fp32: cache-sized chunks through one reused logits buffer, the softmax
    gradient formed in place, and the weight gradient accumulated in place in the weight's (V, C) layout."""
    h_all, w = hidden.float(), weight.float()
    chunk = min(chunk, max(1, CPU_CHUNK_LOGITS // w.shape[0]))
    buffer = torch.empty(min(chunk, h_all.shape[0]), w.shape[0])
    grad_h = torch.empty_like(h_all) if need_h else None
    grad_w = torch.zeros_like(w) if need_w else None
    sums = torch.zeros(3)
    for s in range(0, h_all.shape[0], chunk):
        h = h_all[s : s + chunk]
        logits = torch.mm(h, w.t(), out=buffer[: h.shape[0]])
        g, part = _softmax_grad_cpu(logits, targets[s : s + chunk], scale[s : s + chunk], z_loss, need_h or need_w)
        sums += part
        if need_h:
            torch.mm(g, w, out=grad_h[s : s + chunk])
        if need_w:
            grad_w.addmm_(g.t(), h)
    return grad_h.to(hidden.dtype) if need_h else None, grad_w, sums


class _FusedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, targets: Tensor, chunk: int, z_loss: float, grad_enabled: bool):
        valid = targets != IGNORE_INDEX
        count = valid.sum().clamp(min=1).float()
        # forward() always runs with grad mode off; the caller's mode says whether to form gradients
        # (validation under no_grad skips that work).
        need_h = ctx.needs_input_grad[0] and grad_enabled
        need_w = ctx.needs_input_grad[1] and grad_enabled
        chunks = _chunks_cpu if hidden.device.type == "cpu" else _chunks
        grad_h, grad_w, sums = chunks(hidden, weight, targets, valid.float() / count, chunk, z_loss, need_h, need_w)
        ctx.save_for_backward(grad_h, grad_w)
        ctx.weight_dtype = weight.dtype
        loss = sums[0] / count + z_loss * sums[2] / count
        lse, lse_sq = sums[1] / count, sums[2] / count
        ctx.mark_non_differentiable(lse, lse_sq)
        return loss, lse, lse_sq

    @staticmethod
    def backward(ctx, grad_loss, _g_lse, _g_lse_sq):
        grad_h, grad_w = ctx.saved_tensors
        dh = grad_h * grad_loss.to(grad_h.dtype) if grad_h is not None else None
        dw = (grad_w * grad_loss).to(ctx.weight_dtype) if grad_w is not None else None
        return dh, dw, None, None, None, None


def linear_cross_entropy(
    hidden: Tensor, weight: Tensor, targets: Tensor, chunk_rows: int = 8192, z_loss: float = 0.0
) -> tuple[Tensor, Tensor, Tensor]:
    """Mean CE of softmax(hidden @ weight.T) against targets (IGNORE_INDEX skipped), plus
    z_loss * mean(lse^2). hidden: (N, C), weight: (V, C), targets: (N,).

    Returns (loss, mean logsumexp, mean logsumexp^2); the last two carry no gradient.
    chunk_rows <= 0 uses plain full logits (reference path)."""
    if chunk_rows <= 0:
        logits = (hidden @ weight.to(hidden.dtype).t()).float()
        lse = torch.logsumexp(logits, dim=-1)
        valid = (targets != IGNORE_INDEX).float()
        count = valid.sum().clamp(min=1)
        loss = F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX)
        lse_mean = (lse * valid).sum() / count
        lse_sq = (lse.square() * valid).sum() / count
        return loss + z_loss * lse_sq, lse_mean.detach(), lse_sq.detach()
    return _FusedLinearCrossEntropy.apply(hidden, weight, targets, chunk_rows, z_loss, torch.is_grad_enabled())
