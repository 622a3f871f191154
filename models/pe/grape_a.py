"""Content-gated additive GRAPE: GRAPE-A-Q / -K / -QK (arXiv 2512.07805 v2+ Sec. 4, eqs. 4.4-4.6;
official code `model/llama-mha-grape-a-{querygated,keygated,querykeygated}.py` as of commit 877372e).

    bias(i, j) = -(i - j) * w_h * [lq_i + lk_j],
    lq_i = softplus(v_h^T q_i / sqrt(D)),  lk_j = softplus(u_h^T k_j / sqrt(D))   (`gate: softplus`)

with q, k after the QK-RMSNorm (so the PE acts after the norm and there is no rotary), u_h, v_h
L2-normalised per head (parameters ~ N(0, 1/sqrt(D)); the scale is irrelevant after normalisation),
w_h = softplus(w_param_h) * alibi_slope_h with w_param = softplus^-1(1) so w_h = slope_h at init.
-Q keeps only lq, -K only lk. At init the gates are ~ln 2, i.e. ALiBi with 0.69x (one gate) or
1.39x (QK) slopes. Heads are the attention heads (n_head); with GQA the key gate of head h reads the
key of its KV head.

`gate: linear` is the earlier signed form exactly as the GRAPE code trained it at commit 431bad1 (paper v1
Sec. 4.1): lq = v^T q, lk = -u^T k (L2-normalised u, v; no 1/sqrt(D)), and an unconstrained w_h initialised
to +slope_h * init_omega for -Q and -QK and to -slope_h * init_omega for -K (that file's "match ALiBi" sign),
i.e. bias = (j - i) w (v^T q_i - u^T k_j) in the paper's notation.

Fast path: with positions p (centred on the window) and the per-row constant -w p_i lq_i dropped,
    -w (p_i - p_j)(lq_i + lk_j) == w lq_i * p_j  +  (-w p_i) * lk_j  +  w * (p_j lk_j)
a `LowRankBias` of rank 1 (-Q), 2 (-K) or 3 (-QK).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from pelab.models.kernels.bias import LowRankBias
from pelab.models.pe import register
from pelab.models.pe.alibi import slopes_tensor
from pelab.models.pe.base import PositionalEncoding
from pelab.models.pe.common import cache_detached, centered_positions, repeat_kv, softplus_inverse
from torch import Tensor, nn


class _GrapeA(PositionalEncoding):
    query_gate: bool = False
    key_gate: bool = False
    before_qk_norm = False

    def __init__(self, shape, gate: str = "softplus", init_omega: float = 1.0, **shared):
        super().__init__(shape, **shared)
        if gate not in ("softplus", "linear"):
            raise ValueError(f"GRAPE-A gate must be 'softplus' or 'linear', got {gate!r}")
        self.gate, self.init_omega = gate, float(init_omega)
        H, D = self.layout().attn_heads, shape.head_dim
        self.omega_param = nn.Parameter(torch.empty(H))
        self.v = nn.Parameter(torch.empty(H, D)) if self.query_gate else None
        self.u = nn.Parameter(torch.empty(H, D)) if self.key_gate else None
        self.register_buffer("slopes", slopes_tensor(H), persistent=False)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        if self.gate == "linear":  # 431bad1: omega = +-slopes, unconstrained
            sign = -1.0 if not self.query_gate else 1.0
            self.omega_param.copy_(
                sign * self.init_omega * slopes_tensor(self.omega_param.shape[0]).to(self.omega_param.device)
            )
        else:
            self.omega_param.fill_(softplus_inverse(self.init_omega))
        for p in (self.u, self.v):
            if p is not None:
                nn.init.normal_(p, 0.0, 1.0 / math.sqrt(self.shape.head_dim))
        self.slopes.copy_(slopes_tensor(self.slopes.shape[0]).to(self.slopes.device))

    def omega(self) -> Tensor:
        """(H,) fp32 per-head rates w_h."""
        if self.gate == "linear":
            return self.omega_param.float()
        return F.softplus(self.omega_param.float()) * self.slopes.float()

    def _gate(self, x: Tensor, direction: Tensor, sign: float) -> Tensor:
        """x (B, T, H, D) -> (B, H, T) gate values from the L2-normalised per-head direction."""
        d = F.normalize(direction.float(), dim=-1)
        # Elementwise product + sum rather than einsum: the batched-matmul form hits a view/stride error
        # in AOTAutograd's backward under torch.compile (torch 2.13).
        z = (x.float() * d).sum(-1).transpose(1, 2)
        return F.softplus(z / math.sqrt(self.shape.head_dim)) if self.gate == "softplus" else sign * z

    def gates(self, q: Tensor, k: Tensor) -> tuple[Tensor | None, Tensor | None]:
        H = self.omega_param.shape[0]
        lq = self._gate(q, self.v, 1.0) if self.query_gate else None
        lk = None
        if self.key_gate:
            lk = self._gate(repeat_kv(k, H, dim=2), self.u, -1.0)
        return lq, lk

    def attention_bias(self, q, k, x, positions):
        lq, lk = self.gates(q, k)
        w = self.omega()[None, :, None]  # (1, H, 1)
        p = centered_positions(positions)[None, None, :]  # (1, 1, T)
        H, T = w.shape[1], p.shape[-1]
        B = (lq if lq is not None else lk).shape[0]
        full = (B, H, T)
        q_terms, k_terms = [], []
        if lq is not None:
            cache_detached(self, "_last_lq", lq)
            q_terms.append(w * lq)
            k_terms.append(p.expand(full))
        if lk is not None:
            cache_detached(self, "_last_lk", lk)
            q_terms += [(-w * p).expand(full), w.expand(full)]
            k_terms += [lk, p * lk]
        return LowRankBias(torch.stack(q_terms, dim=-1), torch.stack(k_terms, dim=-1))

    @torch.no_grad()
    def stats(self) -> dict[str, Tensor]:
        w = self.omega()
        out = {f"omega/h{h}": w[h] for h in range(w.shape[0])}
        out["omega_over_slope_mean"] = (w / self.slopes.float()).mean()
        for name, key in (("_last_lq", "q_gate_mean"), ("_last_lk", "k_gate_mean")):
            g = getattr(self, name, None)
            if g is not None:
                out[key] = g.mean()
        return out


@register("grape_a_q")
class GrapeAQ(_GrapeA):
    query_gate = True


@register("grape_a_k")
class GrapeAK(_GrapeA):
    key_gate = True


@register("grape_a_qk")
class GrapeAQK(_GrapeA):
    query_gate = True
    key_gate = True
