"""A faster drop-in for `models.loss.linear_cross_entropy` (same arguments and returns), measured in
`python -m bench.bench --micro-ce` (bench/NOTES.md).

Same algorithm (row chunks; each chunk's logits are formed, reduced, turned into gradients for the
hidden states and the head weight, and freed, all in forward), but
- the per-chunk softmax-gradient math runs as one compiled (inductor) kernel over the bf16 logits
  instead of ~6 separate fp32 passes (`.float()`, logsumexp, exp, scatter, scale, cast);
- the weight gradient is formed as hidden^T @ g (C x V, a layout cuBLAS runs with its Hopper
  kernels) and accumulated in fp32.
Not wired in: `models/loss.py` belongs to the trainer; switching is a one-line change there.
"""
from __future__ import annotations

import torch
from torch import Tensor

IGNORE_INDEX = -100
_COMPILED: dict[str, object] = {}


def _softmax_grad(logits: Tensor, targets: Tensor, scale: Tensor, z_loss: float):
    """logits (n, V) bf16/fp32 -> g = d(sum_i scale_i * (lse_i - logit_i,t + z lse_i^2))/dlogits (in
    logits' dtype) and the fp32 sums of loss, lse and lse^2 over the rows (weighted by scale > 0)."""
    lf = logits.float()
    lse = torch.logsumexp(lf, dim=-1)
    safe_t = targets.clamp(min=0)
    tgt = lf.gather(1, safe_t[:, None])[:, 0]
    valid = (scale > 0).float()
    g = torch.exp(lf - lse[:, None]) * (1.0 + 2.0 * z_loss * lse[:, None])
    onehot = torch.arange(lf.shape[1], device=lf.device)[None, :] == safe_t[:, None]
    g = (g - onehot.float()) * scale[:, None]
    sums = torch.stack([((lse - tgt) * valid).sum(), (lse * valid).sum(), (lse.square() * valid).sum()])
    return g.to(logits.dtype), sums


def _kernel(device_type: str):
    if device_type != "cuda":
        return _softmax_grad
    if "cuda" not in _COMPILED:
        _COMPILED["cuda"] = torch.compile(_softmax_grad, dynamic=False)
    return _COMPILED["cuda"]


class _FastLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk, z_loss, grad_enabled):
        n = hidden.shape[0]
        valid = targets != IGNORE_INDEX
        count = valid.sum().clamp(min=1).float()
        w = weight.to(hidden.dtype)
        need_h = ctx.needs_input_grad[0] and grad_enabled
        need_w = ctx.needs_input_grad[1] and grad_enabled
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_wt = torch.zeros(weight.shape[1], weight.shape[0], dtype=torch.float32, device=weight.device) if need_w else None
        sums = torch.zeros(3, dtype=torch.float32, device=hidden.device)
        scale_all = valid.float() / count
        fn = _kernel(hidden.device.type)
        for s in range(0, n, chunk):
            h, t = hidden[s:s + chunk], targets[s:s + chunk]
            logits = h @ w.t()
            g, part = fn(logits, t, scale_all[s:s + chunk], z_loss)
            del logits
            sums += part
            if need_h:
                torch.mm(g, w, out=grad_h[s:s + chunk])
            if need_w:
                grad_wt += h.t() @ g  # (C, V): cuBLAS's fast layout; fp32 accumulation across chunks
        ctx.save_for_backward(grad_h, grad_wt)
        ctx.weight_dtype = weight.dtype
        loss = sums[0] / count + z_loss * sums[2] / count
        lse, lse_sq = sums[1] / count, sums[2] / count
        ctx.mark_non_differentiable(lse, lse_sq)
        return loss, lse, lse_sq

    @staticmethod
    def backward(ctx, grad_loss, _g_lse, _g_lse_sq):
        grad_h, grad_wt = ctx.saved_tensors
        dh = grad_h * grad_loss.to(grad_h.dtype) if grad_h is not None else None
        dw = (grad_wt.t() * grad_loss).to(ctx.weight_dtype) if grad_wt is not None else None
        return dh, dw, None, None, None, None


def linear_cross_entropy_fast(hidden: Tensor, weight: Tensor, targets: Tensor, chunk_rows: int = 8192,
                              z_loss: float = 0.0) -> tuple[Tensor, Tensor, Tensor]:
    """Same contract as `models.loss.linear_cross_entropy` (chunk_rows > 0 path)."""
    return _FastLinearCrossEntropy.apply(hidden, weight, targets, chunk_rows, z_loss, torch.is_grad_enabled())
