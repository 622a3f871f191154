"""The one interface every positional encoding implements.

A PE never sees the backbone and the backbone never branches on a PE's name. A PE may
  (a) transform q and k (rotations, extra imaginary heads),
  (b) change how many heads the projections produce and how many query heads reach the kernel
      (its `layout`), and
  (c) describe an additive attention bias compactly (`models.kernels.bias`), never as a T x T tensor.
The attention layer hands these to `models.kernels.attend`, which picks the kernel.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from pelab.models.kernels.bias import AttentionBias
from torch import Tensor, nn


@dataclass(frozen=True)
class AttentionShape:
    """What a PE may know about the attention layer it lives in."""

    d_model: int
    n_head: int
    n_kv_head: int
    head_dim: int
    n_layer: int
    layer_idx: int


@dataclass(frozen=True)
class HeadLayout:
    q_heads: int  # heads produced by q_proj
    kv_heads: int  # heads produced by k_proj and v_proj
    attn_heads: int  # query heads fed to the kernel; o_proj reads attn_heads * head_dim


class PositionalEncoding(nn.Module):
    """Base class: NoPE behaviour. Subclasses override what they need.

    Tensors are laid out (B, T, H, D). `x` is the attention input (after the block's pre-norm),
    used by content-dependent PEs (gates, phases, probes). `positions` is a (T,) long tensor of
    absolute positions (0..T-1 in training; shifted in tests and evaluation).
    """

    # Apply `transform_qk` before the QK-RMSNorm (the GRAPE code's order for rotary PEs).
    before_qk_norm: bool = False
    # Parameters the PE owns are initialised by the PE itself, never by the backbone's init.

    def __init__(self, shape: AttentionShape):
        super().__init__()
        self.shape = shape

    def layout(self) -> HeadLayout:
        s = self.shape
        return HeadLayout(q_heads=s.n_head, kv_heads=s.n_kv_head, attn_heads=s.n_head)

    def transform_qk(self, q: Tensor, k: Tensor, x: Tensor, positions: Tensor) -> tuple[Tensor, Tensor]:
        return q, k

    def attention_bias(self, q: Tensor, k: Tensor, x: Tensor, positions: Tensor) -> AttentionBias | None:
        """Additive bias for the kernel, from q/k after QK-norm and `transform_qk`."""
        return None

    def transform_output(self, y: Tensor, x: Tensor) -> Tensor:
        """Per-head attention output y (B, T, H_attn, D) before o_proj (e.g. FoX-Pro output gate/norm)."""
        return y

    def reset_parameters(self) -> None:
        """Initialise the PE's own parameters (called by the backbone's init)."""

    def no_weight_decay(self) -> list[nn.Parameter]:
        """The PE's parameters trained without weight decay (e.g. gate biases); the others are decayed."""
        return []

    @torch.no_grad()
    def stats(self) -> dict[str, Tensor]:
        """PE-specific values worth logging (learned frequencies, gate statistics, ...)."""
        return {}
