"""RoPE (Su et al.) with half-split pairs (x[i], x[i + D/2]) and fp32 angles, as in the GRAPE code.

Context extension for evaluation or continued training (as used by RoPE++): a new `base`
(e.g. 10k -> 500k), linear position interpolation (`scaling=linear`, every frequency / factor)
or YaRN (`scaling=yarn`).
"""

from __future__ import annotations

import math

import torch
from pelab.models.pe import register
from pelab.models.pe.base import PositionalEncoding
from pelab.models.pe.common import half_split_cos_sin
from torch import Tensor


def rope_inv_freq(
    head_dim: int, base: float, scaling: str = "none", factor: float = 1.0, original_max_len: int = 4096
) -> tuple[Tensor, float]:
    """Per-pair frequencies theta_i = base^(-2i/D) and the YaRN magnitude scale (1.0 otherwise)."""
    inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    if scaling == "none" or factor == 1.0:
        return inv_freq.float(), 1.0
    if scaling == "linear":
        return (inv_freq / factor).float(), 1.0
    if scaling == "yarn":
        # Ramp over the number of rotations r each pair makes in the original context:
        # r < 1 -> fully interpolated, r > 32 -> untouched (alpha=1, beta=32).
        rotations = original_max_len * inv_freq / (2 * math.pi)
        keep = ((rotations - 1.0) / (32.0 - 1.0)).clamp(0.0, 1.0)
        inv_freq = (1 - keep) * inv_freq / factor + keep * inv_freq
        return inv_freq.float(), 0.1 * math.log(factor) + 1.0
    raise ValueError(f"unknown rope scaling {scaling!r}; choose none, linear or yarn")


def rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rope_cos_sin(positions: Tensor, inv_freq: Tensor, magnitude: float = 1.0) -> tuple[Tensor, Tensor]:
    """cos/sin of shape (T, 1, D) in fp32, broadcastable over (B, T, H, D)."""
    cos, sin = half_split_cos_sin(positions.float()[:, None] * inv_freq.float()[None, :])
    if magnitude != 1.0:
        cos, sin = cos * magnitude, sin * magnitude
    return cos[:, None, :], sin[:, None, :]


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate every (x[i], x[i+D/2]) pair by its angle, computed in fp32."""
    xf = x.float()
    return (xf * cos + rotate_half(xf) * sin).to(x.dtype)


@register("rope")
class RoPE(PositionalEncoding):
    def __init__(
        self,
        shape,
        base: float = 10000.0,
        before_qk_norm: bool = True,
        scaling: str = "none",
        factor: float = 1.0,
        original_max_len: int = 4096,
    ):
        super().__init__(shape)
        if shape.head_dim % 2:
            raise ValueError(f"RoPE needs an even head_dim, got {shape.head_dim}")
        self.before_qk_norm = before_qk_norm
        self.base = base
        inv_freq, self.magnitude = rope_inv_freq(shape.head_dim, base, scaling, factor, original_max_len)
        # Not persistent: derived from config, so a checkpoint can be evaluated with another base.
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def transform_qk(self, q, k, x, positions):
        cos, sin = rope_cos_sin(positions, self.inv_freq, self.magnitude)
        return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
