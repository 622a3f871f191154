"""Dense references of every PE's pre-softmax attention scores, for tests only.

`reference_scores(pe, q, k, x, positions)` returns the fp32 (B, H_attn, T, T) scores
q_i . k_j / sqrt(D) + bias(i, j) that the PE defines, with -inf above the diagonal. Inputs are the
layer's projected heads *after* the QK-RMSNorm and before the PE (q: (B, T, q_heads, D), k:
(B, T, kv_heads, D)), the attention input x (B, T, d_model) and the absolute positions (T,).
For rotary PEs that rotate before the norm this equals the model as long as the QK-norm gain is
equal within each rotation pair (it is 1 at init): rotations preserve the RMS.

Everything is computed in float64 from the formulas, independently of the fast paths: rotations as
complex numbers or matrix exponentials, biases as explicit (i - j) matrices or explicit sums over
links l, biases exact (no per-row constants dropped). `reference_output(pe, y, x)` is the reference of
`transform_output` (FoX-Pro output norm/gate).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from pelab.models.pe.alibi import ALiBi
from pelab.models.pe.base import PositionalEncoding
from pelab.models.pe.common import repeat_kv
from pelab.models.pe.fox import FoX
from pelab.models.pe.grape_a import _GrapeA
from pelab.models.pe.grape_ap import GrapeAP
from pelab.models.pe.grape_m import GrapeM, GrapeMCtx
from pelab.models.pe.nope import NoPE
from pelab.models.pe.rope import RoPE
from pelab.models.pe.ropepp import _RoPEPP
from torch import Tensor

f64 = torch.float64
_REFS: dict[type, Callable] = {}


def _ref(cls):
    def wrap(fn):
        _REFS[cls] = fn
        return fn

    return wrap


def reference_scores(pe: PositionalEncoding, q: Tensor, k: Tensor, x: Tensor, positions: Tensor) -> Tensor:
    for cls in type(pe).__mro__:
        if cls in _REFS:
            scores = _REFS[cls](pe, q.to(f64), k.to(f64), x.to(f64), positions)
            T = scores.shape[-1]
            future = torch.ones(T, T, dtype=torch.bool, device=scores.device).triu(1)
            return scores.masked_fill(future, float("-inf")).float()
    raise NotImplementedError(f"no dense reference for {type(pe).__name__}")


def reference_output(pe: PositionalEncoding, y: Tensor, x: Tensor) -> Tensor:
    if isinstance(pe, FoX):
        y, x = y.to(f64), x.to(f64)
        H, D = y.shape[2], y.shape[3]
        if pe.onorm_weight is not None:
            y = (
                y
                / torch.sqrt(y.pow(2).mean(-1, keepdim=True) + pe.output_norm_eps)
                * pe.onorm_weight.to(f64).view(H, D)
            )
        if pe.ogate is not None:
            y = y * torch.sigmoid(x @ pe.ogate.weight.to(f64).T).view_as(y)
    return y


# ---- helpers -----------------------------------------------------------------------------------


def _per_head(k: Tensor, heads: int) -> Tensor:
    """(B, T, Hkv, D) -> (B, T, heads, D)."""
    return repeat_kv(k, heads, dim=2)


def _content(q: Tensor, k: Tensor) -> Tensor:
    return torch.einsum("bthd,bshd->bhts", q, _per_head(k, q.shape[2])) / math.sqrt(q.shape[-1])


def _complex(x: Tensor) -> Tensor:
    """Half-split pairs (x[n], x[n + D/2]) as complex numbers x[n] + i x[n + D/2]."""
    half = x.shape[-1] // 2
    return torch.complex(x[..., :half], x[..., half:])


def _complex_inner(q: Tensor, k: Tensor, angle: Tensor) -> Tensor:
    """sum_n conj(q~_t,n) k~_s,n exp(i angle[.., t, s, n]) / sqrt(D): the complex inner product of the
    rotated key with the rotated query when angle = theta (phase_s - phase_t). angle: (T, S, n) or
    (B, T, S, n) or (heads, T, S, n)."""
    zq, zk = _complex(q), _complex(_per_head(k, q.shape[2]))
    rot = torch.polar(torch.ones_like(angle), angle)
    spec = "tsn" if angle.dim() == 3 else "btsn"
    return torch.einsum(f"bthn,bshn,{spec}->bhts", zq.conj(), zk, rot) / math.sqrt(q.shape[-1])


def _rotary_angles(positions: Tensor, theta: Tensor) -> Tensor:
    """theta_n (p_s - p_t) as (T, S, n) in float64."""
    p = positions.to(f64)
    return (p[None, :] - p[:, None])[..., None] * theta.to(f64)


def _lower(T: int, device) -> Tensor:
    """links[t, j, l] = 1 for j < l <= t (the path from key j to query t)."""
    t = torch.arange(T, device=device)
    return ((t[None, None, :] > t[None, :, None]) & (t[None, None, :] <= t[:, None, None])).to(f64)


# ---- references ----------------------------------------------------------------------------------


@_ref(NoPE)
def _nope(pe, q, k, x, positions):
    return _content(q, k)


@_ref(RoPE)
def _rope(pe, q, k, x, positions):
    theta = pe.inv_freq.to(f64)
    return _complex_inner(q, k, _rotary_angles(positions, theta)).real * pe.logit_scale


@_ref(_RoPEPP)
def _ropepp(pe, q, k, x, positions):
    c = _complex_inner(q, k, _rotary_angles(positions, pe.inv_freq.to(f64))) * pe.logit_scale
    # Real heads: Re; imaginary heads: -Im of the complex RoPE inner product; interleaved per head.
    B, H, T, S = c.shape
    return torch.stack((c.real, -c.imag), dim=2).reshape(B, 2 * H, T, S)


@_ref(GrapeM)
def _grape_m(pe, q, k, x, positions):
    theta = torch.exp(pe.log_freq.detach().to(f64) / pe.log_freq_scale)  # (heads, m)
    return _grape_m_content(pe, q, k, positions, theta) * pe.logit_scale


def _grape_m_content(pe, q, k, positions, theta):
    if pe.form == "rope":
        if theta.shape[0] == 1:
            return _complex_inner(q, k, _rotary_angles(positions, theta[0])).real
        H, group = q.shape[2], q.shape[2] // theta.shape[0]  # per-KV-head frequencies
        out = [
            _complex_inner(
                q[:, :, h : h + 1], _per_head(k, H)[:, :, h : h + 1], _rotary_angles(positions, theta[h // group])
            ).real
            for h in range(H)
        ]
        return torch.cat(out, dim=1)
    # Rodrigues form: score(t, s) = q_t^T exp((p_s - p_t) L) k_s with L = sum_i w_i (a_i b_i^T - b_i a_i^T).
    D, half, m = q.shape[-1], q.shape[-1] // 2, pe.planes
    Q = torch.eye(D, dtype=f64, device=q.device)
    if pe.basis_skew is not None:
        K = torch.zeros(D, D, dtype=f64, device=q.device)
        iu = torch.triu_indices(D, D, 1, device=q.device)
        K[iu[0], iu[1]] = pe.basis_skew.detach().to(f64)
        Q = torch.linalg.matrix_exp(K - K.T)
    a, b = Q[:, half : half + m].T, Q[:, :m].T
    gens = torch.einsum("hi,id,ie->hde", theta, a, b)
    L = gens - gens.transpose(-1, -2)  # (heads, D, D)
    p = positions.to(f64)
    G = torch.linalg.matrix_exp((p[None, :] - p[:, None])[None, :, :, None, None] * L[:, None, None])  # (heads,T,S,D,D)
    H = q.shape[2]
    G = G.expand(H, *G.shape[1:]) if G.shape[0] == 1 else G.repeat_interleave(H // G.shape[0], dim=0)
    return torch.einsum("bthd,htsde,bshe->bhts", q, G, _per_head(k, H)) / math.sqrt(D)


@_ref(GrapeMCtx)
def _grape_m_ctx(pe, q, k, x, positions):
    z = x @ pe.omega_proj.weight.detach().to(f64)[0] + pe.omega_proj.bias.detach().to(f64)[0]  # (B, T)
    omega = torch.sigmoid(z / pe.omega_scale) if pe.init_mode == "head" else torch.nn.functional.softplus(z)
    phase = torch.zeros_like(omega)
    for t in range(1, omega.shape[1]):  # Phi_t = sum_{tau < t} omega_tau
        phase[:, t] = phase[:, t - 1] + omega[:, t - 1]
    theta = torch.exp(pe.log_freq.detach().to(f64) / pe.log_freq_scale)
    angle = (phase[:, None, :] - phase[:, :, None])[..., None] * theta  # (B, T, S, n): theta (Phi_s - Phi_t)
    return _complex_inner(q, k, angle).real * pe.logit_scale


@_ref(ALiBi)
def _alibi(pe, q, k, x, positions):
    p = positions.to(f64)
    dist = p[:, None] - p[None, :]  # i - j
    return _content(q, k) - pe.slopes.to(f64)[None, :, None, None] * dist


def _fox_log_f(pe, x):
    return torch.nn.functional.logsigmoid(x @ pe.fgate.weight.detach().to(f64).T + pe.fgate.bias.detach().to(f64))


@_ref(FoX)
def _fox(pe, q, k, x, positions):
    log_f = _fox_log_f(pe, x)  # (B, T, H)
    T = log_f.shape[1]
    bias = torch.einsum("tjl,blh->bhtj", _lower(T, x.device), log_f)  # sum_{l=j+1..t} log f_l
    return _content(q, k) + bias


@_ref(_GrapeA)
def _grape_a(pe, q, k, x, positions):
    H, D = pe.omega_param.shape[0], q.shape[-1]
    if pe.gate == "softplus":  # camera-ready: softplus gates of (direction . x) / sqrt(D), w = softplus(p) * slope
        omega = torch.nn.functional.softplus(pe.omega_param.detach().to(f64)) * pe.slopes.to(f64)
        act = lambda z: torch.nn.functional.softplus(z / math.sqrt(D))  # noqa: E731
    else:  # 431bad1: bias = -(i - j) w (v.q_i - u.k_j), unconstrained w, no 1/sqrt(D)
        omega = pe.omega_param.detach().to(f64)
        act = lambda z: z  # noqa: E731
    gate = torch.zeros(q.shape[0], H, q.shape[1], 1, dtype=f64, device=q.device)  # lq_i (broadcast over j)
    kgate = torch.zeros(q.shape[0], H, 1, q.shape[1], dtype=f64, device=q.device)  # lk_j (broadcast over i)
    if pe.v is not None:
        v = pe.v.detach().to(f64)
        v = v / v.norm(dim=-1, keepdim=True)
        gate = act(torch.einsum("bthd,hd->bht", q, v))[..., None]
    if pe.u is not None:
        u = pe.u.detach().to(f64)
        u = u / u.norm(dim=-1, keepdim=True)
        zk = torch.einsum("bthd,hd->bht", _per_head(k, H), u)
        kgate = (act(zk) if pe.gate == "softplus" else -zk)[:, :, None, :]
    p = positions.to(f64)
    dist = (p[:, None] - p[None, :])[None, None]
    return _content(q, k) - dist * omega[None, :, None, None] * (gate + kgate)


@_ref(GrapeAP)
def _grape_ap(pe, q, k, x, positions):
    B, T, _ = x.shape
    P = pe.probe_dim
    p = (x @ pe.probe.weight.detach().to(f64).T).view(B, T, -1, P)
    eps = torch.finfo(torch.float32).eps  # F.rms_norm's default for the fp32 probes
    p_bar = p / torch.sqrt(p.pow(2).mean(-1, keepdim=True) + eps)
    q_probe = p_bar if pe.query_probe_norm else p
    # <p_t, R_l pbar_l> with R_l a rotation by angle l (unit frequency) in every half-split plane.
    z_l = _complex(p_bar) * torch.polar(torch.ones((), dtype=f64), positions.to(f64))[None, :, None, None]
    sim = torch.einsum("bthn,blhn->bhtl", _complex(q_probe).conj(), z_l).real / P
    alpha = pe.alpha().detach().to(f64)
    psi = alpha[None, :, None, None] * torch.nn.functional.logsigmoid(sim)  # psi(t, l)
    bias = torch.einsum("tjl,bhtl->bhtj", _lower(T, x.device), psi)  # sum_{l=j+1..t} psi(t, l)
    return _content(q, k) + bias
