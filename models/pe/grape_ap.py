"""Path-integral additive GRAPE, GRAPE-AP (arXiv 2512.07805 Sec. 5; the paper's best model).

    b_h(t, j) = sum_{l=j+1..t} psi_h(t, l),   psi_h(t, l) = alpha_h * logsigmoid(<p_t, R_l pbar_l> / P)

following the official code (`model/llama-mha-grape-ap-v1.py`, configs `*_grape_ap_v1_pdim8_*`):
  * probe p_t = W_p x_t, a bias-free Linear(d_model -> H * P) on the attention input, P = `probe_dim` = 8;
    W_p ~ N(0, 0.5/sqrt(d_model)) (the GRAPE global init of every matrix; `probe_init_std` overrides);
  * key side pbar_l = RMSNorm(p_l) over the P dims without gain, then rotated by R_l = exp(l J): RoPE with
    base 1 (inv_freq = 1 in every plane, half-split) at the absolute position l;
  * query side: the raw p_t (code). `query_probe_norm: true` RMS-normalises it as the paper states;
  * the scale 1/P uses the probe dim; the diagonal l = t is included; psi is fp32;
  * alpha_h = the fixed ALiBi slopes (a buffer). `learn_alpha: true` makes alpha_h = softplus(a_h) * slope_h
    with a_h = softplus^-1(1) (a variant, not in the paper);
  * no rotary on q/k (QK-RMSNorm still applies).
At init |s| ~ 0.2, so psi ~ -ln2 * alpha_h: GRAPE-AP starts as ALiBi with 0.69x slopes. The bias is not
translation-invariant (R_l is absolute and p_t is not rotated).

Fast path: a `PathSumBias` (probes + alpha + scale); kernels build tiles, never a T x T tensor here.
Rotation direction: R_l rotates counter-clockwise (`models.pe.rope.apply_rotary`), the GRAPE code's R_l
clockwise; the two are the same model up to negating the second half of each head's W_p probe rows
(`models.pe.rope.convert_rotation` with head_dim = probe_dim; the init is symmetric, so training is unchanged).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from pelab.models.kernels.bias import PathSumBias
from pelab.models.pe import register
from pelab.models.pe.alibi import slopes_tensor
from pelab.models.pe.base import PositionalEncoding
from pelab.models.pe.common import cache_detached, softplus_inverse
from pelab.models.pe.rope import apply_rotary, rope_cos_sin
from torch import Tensor, nn


@register("grape_ap")
class GrapeAP(PositionalEncoding):
    before_qk_norm = False

    def __init__(
        self,
        shape,
        probe_dim: int = 8,
        query_probe_norm: bool = False,
        learn_alpha: bool = False,
        probe_init_std: float | None = None,
        **shared,
    ):
        super().__init__(shape, **shared)
        if probe_dim < 2 or probe_dim % 2:
            raise ValueError(f"grape_ap probe_dim must be even (rotated in planes), got {probe_dim}")
        H = self.layout().attn_heads
        self.probe_dim, self.query_probe_norm = int(probe_dim), bool(query_probe_norm)
        self.probe_init_std = 0.5 / math.sqrt(shape.d_model) if probe_init_std is None else float(probe_init_std)
        self.probe = nn.Linear(shape.d_model, H * self.probe_dim, bias=False)
        self.register_buffer("slopes", slopes_tensor(H), persistent=False)
        self.alpha_param = nn.Parameter(torch.empty(H)) if learn_alpha else None
        # R_l = exp(l J): unit frequency in every plane (RoPE with base 1).
        self.register_buffer("probe_freq", torch.ones(self.probe_dim // 2), persistent=False)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        nn.init.normal_(self.probe.weight, 0.0, self.probe_init_std)
        if self.alpha_param is not None:
            self.alpha_param.fill_(softplus_inverse(1.0))
        self.slopes.copy_(slopes_tensor(self.slopes.shape[0]).to(self.slopes.device))
        self.probe_freq.fill_(1.0)

    def alpha(self) -> Tensor:
        a = self.slopes.float()
        return a if self.alpha_param is None else F.softplus(self.alpha_param.float()) * a

    def probes(self, x: Tensor, positions: Tensor) -> tuple[Tensor, Tensor]:
        """Query-side p_t and key-side R_l pbar_l, fp32 (B, H, T, P)."""
        B, T, _ = x.shape
        p = self.probe(x).view(B, T, -1, self.probe_dim).float()
        p_bar = F.rms_norm(p, (self.probe_dim,))
        cos, sin = rope_cos_sin(positions, self.probe_freq)
        k_probe = apply_rotary(p_bar, cos, sin)
        q_probe = p_bar if self.query_probe_norm else p
        return q_probe.transpose(1, 2), k_probe.transpose(1, 2)

    def attention_bias(self, q, k, x, positions):
        q_probe, k_probe = self.probes(x, positions)
        with torch.no_grad():
            # O(B H T P) summaries for stats() instead of keeping the probes alive between steps.
            s = (q_probe * k_probe).sum(-1) / self.probe_dim  # similarity on the diagonal l = t
            cache_detached(
                self,
                "_last_probe_stats",
                torch.stack((q_probe.pow(2).mean().sqrt(), s.abs().mean(), F.logsigmoid(s).mean())),
            )
        return PathSumBias(q_probe, k_probe, self.alpha(), 1.0 / self.probe_dim)

    @torch.no_grad()
    def stats(self) -> dict[str, Tensor]:
        w = self.probe.weight.float()
        out = {"probe_weight_rms": w.pow(2).mean().sqrt()}
        if self.alpha_param is not None:
            out["alpha_over_slope_mean"] = F.softplus(self.alpha_param.float()).mean()
        last = getattr(self, "_last_probe_stats", None)
        if last is not None:
            # Query-probe RMS and, on the diagonal l = t (an O(T) proxy for the edge potentials),
            # mean |s| and mean log sigmoid(s) = psi / alpha.
            out.update(probe_q_rms=last[0], sim_diag_abs_mean=last[1], psi_diag_over_alpha_mean=last[2])
        return out
