"""RoPE++ (Liu et al., arXiv 2512.07525; code OpenMOSS/rope_pp): real + imaginary RoPE attention.

The imaginary score is the RoPE score with the query pre-rotated by -90 degrees in every pair,
A^Im_{t,s} = (R_{-pi/2} q_t)^T R_{s-t} k_s = -Im of the complex RoPE inner product. In the
half-split layout of `models.pe.rope` that is q_imag = rope_t(-rotate_half(q)) = q*sin - rotate_half(q)*cos
after rotation (the official code's formula). Keys are rotated once and shared.

Real and imaginary queries are separate softmax heads, interleaved on the head axis
[r0, i0, r1, i1, ...] so that query heads 2j and 2j+1 read the KV head of original head j under
the repeat_interleave GQA mapping (RoPE++ Fig. 2). Both use the 1/sqrt(head_dim) scale.

- `ropepp_eh` ("equal heads", code `imag1`): q/k/v projections and the KV cache are halved
  (n_head/2 query heads, n_kv_head/2 KV heads), n_head attention heads reach the kernel.
- `ropepp_ec` ("equal cache", code `imag2`): q/k/v and the KV cache as RoPE, 2*n_head attention
  heads, so the o_proj input doubles.

All RoPE knobs are shared (base, before_qk_norm, linear/YaRN scaling for context extension; the
paper's long-context stage raises the base 10k -> 500k). YaRN's temperature multiplies every logit, real
and imaginary, as the RoPE++ code's scaled cos/sin do (`logit_scale`).
"""

from __future__ import annotations

import torch
from pelab.models.pe import register
from pelab.models.pe.base import HeadLayout
from pelab.models.pe.rope import RoPE, apply_rotary, rope_cos_sin, rotate_half


class _RoPEPP(RoPE):
    variant: str = ""

    def __init__(self, shape, **rope_options):
        super().__init__(shape, **rope_options)
        if self.variant == "eh" and (shape.n_head % 2 or shape.n_kv_head % 2):
            raise ValueError(
                f"ropepp_eh halves the query and KV heads, so n_head ({shape.n_head}) and "
                f"n_kv_head ({shape.n_kv_head}) must be even; use ropepp_ec instead"
            )

    def layout(self) -> HeadLayout:
        s = self.shape
        if self.variant == "eh":
            return HeadLayout(q_heads=s.n_head // 2, kv_heads=s.n_kv_head // 2, attn_heads=s.n_head)
        return HeadLayout(q_heads=s.n_head, kv_heads=s.n_kv_head, attn_heads=2 * s.n_head)

    def transform_qk(self, q, k, x, positions):
        cos, sin = rope_cos_sin(positions, self.inv_freq)
        q_real = apply_rotary(q, cos, sin)
        q_imag = apply_rotary(-rotate_half(q), cos, sin)
        # (B, T, Hq, 2, D) -> (B, T, 2*Hq, D): [r0, i0, r1, i1, ...]
        q = torch.stack((q_real, q_imag), dim=3).flatten(2, 3)
        return q, apply_rotary(k, cos, sin)


@register("ropepp_eh")
class RoPEPP_EH(_RoPEPP):
    variant = "eh"


@register("ropepp_ec")
class RoPEPP_EC(_RoPEPP):
    variant = "ec"
