"""Compact descriptions of additive attention biases.

Kernels see these types, never a PE name. Each can produce any (query block x key prefix) tile of
its bias in fp32, which the memory-frugal chunked kernel and the dense reference use; fast kernels
read the factors directly. Heads are the attention heads fed to the kernel. Batch dims may be 1
(broadcast). The causal mask is always the kernel's job, so tiles may hold any value above the
diagonal.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import Tensor


class AttentionBias:
    """bias[b, h, i, j] added to the scaled scores q_i . k_j / sqrt(D) before the softmax.

    Subclasses are dataclasses of tensors and floats; `flatten` / `unflatten` pass them through custom
    ops, whose signatures take tensors and numbers only."""

    _TYPES: dict[str, type] = {}

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        AttentionBias._TYPES[cls.__name__] = cls

    def flatten(self) -> tuple[str, list[Tensor], list[float]]:
        """(type name, tensor fields, float fields), each in field order."""
        values = [getattr(self, f.name) for f in fields(self)]
        return (
            type(self).__name__,
            [v for v in values if isinstance(v, Tensor)],
            [float(v) for v in values if not isinstance(v, Tensor)],
        )

    @staticmethod
    def unflatten(kind: str, tensors: list[Tensor], floats: list[float]) -> AttentionBias:
        cls = AttentionBias._TYPES[kind]
        its, itf = iter(tensors), iter(floats)
        # field types are strings under `from __future__ import annotations`
        return cls(*(next(its) if f.type in ("Tensor", Tensor) else next(itf) for f in fields(cls)))

    def tile(self, rows: slice, n_keys: int) -> Tensor:
        """fp32 (B, H, len(rows), n_keys) bias for queries `rows` against keys 0..n_keys-1."""
        raise NotImplementedError

    def dense(self) -> Tensor:
        """The whole (B, H, T, T) bias; tests and reference paths only."""
        n = self.seq_len
        return self.tile(slice(0, n), n)

    @property
    def seq_len(self) -> int:
        raise NotImplementedError


@dataclass
class LowRankBias(AttentionBias):
    """bias[b,h,i,j] = sum_r q_terms[b,h,i,r] * k_terms[b,h,j,r].

    Covers ALiBi (+m_h*j, rank 1; the -m_h*i part is a per-row constant the softmax ignores),
    FoX (-cumsum(log f)_j, rank 1) and the GRAPE-A gated biases (rank <= 3). Factors are fp32
    (B or 1, H, T, R); gradients flow to them.
    """

    q_terms: Tensor
    k_terms: Tensor

    def __post_init__(self):
        if self.q_terms.shape[-1] != self.k_terms.shape[-1] or self.q_terms.dim() != 4:
            raise ValueError(
                f"LowRankBias factors must be (B, H, T, R) with equal R, got "
                f"{tuple(self.q_terms.shape)} and {tuple(self.k_terms.shape)}"
            )

    @property
    def rank(self) -> int:
        return self.q_terms.shape[-1]

    @property
    def seq_len(self) -> int:
        return self.k_terms.shape[2]

    def tile(self, rows: slice, n_keys: int) -> Tensor:
        return torch.matmul(self.q_terms[:, :, rows].float(), self.k_terms[:, :, :n_keys].float().transpose(-1, -2))


@dataclass
class PathSumBias(AttentionBias):
    """Path-integral bias b(t, j) = sum_{l=j+1..t} alpha_h * logsigmoid(scale * <q_probe_t, k_probe_l>).

    The edge potential depends on both the endpoint t and the link l, so this is not low-rank;
    up to a per-row constant (which the softmax ignores) b(t, j) = -sum_{l<=j} psi(t, l).
    Probes are fp32 (B, H, T, P); alpha is (H,).
    """

    q_probe: Tensor
    k_probe: Tensor
    alpha: Tensor
    scale: float

    @property
    def seq_len(self) -> int:
        return self.k_probe.shape[2]

    def tile(self, rows: slice, n_keys: int) -> Tensor:
        start = rows.start or 0
        qp = self.q_probe[:, :, rows].float()
        kp = self.k_probe[:, :, :n_keys].float()
        psi = self.alpha.float()[None, :, None, None] * F.logsigmoid(
            torch.matmul(qp, kp.transpose(-1, -2)) * self.scale
        )
        t = torch.arange(start, start + qp.shape[2], device=qp.device)[:, None]
        link = torch.arange(n_keys, device=qp.device)[None, :]
        psi = psi.masked_fill(link > t, 0.0)
        # b(t, j) = total_t - prefix_t(j); keep the row total so tiles equal the exact bias on j <= t.
        prefix = psi.cumsum(dim=-1)
        return prefix[..., -1:] - prefix
