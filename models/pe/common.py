"""Small helpers shared by the positional encodings (no PE lives here)."""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn


def softplus_inverse(y: float) -> float:
    """x with softplus(x) = y (y > 0)."""
    return math.log(math.expm1(float(y)))


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


def cache_detached(module: nn.Module, name: str, value: Tensor) -> None:
    """Keep a detached view of a forward-pass tensor for `stats()` (no copy, no extra kernel)."""
    setattr(module, name, value.detach())
