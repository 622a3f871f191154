"""Causal self-attention: projections, optional KV-shift and QK-RMSNorm, the PE, one kernel call."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pelab.models.config import GPTConfig
from pelab.models.kernels import attend
from pelab.models.pe import AttentionShape, build_pe
from torch import Tensor, nn


class RMSNorm(nn.Module):
    """RMSNorm with a learnable gain, computed in fp32 (GRAPE code)."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return F.rms_norm(x.float(), (x.shape[-1],), self.weight.float(), self.eps).to(x.dtype)


class KVShift(nn.Module):
    """Data-dependent token shift of keys and values (FoX-Pro; GRAPE's "w/ KV-shift" rows):
    k'_t = a_t k_{t-1} + (1 - a_t) k_t with a_t = sigmoid(w_h . x_t) per KV head; same for v."""

    def __init__(self, d_model: int, n_heads: int):
        super().__init__()
        self.k_proj = nn.Linear(d_model, n_heads, bias=False)
        self.v_proj = nn.Linear(d_model, n_heads, bias=False)

    @staticmethod
    def _shift(x: Tensor, a: Tensor, first: Tensor | None = None) -> Tensor:
        prev = F.pad(x, (0, 0, 0, 0, 1, 0))[:, :-1]
        if first is not None:  # a document's first token has no predecessor, as at the start of a row
            prev = prev.masked_fill(first[:, :, None, None], 0.0)
        a = a[..., None].to(x.dtype)
        return a * prev + (1 - a) * x

    def forward(self, x: Tensor, k: Tensor, v: Tensor, docs: Tensor | None = None) -> tuple[Tensor, Tensor]:
        first = None if docs is None else F.pad(docs[:, 1:] != docs[:, :-1], (1, 0))
        return (
            self._shift(k, torch.sigmoid(self.k_proj(x)), first),
            self._shift(v, torch.sigmoid(self.v_proj(x)), first),
        )


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig, layer_idx: int):
        super().__init__()
        shape = AttentionShape(cfg.d_model, cfg.n_head, cfg.n_kv_head, cfg.head_dim, cfg.n_layer, layer_idx)
        self.pe = build_pe(cfg.pe, shape)
        layout = self.pe.layout()
        self.head_dim = cfg.head_dim
        self.backend = cfg.attention_backend
        D = cfg.head_dim
        self.q_proj = nn.Linear(cfg.d_model, layout.q_heads * D, bias=False)
        self.k_proj = nn.Linear(cfg.d_model, layout.kv_heads * D, bias=False)
        self.v_proj = nn.Linear(cfg.d_model, layout.kv_heads * D, bias=False)
        self.o_proj = nn.Linear(layout.attn_heads * D, cfg.d_model, bias=False)
        self.kv_shift = KVShift(cfg.d_model, layout.kv_heads) if cfg.kv_shift else None
        # One gain of size head_dim shared across heads (GRAPE code).
        self.q_norm = RMSNorm(D, cfg.norm_eps) if cfg.qk_norm else nn.Identity()
        self.k_norm = RMSNorm(D, cfg.norm_eps) if cfg.qk_norm else nn.Identity()

    def project(self, x: Tensor, positions: Tensor, docs: Tensor | None = None):
        """q, k, v as fed to the kernel (after KV-shift, QK-norm and the PE) and the PE's bias.
        docs: (B, T) document ids when attention is document-masked (only the KV-shift reads them)."""
        B, T, _ = x.shape
        D = self.head_dim
        q = self.q_proj(x).view(B, T, -1, D)
        k = self.k_proj(x).view(B, T, -1, D)
        v = self.v_proj(x).view(B, T, -1, D)
        if self.kv_shift is not None:
            k, v = self.kv_shift(x, k, v, docs)
        pe = self.pe
        if pe.before_qk_norm:
            q, k = pe.transform_qk(q, k, x, positions)
        q, k = self.q_norm(q), self.k_norm(k)
        if not pe.before_qk_norm:
            q, k = pe.transform_qk(q, k, x, positions)
        return q, k, v, pe.attention_bias(q, k, x, positions)

    def forward(self, x: Tensor, positions: Tensor, docs: Tensor | None = None) -> Tensor:
        q, k, v, bias = self.project(x, positions, docs)
        scale = self.pe.logit_scale * self.head_dim**-0.5  # the PE's factor (YaRN) survives the QK-norm here
        y = self.pe.transform_output(attend(q, k, v, bias, backend=self.backend, doc_ids=docs, scale=scale), x)
        return self.o_proj(y.flatten(2))
