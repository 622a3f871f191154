"""ALiBi (Press et al., ICLR 2022): bias -m_h * (i - j) on the scaled scores, no rotary.

Slopes follow the original `get_slopes(n)` (ofirpress/attention_with_linear_biases, also the GRAPE
code's `_get_alibi_slopes`): for n a power of two m_h = 2^(-8(h+1)/n); otherwise the p = 2^floor(log2 n)
slopes followed by the even-indexed slopes of the 2p-head set, first n - p of them. They are
computed over the attention heads the kernel sees (`layout().attn_heads`).

Fast path: softmax ignores per-row constants, so -m_h (i - j) == +m_h * j; a rank-1 `LowRankBias`
with q_terms = 1 and k_terms = m_h * j (j centred on the window; see `centered_positions`).
"""

from __future__ import annotations

import math

import torch
from pelab.models.kernels.bias import LowRankBias
from pelab.models.pe import register
from pelab.models.pe.base import PositionalEncoding
from pelab.models.pe.common import centered_positions


def alibi_slopes(n: int) -> list[float]:
    """ALiBi head slopes for n heads (standard rule, incl. non-powers of two)."""
    if n < 1:
        raise ValueError(f"ALiBi needs at least one head, got {n}")

    def power_of_two(m: int) -> list[float]:
        return [2.0 ** (-8.0 * (h + 1) / m) for h in range(m)]

    if math.log2(n).is_integer():
        return power_of_two(n)
    p = 2 ** math.floor(math.log2(n))
    return power_of_two(p) + alibi_slopes(2 * p)[0::2][: n - p]


def slopes_tensor(n: int) -> torch.Tensor:
    return torch.tensor(alibi_slopes(n), dtype=torch.float32)


@register("alibi")
class ALiBi(PositionalEncoding):
    def __init__(self, shape, **shared):
        super().__init__(shape, **shared)
        self.register_buffer("slopes", slopes_tensor(self.layout().attn_heads), persistent=False)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        # Buffers are derived from the config; refill them in case the model was built on meta.
        self.slopes.copy_(slopes_tensor(self.slopes.shape[0]).to(self.slopes.device))

    def attention_bias(self, q, k, x, positions):
        H, T = self.slopes.shape[0], positions.shape[0]
        p = centered_positions(positions)
        k_terms = (self.slopes.float()[:, None] * p[None, :])[None, :, :, None]  # (1, H, T, 1)
        q_terms = torch.ones(1, H, T, 1, device=positions.device, dtype=torch.float32)
        return LowRankBias(q_terms, k_terms)
