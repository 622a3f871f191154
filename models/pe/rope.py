"""RoPE (Su et al.) with half-split pairs (x[i], x[i + D/2]) and fp32 angles.

Rotation direction: every pair is rotated counter-clockwise, (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin)
(`rotate_half` as in Hugging Face and the RoPE++ code). The GRAPE code rotates clockwise,
(x1 cos + x2 sin, x2 cos - x1 sin): the same model up to negating the second half of each head's q and k
projection rows (`convert_rotation`), also with QK-RMSNorm after the rotation (the sign commutes with the norm).

The rotation comes before the QK-RMSNorm by default (`before_qk_norm: true`, the GRAPE code's order). With
learned norm gains that differ within a rotary pair, the scores are then not a function of i - j alone;
`before_qk_norm: false` rotates after the norm (Hugging Face's Llama/Qwen3 order), which keeps them relative.

Context extension for evaluation or continued training (`RotaryContext`, as used by RoPE++): a new `base`
(e.g. 10k -> 500k), linear position interpolation (`scaling=linear`, every frequency / factor) or YaRN
(`scaling=yarn`, with its attention temperature).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch
from pelab.models.pe import available, options, register
from pelab.models.pe.base import PositionalEncoding
from pelab.models.pe.common import half_split_cos_sin
from torch import Tensor

ROPE_SCALINGS = ("none", "linear", "yarn")


def rope_inv_freq(
    head_dim: int, base: float, scaling: str = "none", factor: float = 1.0, original_max_len: int = 4096
) -> tuple[Tensor, float]:
    """Per-pair frequencies theta_i = base^(-2i/D) (scaled) and YaRN's mscale = 0.1 ln(factor) + 1
    (1.0 otherwise), the factor YaRN and the RoPE++ code put on cos and sin, so mscale^2 on the logits."""
    inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    if scaling == "none" or factor == 1.0:
        return inv_freq.float(), 1.0
    if scaling == "linear":
        return (inv_freq / factor).float(), 1.0
    if scaling == "yarn":
        return yarn_frequencies(inv_freq, factor, original_max_len).float(), 0.1 * math.log(factor) + 1.0
    raise ValueError(f"unknown rope scaling {scaling!r}; choose one of {', '.join(ROPE_SCALINGS)}")


def yarn_frequencies(theta: Tensor, factor: float, original_max_len: int) -> Tensor:
    """YaRN's per-frequency ramp over the rotations r each pair makes in the original context:
    r < 1 -> fully interpolated (theta / factor), r > 32 -> untouched (alpha=1, beta=32, as in RoPE++)."""
    rotations = original_max_len * theta / (2 * math.pi)
    keep = ((rotations - 1.0) / (32.0 - 1.0)).clamp(0.0, 1.0)
    return (1 - keep) * theta / factor + keep * theta


@dataclass(frozen=True)
class RotaryContext:
    """The context-extension knobs of a rotary PE (`pe.base`, `pe.scaling`, `pe.factor`, `pe.original_max_len`)."""

    base: float = 10000.0
    scaling: str = "none"
    factor: float = 1.0
    original_max_len: int = 4096

    def __post_init__(self):
        if self.scaling not in ROPE_SCALINGS:
            raise ValueError(f"unknown pe.scaling={self.scaling!r}; choose one of {', '.join(ROPE_SCALINGS)}")
        if self.base <= 1 or self.factor <= 0 or self.original_max_len < 1:
            raise ValueError(f"bad rotary context {self}: need base > 1, factor > 0, original_max_len >= 1")

    @classmethod
    def keys(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))

    @classmethod
    def of(cls, pe_cfg: dict) -> RotaryContext:
        """The knobs of a PE config dict (missing or null keys take their defaults)."""
        given = {k: pe_cfg[k] for k in cls.keys() if pe_cfg.get(k) is not None}
        for k, cast in (("base", float), ("factor", float), ("original_max_len", int)):
            if k in given:
                given[k] = cast(given[k])
        return cls(**given)

    @property
    def scaled(self) -> bool:
        return self.scaling != "none" and self.factor != 1.0

    def inv_freq(self, head_dim: int) -> Tensor:
        return rope_inv_freq(head_dim, self.base, self.scaling, self.factor, self.original_max_len)[0]

    @property
    def logit_scale(self) -> float:
        """YaRN's attention temperature as a factor on the logits (mscale^2; 1.0 without YaRN)."""
        mscale = rope_inv_freq(2, self.base, self.scaling, self.factor, self.original_max_len)[1]
        return mscale * mscale

    def rescale(self, theta: Tensor, head_dim: int, trained: RotaryContext) -> Tensor:
        """Learned frequencies theta (..., m) (plane i starting at RoPE's base^(-2i/D)) trained under
        `trained`, moved to these knobs the way they move RoPE's i-th frequency:
          base b -> b':  theta_i * (b / b')^(2i/D)   (ABF / the RoPE++ 10k -> 500k stage),
          linear s:      theta / s,
          yarn s:        YaRN's ramp on the learned theta (`yarn_frequencies`)."""
        if trained.scaled and (trained.scaling, trained.factor, trained.original_max_len) != (
            self.scaling,
            self.factor,
            self.original_max_len,
        ):
            raise ValueError(
                f"learned frequencies trained with scaling={trained.scaling} factor={trained.factor:g} cannot be "
                f"rescaled to scaling={self.scaling} factor={self.factor:g}; extend from an unscaled checkpoint"
            )
        idx = torch.arange(theta.shape[-1], dtype=torch.float64, device=theta.device)
        log_theta = theta.double().log() + (2 * idx / head_dim) * (math.log(trained.base) - math.log(self.base))
        theta = log_theta.exp()
        if self.scaled and not trained.scaled:
            if self.scaling == "linear":
                theta = theta / self.factor
            else:
                theta = yarn_frequencies(theta, self.factor, self.original_max_len)
        return theta


def context_keys(pe_name: str) -> list[str]:
    """The context-extension knobs PE `pe_name` takes: the `RotaryContext` keys among its constructor's options
    (all four for the rotary PEs rope, ropepp_*, grape_m*; none for the others)."""
    own = {key for key, _, _ in options(pe_name)}
    return [key for key in RotaryContext.keys() if key in own]


def check_context_extension(pe_name: str, keys) -> None:
    """A clear error when PE `pe_name` cannot take the context-extension `keys` (pe.base, pe.scaling, ...)."""
    bad = sorted(set(keys) & set(RotaryContext.keys()) - set(context_keys(pe_name)))
    if bad:
        can = ", ".join(n for n in available() if context_keys(n))
        knobs = ", ".join(f"pe.{k}" for k in bad)
        raise ValueError(
            f"pe={pe_name} cannot extend its context: it has no rotary frequencies for {knobs}; "
            f"context extension applies to {can}"
        )


def rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rope_cos_sin(positions: Tensor, inv_freq: Tensor) -> tuple[Tensor, Tensor]:
    """cos/sin of shape (T, 1, D) in fp32, broadcastable over (B, T, H, D)."""
    cos, sin = half_split_cos_sin(positions.float()[:, None] * inv_freq.float()[None, :])
    return cos[:, None, :], sin[:, None, :]


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate every (x[i], x[i+D/2]) pair counter-clockwise by its angle, computed in fp32."""
    xf = x.float()
    return (xf * cos + rotate_half(xf) * sin).to(x.dtype)


# The rotation direction of every rotary PE here (and of Hugging Face and RoPE++); the GRAPE code: "clockwise".
ROTATION = "counter-clockwise"
ROTATIONS = ("counter-clockwise", "clockwise")


def convert_rotation(weight: Tensor, head_dim: int, src: str = ROTATION, dst: str = ROTATION) -> Tensor:
    """A q/k (or GRAPE-AP probe) projection weight (heads * head_dim, in) of a model rotating `src`, for the
    same model rotating `dst`. With F = diag(1, ..., 1, -1, ..., -1) per head, R_ccw(t) = F R_cw(t) F: the
    model with the second half of each head's rows negated and the opposite rotation computes F q and F k,
    and q.k, the RMS norm and per-channel gains are unchanged by F, so the logits are equal. Identity when
    src == dst; converting twice is the identity."""
    if src not in ROTATIONS or dst not in ROTATIONS:
        raise ValueError(f"rotation must be one of {ROTATIONS}, got {src!r} -> {dst!r}")
    if src == dst:
        return weight
    sign = torch.ones(head_dim, dtype=weight.dtype, device=weight.device)
    sign[head_dim // 2 :] = -1
    return (weight.reshape(-1, head_dim, weight.shape[-1]) * sign[None, :, None]).reshape(weight.shape)


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
        **shared,
    ):
        super().__init__(shape, **shared)
        if shape.head_dim % 2:
            raise ValueError(f"RoPE needs an even head_dim, got {shape.head_dim}")
        self.before_qk_norm = before_qk_norm
        self.context = RotaryContext.of(
            dict(base=base, scaling=scaling, factor=factor, original_max_len=original_max_len)
        )
        self.base = self.context.base
        self.logit_scale = self.context.logit_scale
        # Not persistent: derived from config, so a checkpoint can be evaluated with another base.
        self.register_buffer("inv_freq", self.context.inv_freq(shape.head_dim), persistent=False)

    def extend_context(self, trained: dict) -> str | None:
        old = RotaryContext.of(trained)
        return None if old == self.context else f"rotary frequencies {old} -> {self.context}"

    def transform_qk(self, q, k, x, positions):
        cos, sin = rope_cos_sin(positions, self.inv_freq)
        return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
