"""Small helpers shared by the positional encodings (no PE lives here)."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


def softplus_inverse(y: float) -> float:
    """x with softplus(x) = y (y > 0)."""
    return math.log(math.expm1(float(y)))


def grape_global_init_(linear: nn.Linear, d_model: int) -> None:
    """A PE's Linear layer as the GRAPE code's global init (model/init_utils.py) leaves it: the weight
    N(0, 0.5/sqrt(d_model)) (it redraws every >= 2-D parameter it does not exclude), the bias at PyTorch's
    default U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (it never touches 1-D parameters)."""
    nn.init.normal_(linear.weight, 0.0, 0.5 / math.sqrt(d_model))
    if linear.bias is not None:
        bound = 1.0 / math.sqrt(linear.in_features)
        nn.init.uniform_(linear.bias, -bound, bound)


def centered_positions(positions: Tensor) -> Tensor:
    """fp32 positions minus the window's middle position.

    Additive biases that are linear in positions (ALiBi, GRAPE-A) only need p_i - p_j, so any
    constant offset is free; centring halves the magnitudes the low-rank factors carry (fp32
    rounding ~ |value| * 6e-8) and makes the factors exactly invariant to a global shift.
    """
    return (positions - positions[positions.shape[0] // 2]).float()


class FP32Params(nn.Module):
    """Keeps the parameters named in `fp32_params` in fp32 through `.to(dtype)` / `.half()` casts
    (the GRAPE code forces its log-frequencies to fp32 the same way)."""

    fp32_params: tuple[str, ...] = ()

    def _apply(self, fn, recurse=True):
        saved = {}
        for name in self.fp32_params:
            p = getattr(self, name, None)
            if isinstance(p, Tensor) and p.dtype == torch.float32:
                saved[name] = p.data
        out = super()._apply(fn, recurse)
        for name, data in saved.items():
            p = getattr(self, name)
            if p.dtype != torch.float32:  # a dtype cast: keep the exact fp32 values (device moves still apply)
                p.data = data.to(device=p.device)
        return out


def repeat_kv(x: Tensor, n_heads: int, dim: int) -> Tensor:
    """Key/value heads at `dim` -> one per query head: query head h reads KV head h // (n_heads / Hkv),
    the grouped-query layout of every attention kernel (repeat_interleave)."""
    group = n_heads // x.shape[dim]
    return x if group == 1 else x.repeat_interleave(group, dim=dim)


def cache_detached(module: nn.Module, name: str, value: Tensor) -> None:
    """Keep a detached view of a forward-pass tensor for `stats()` (no copy, no extra kernel)."""
    setattr(module, name, value.detach())


@torch.library.custom_op("pelab::cos_sin", mutates_args=())
def _cos_sin(angles: Tensor) -> tuple[Tensor, Tensor]:
    return angles.cos(), angles.sin()


@_cos_sin.register_fake
def _(angles):
    return torch.empty_like(angles), torch.empty_like(angles)


def _cos_sin_setup(ctx, inputs, output):
    ctx.save_for_backward(*output)


def _cos_sin_backward(ctx, grad_cos, grad_sin):
    cos, sin = ctx.saved_tensors
    grad = torch.zeros_like(cos)
    if grad_cos is not None:
        grad = grad - sin * grad_cos
    if grad_sin is not None:
        grad = grad + cos * grad_sin
    return grad


_cos_sin.register_autograd(_cos_sin_backward, setup_context=_cos_sin_setup)


def half_split_cos_sin(angles: Tensor) -> tuple[Tensor, Tensor]:
    """(..., D/2) fp32 angles -> cos, sin of shape (..., D) for the half-split rotary layout.

    cos/sin run as one opaque op: left to the compiler, they were inlined into the rotation kernel
    and recomputed for every (batch, head) element with libdevice's large-argument sin/cos (a 22 ms
    kernel per 355M step on the H200, bench/NOTES.md); this way the small table is computed once.
    """
    cos, sin = _cos_sin(angles.float().contiguous())
    return torch.cat((cos, cos), dim=-1), torch.cat((sin, sin), dim=-1)
