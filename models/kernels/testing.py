"""Bias factors with the values the PEs produce at init, for kernel tests and benchmarks."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from pelab.models.kernels.bias import LowRankBias, PathSumBias


def realistic_biases(B: int, H: int, T: int, device, gen=None, requires_grad=True) -> dict:
    """LowRank/PathSum biases with the values the PEs produce at init (ALiBi slopes for 8 heads;
    FoX gates sigmoid(N(0,1)) so |c| reaches ~3e3 at T=4096; GRAPE-A-QK gates ~ln 2 times the ALiBi
    slope; GRAPE-AP probes with |<qp, R kp>/8| ~ 0.2-1)."""
    f32 = dict(device=device, dtype=torch.float32)
    slopes = torch.tensor([2 ** (-8 * (h + 1) / H) for h in range(H)], **f32)
    pos = torch.arange(T, **f32)
    out = {}
    out["alibi"] = (
        LowRankBias(
            slopes[None, :, None, None].expand(1, H, T, 1).contiguous(),
            pos[None, None, :, None].expand(1, H, T, 1).contiguous(),
        ),
        [],
    )
    logit = torch.randn(B, H, T, generator=gen, **f32).requires_grad_(requires_grad)
    c = F.logsigmoid(logit).cumsum(-1)
    out["fox"] = (LowRankBias(torch.ones(1, H, T, 1, **f32), -c[..., None]), [logit])
    lq = F.softplus(torch.randn(B, H, T, generator=gen, **f32) * 0.3).requires_grad_(requires_grad)
    lk = F.softplus(torch.randn(B, H, T, generator=gen, **f32) * 0.3).requires_grad_(requires_grad)
    w = slopes[None, :, None]
    i = pos[None, None, :]
    # -(i-j) w (lq_i + lk_j) = (w lq_i) j + (-i)(w lk_j) + 1 (w j lk_j)  [+ row constant]
    qa = torch.stack([w * lq, -i.expand_as(lq), torch.ones_like(lq)], -1)
    kb = torch.stack([i.expand_as(lk), w * lk, w * i * lk], -1)
    out["grape_a_qk"] = (LowRankBias(qa, kb), [lq, lk])
    P = 8
    qp = (torch.randn(B, H, T, P, generator=gen, **f32) * 1.0).requires_grad_(requires_grad)
    kp = (
        F.normalize(torch.randn(B, H, T, P, generator=gen, **f32), dim=-1)
        .mul(math.sqrt(P))
        .requires_grad_(requires_grad)
    )
    out["grape_ap"] = (PathSumBias(qp, kp, slopes, 1.0 / P), [qp, kp])
    return out


def leaf_bias(kind: str, B: int, H: int, T: int, device, gen=None):
    """A bias whose factors are themselves leaves (gradients land on them directly), for timing the
    kernels alone. kind: alibi | fox | grape_a_q | grape_a_k | grape_a_qk | grape_ap.
    Returns (bias, leaves)."""
    src = "grape_a_qk" if kind.startswith("grape_a_") and kind != "grape_ap" else kind
    bias, _ = realistic_biases(B, H, T, device, gen, requires_grad=False)[src]
    if isinstance(bias, PathSumBias):
        qp, kp = bias.q_probe.detach().requires_grad_(), bias.k_probe.detach().requires_grad_()
        return PathSumBias(qp, kp, bias.alpha, bias.scale), [qp, kp]
    a, b = bias.q_terms.detach(), bias.k_terms.detach()
    if kind == "grape_a_q":
        a, b = a[..., :1], b[..., :1]
    elif kind == "grape_a_k":
        a, b = a[..., 1:], b[..., 1:]
    grad = kind != "alibi"
    a = a.contiguous().requires_grad_(grad and kind != "fox")
    b = b.contiguous().requires_grad_(grad)
    return LowRankBias(a, b), [t for t in (a, b) if t.requires_grad]
