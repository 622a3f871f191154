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
    # Factor on the attention logits q.k / sqrt(D), applied by the attention layer so that it survives the
    # QK-RMSNorm (YaRN's attention temperature; 1.0 otherwise).
    logit_scale: float = 1.0
    # Parameters the PE owns are initialised by the PE itself (`reset_parameters`, as `init` says), never by the
    # backbone's init.
    INITS = ("native", "grape")

    def __init__(self, shape: AttentionShape, init: str = "native"):
        """`shape` is the attention layer's; the keyword options after it are the PE's config keys. The options
        every PE takes are these, forwarded from each PE's constructor (`**shared`):
          init: native (the PE's own reference initialisation) | grape (the GRAPE code's global init, which the
                GRAPE presets train: models.pe.common.grape_global_init_)."""
        super().__init__()
        if init not in self.INITS:
            raise ValueError(f"pe.init must be one of {', '.join(self.INITS)}, got {init!r}")
        self.shape = shape
        self.init = init

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

    def extend_context(self, trained: dict) -> str | None:
        """Called after loading weights trained with the PE config `trained` into this PE, which was built
        with the (possibly extended) config it runs with now (context extension: pe.base, pe.scaling, ...):
        adapt learned state to it. A note on what changed, or None."""
        return None

    @torch.no_grad()
    def stats(self) -> dict[str, Tensor]:
        """PE-specific values worth logging (learned frequencies, gate statistics, ...)."""
        return {}
