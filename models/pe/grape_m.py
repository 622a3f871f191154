"""Multiplicative GRAPE (Zhang et al., "Group Representational Position Encoding", arXiv 2512.07805).

`grape_m` -- GRAPE-M-nonctx as trained by the official code (`model/llama-mha-grape-m-nonctx.py`,
class `MSGRAPECommuting`): RoPE on the fixed half-split planes with *learnable* frequencies.
theta_j = exp(log_freq_j / s), the parameter stores s * log(theta) with s = `log_freq_scale` = 16 (the
code's "lr-scaling trick": log theta sees lr/16), initialised at RoPE base 10000 so that at init the PE
is exactly RoPE. 64 = head_dim/2 frequencies per layer shared by all heads (`share_across_heads`),
fp32. Rotation before the QK-RMSNorm, as in the code.

`form: rodrigues` -- the paper's general form (Sec. 2, Prop. 3.1, App. H): m commuting rank-2 generators
L_i = a_i b_i^T - b_i a_i^T on mutually orthogonal planes of a learned orthogonal basis Q = exp(K)
(K skew-symmetric, init 0 -> the canonical RoPE planes), G(n) = exp(n sum_i w_i L_i) applied without
materialising a matrix through the closed-form (Rodrigues) exponential of each plane,
    G(n) x = x + f1 L x + f2 L^2 x,  f1 = sin(n w s)/s,  f2 = (1 - cos(n w s))/s^2,
    L x = a v - b u,  L^2 x = gamma (a v + b u) - beta a u - alpha b v   (u = a.x, v = b.x),
with alpha = |a|^2, beta = |b|^2, gamma = a.b, s = sqrt(alpha beta - gamma^2), and the small-angle
series f1/(n w) = 1 - z^2/6 + z^4/120, f2/(n w)^2 = 1/2 - z^2/24 + z^4/720 for |z| = |n w s| below
`series_threshold` (the paper's "series guards"; the z^4 terms keep fp32 gradients accurate).
Because the planes are orthogonal the per-plane corrections add (L_i L_j = 0), so the product of the
m plane exponentials is one sum; cost O(m d) per vector. Never trained by the GRAPE authors.

`grape_m_ctx` -- GRAPE-M-ctx (`model/llama-mha-grape-m-ctx.py`, "Contextual GRAPE Type-I"): learnable
shared theta_j (parameter = log theta, no /16 scaling in that file) and a per-token phase
Phi_t = sum_{tau<t} omega_tau (exclusive cumsum, fp32, one phase shared by all heads,
omega from `Linear(d_model, 1)` on the attention input), rotation angle Phi_t * theta_j. The phase
restarts at 0 at the start of every sequence (`positions` is not used): relativity holds in phase,
G_t^T G_j = exp((Phi_j - Phi_t) L).
The two code versions disagree on the gate and its init (`init_mode`):
  * `head` (repository HEAD f5b539f, the paper-v2 runs): omega = sigmoid((W x + b)/16), W = 0,
    b = softplus^-1(1e-3) -> omega = sigmoid(-6.907/16) = 0.394 for every token at init (RoPE with
    positions compressed ~2.5x), although the code comments say "~1e-3";
  * `first_release` (commit 73b2231, the v1 runs): omega = softplus(W x + b), same b, W re-initialised by
    the global init to N(0, 0.5/sqrt(d_model)) -> omega ~ 1e-3 (starts close to NoPE).

Both rotate counter-clockwise like `models.pe.rope` (the GRAPE code rotates clockwise: the same model up to
negating the second half of each head's q/k projection rows, `models.pe.rope.convert_rotation`). Context
extension (`pe.base`, `pe.scaling`, `pe.factor`, `pe.original_max_len`) rescales the learned frequencies
the way the same knobs move RoPE's (`RotaryContext.rescale`) and applies YaRN's attention temperature.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from pelab.models.pe import register
from pelab.models.pe.base import PositionalEncoding
from pelab.models.pe.common import FP32Params, cache_detached, half_split_cos_sin, softplus_inverse
from pelab.models.pe.rope import RotaryContext, apply_rotary
from torch import Tensor, nn


def _sinc_cosc(z: Tensor, threshold: float) -> tuple[Tensor, Tensor]:
    """sin(z)/z and (1 - cos z)/z^2 with a small-angle series below `threshold` (finite gradients at 0)."""
    small = z.abs() < threshold
    z_safe = torch.where(small, torch.ones_like(z), z)
    z2 = z * z
    sinc = torch.where(small, 1 - z2 / 6 + z2 * z2 / 120, torch.sin(z_safe) / z_safe)
    # 1 - cos z = 2 sin^2(z/2): no cancellation for moderate z.
    cosc = torch.where(small, 0.5 - z2 / 24 + z2 * z2 / 720, 2 * torch.sin(z_safe / 2) ** 2 / (z_safe * z_safe))
    return sinc, cosc


class _LearnedRotary(FP32Params, PositionalEncoding):
    """Learned frequencies theta = exp(log_freq / log_freq_scale) starting at RoPE's, and their context
    extension (shared by GRAPE-M and GRAPE-M-ctx)."""

    log_freq: nn.Parameter
    log_freq_scale: float

    def _set_context(self, base: float, scaling: str, factor: float, original_max_len: int) -> None:
        self.context = RotaryContext.of(
            dict(base=base, scaling=scaling, factor=factor, original_max_len=original_max_len)
        )
        self.base = self.context.base
        self.logit_scale = self.context.logit_scale

    def initial_log_freq(self) -> Tensor:
        """log theta at init: RoPE's frequencies under the PE's context knobs, one per plane."""
        return self.context.inv_freq(self.shape.head_dim)[: self.log_freq.shape[-1]].log()

    def freqs(self) -> Tensor:
        return torch.exp(self.log_freq.float() / self.log_freq_scale)

    @torch.no_grad()
    def extend_context(self, trained: dict) -> str | None:
        old = RotaryContext.of(trained)
        if old == self.context:
            return None
        theta = (self.log_freq.double() / self.log_freq_scale).exp()
        theta = self.context.rescale(theta, self.shape.head_dim, old)
        self.log_freq.copy_((theta.log() * self.log_freq_scale).to(self.log_freq.dtype))
        return f"learned frequencies rescaled {old} -> {self.context}"


@register("grape_m")
class GrapeM(_LearnedRotary):
    fp32_params = ("log_freq", "basis_skew")

    def __init__(
        self,
        shape,
        base: float = 10000.0,
        log_freq_scale: float = 16.0,
        share_across_heads: bool = True,
        learnable: bool = True,
        before_qk_norm: bool = True,
        form: str = "rope",
        planes: int | None = None,
        basis: str = "learned",
        series_threshold: float = 0.05,
        scaling: str = "none",
        factor: float = 1.0,
        original_max_len: int = 4096,
        **shared,
    ):
        super().__init__(shape, **shared)
        D = shape.head_dim
        if D % 2:
            raise ValueError(f"GRAPE-M needs an even head_dim, got {D}")
        if form not in ("rope", "rodrigues"):
            raise ValueError(f"grape_m form must be 'rope' or 'rodrigues', got {form!r}")
        if basis not in ("learned", "canonical"):
            raise ValueError(f"grape_m basis must be 'learned' or 'canonical', got {basis!r}")
        self.form, self.basis = form, basis
        self._set_context(base, scaling, factor, original_max_len)
        self.before_qk_norm = before_qk_norm
        self.log_freq_scale = float(log_freq_scale)
        self.series_threshold = float(series_threshold)
        self.planes = D // 2 if planes is None else int(planes)
        if form == "rope" and self.planes != D // 2:
            raise ValueError("grape_m planes < head_dim/2 needs form=rodrigues")
        if not 1 <= self.planes <= D // 2:
            raise ValueError(f"grape_m planes must be in 1..{D // 2}, got {self.planes}")
        # Per-head frequencies are per KV head (a query head uses its KV head's), so that keys can be
        # rotated once under GQA; with multi-head attention that is one set per head.
        heads = 1 if share_across_heads else self.layout().kv_heads
        self.log_freq = nn.Parameter(torch.empty(heads, self.planes), requires_grad=learnable)
        if form == "rodrigues" and basis == "learned":
            # Strict upper triangle of the skew-symmetric K; Q = matrix_exp(K - K^T) is orthogonal.
            self.basis_skew = nn.Parameter(torch.empty(D * (D - 1) // 2))
            self.register_buffer("triu_index", torch.triu_indices(D, D, 1), persistent=False)
        else:
            self.basis_skew = None
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        init = self.initial_log_freq().to(self.log_freq.device) * self.log_freq_scale
        self.log_freq.copy_(init.expand_as(self.log_freq))
        if self.basis_skew is not None:
            self.basis_skew.zero_()
            self.triu_index.copy_(
                torch.triu_indices(self.shape.head_dim, self.shape.head_dim, 1).to(self.triu_index.device)
            )

    def _per_query_head(self, f: Tensor, q_heads: int) -> Tensor:
        """(T, kv_heads or 1, ...) -> (T, q_heads or 1, ...): query head h uses KV head h // group."""
        return f if f.shape[1] == 1 else f.repeat_interleave(q_heads // f.shape[1], dim=1)

    def orthogonal_basis(self) -> Tensor:
        D = self.shape.head_dim
        if self.basis_skew is None:
            return torch.eye(D, device=self.log_freq.device)
        K = torch.zeros(D, D, device=self.basis_skew.device, dtype=torch.float32)
        K = K.index_put((self.triu_index[0], self.triu_index[1]), self.basis_skew.float())
        return torch.linalg.matrix_exp(K - K.T)

    def plane_vectors(self) -> tuple[Tensor, Tensor]:
        """(a_i, b_i) as rows of two (planes, D) matrices; canonical planes a_i = e_{D/2+i}, b_i = e_i,
        oriented so that exp(n w L_i) rotates exactly like `models.pe.rope.apply_rotary`."""
        Q = self.orthogonal_basis()
        half, m = self.shape.head_dim // 2, self.planes
        return Q[:, half : half + m].T, Q[:, :m].T

    def rodrigues(self, x: Tensor, positions: Tensor, a: Tensor, b: Tensor) -> Tensor:
        """G(n) x for x (B, T, H, D) at positions n, in fp32 (also under autocast), without materialising G."""
        with torch.autocast(device_type=x.device.type, enabled=False):
            xf, a, b = x.float(), a.float(), b.float()
            alpha, beta, gamma = (a * a).sum(-1), (b * b).sum(-1), (a * b).sum(-1)
            s = (alpha * beta - gamma * gamma).clamp_min(1e-12).sqrt()
            t = self._per_query_head(positions.float()[:, None, None] * self.freqs()[None], x.shape[2])  # (T, heads, m)
            sinc, cosc = _sinc_cosc(t * s, self.series_threshold)
            f1, f2 = t * sinc, t * t * cosc  # sin(t s)/s, (1 - cos(t s))/s^2 with t = n w
            u, v = xf @ a.T, xf @ b.T  # (B, T, H, m)
            ca = f1 * v + f2 * (gamma * v - beta * u)
            cb = -f1 * u + f2 * (gamma * u - alpha * v)
            return (xf + ca @ a + cb @ b).to(x.dtype)

    def transform_qk(self, q, k, x, positions):
        if self.form == "rodrigues":
            with torch.autocast(device_type=q.device.type, enabled=False):
                a, b = self.plane_vectors()
            return self.rodrigues(q, positions, a, b), self.rodrigues(k, positions, a, b)
        cos, sin = half_split_cos_sin(positions.float()[:, None, None] * self.freqs()[None])  # (T, kv_heads or 1, D)
        q_heads = q.shape[2]
        return (
            apply_rotary(q, self._per_query_head(cos, q_heads), self._per_query_head(sin, q_heads)),
            apply_rotary(k, cos, sin),
        )

    @torch.no_grad()
    def stats(self) -> dict[str, Tensor]:
        log_theta = self.log_freq.float() / self.log_freq_scale
        drift = (log_theta - self.initial_log_freq().to(log_theta.device)).abs()
        out = {
            "freq_max": log_theta.max().exp(),
            "freq_min": log_theta.min().exp(),
            "log_freq_drift_mean": drift.mean(),
            "log_freq_drift_max": drift.max(),
        }
        if self.basis_skew is not None:
            out["basis_skew_norm"] = self.basis_skew.float().norm()
        return out


@register("grape_m_ctx")
class GrapeMCtx(_LearnedRotary):
    fp32_params = ("log_freq",)

    def __init__(
        self,
        shape,
        base: float = 10000.0,
        log_freq_scale: float = 1.0,
        learnable: bool = True,
        init_mode: str = "head",
        init_omega: float = 1e-3,
        omega_scale: float = 16.0,
        before_qk_norm: bool = True,
        scaling: str = "none",
        factor: float = 1.0,
        original_max_len: int = 4096,
        **shared,
    ):
        super().__init__(shape, **shared)
        if shape.head_dim % 2:
            raise ValueError(f"GRAPE-M needs an even head_dim, got {shape.head_dim}")
        if init_mode not in ("head", "first_release"):
            raise ValueError(f"grape_m_ctx init_mode must be 'head' or 'first_release', got {init_mode!r}")
        self._set_context(base, scaling, factor, original_max_len)
        self.log_freq_scale = float(log_freq_scale)
        self.init_mode, self.init_omega, self.omega_scale = init_mode, float(init_omega), float(omega_scale)
        self.before_qk_norm = before_qk_norm
        self.log_freq = nn.Parameter(torch.empty(shape.head_dim // 2), requires_grad=learnable)
        self.omega_proj = nn.Linear(shape.d_model, 1, bias=True)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        self.log_freq.copy_(self.initial_log_freq().to(self.log_freq.device) * self.log_freq_scale)
        self.omega_proj.bias.fill_(softplus_inverse(self.init_omega))
        if self.init_mode == "head":
            nn.init.zeros_(self.omega_proj.weight)
        else:
            nn.init.normal_(self.omega_proj.weight, 0.0, 0.5 / math.sqrt(self.shape.d_model))

    def no_weight_decay(self) -> list[nn.Parameter]:
        return [self.omega_proj.bias]

    def omega(self, x: Tensor) -> Tensor:
        """(B, T) fp32 phase increments omega_t."""
        z = self.omega_proj(x).float()[..., 0]
        return torch.sigmoid(z / self.omega_scale) if self.init_mode == "head" else F.softplus(z)

    def phase(self, x: Tensor) -> Tensor:
        """(B, T) Phi_t = sum_{tau < t} omega_tau (exclusive cumsum, fp32)."""
        omega = self.omega(x)
        cache_detached(self, "_last_omega", omega)
        return F.pad(omega.cumsum(dim=1)[:, :-1], (1, 0))

    def rotate(self, q: Tensor, k: Tensor, phase: Tensor) -> tuple[Tensor, Tensor]:
        cos, sin = half_split_cos_sin(phase[..., None] * self.freqs())  # (B, T, D)
        cos, sin = cos[:, :, None], sin[:, :, None]
        return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)

    def transform_qk(self, q, k, x, positions):
        return self.rotate(q, k, self.phase(x))

    @torch.no_grad()
    def stats(self) -> dict[str, Tensor]:
        log_theta = self.log_freq.float() / self.log_freq_scale
        out = {
            "freq_max": log_theta.max().exp(),
            "freq_min": log_theta.min().exp(),
            "log_freq_drift_mean": (log_theta - self.initial_log_freq().to(log_theta.device)).abs().mean(),
        }
        omega = getattr(self, "_last_omega", None)
        if omega is not None:
            out.update(omega_mean=omega.mean(), omega_min=omega.min(), omega_max=omega.max())
        return out
