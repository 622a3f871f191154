"""Llama-style GPT backbone as in the GRAPE code: pre-norm RMSNorm, optional QK-RMSNorm, SwiGLU,
no biases, no absolute position embedding; the positional encoding lives in each attention layer."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from pelab.models.attention import CausalSelfAttention, RMSNorm
from pelab.models.config import GPTConfig
from pelab.models.kernels.documents import doc_ids_from_tokens
from pelab.models.loss import linear_cross_entropy
from pelab.models.pe import PositionalEncoding
from torch import Tensor, nn


class SwiGLU(nn.Module):
    """SwiGLU MLP. `pad_to`: GRAPE's hidden width 2730 is not a multiple of 8, so activation rows
    miss the 16-byte alignment of cuBLAS's Hopper GEMMs (it falls back to an sm80 kernel). The
    weights are zero-padded to a multiple of `pad_to` inside forward: the padded units are
    silu(0) * 0 = 0 and get no parameters, so the function and every gradient are unchanged."""

    def __init__(self, d_model: int, hidden: int, pad_to: int = 0):
        super().__init__()
        self.gate_proj = nn.Linear(d_model, hidden, bias=False)
        self.up_proj = nn.Linear(d_model, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, d_model, bias=False)
        self.pad = (-hidden) % pad_to if pad_to > 0 else 0

    def forward(self, x: Tensor) -> Tensor:
        w_gate, w_up, w_down = self.gate_proj.weight, self.up_proj.weight, self.down_proj.weight
        if self.pad:
            w_gate, w_up = F.pad(w_gate, (0, 0, 0, self.pad)), F.pad(w_up, (0, 0, 0, self.pad))
            w_down = F.pad(w_down, (0, self.pad))
        return F.linear(F.silu(F.linear(x, w_gate)) * F.linear(x, w_up), w_down)


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig, layer_idx: int):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = CausalSelfAttention(cfg, layer_idx)
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = SwiGLU(cfg.d_model, cfg.mlp_hidden, cfg.mlp_pad_to)

    def forward(self, x: Tensor, positions: Tensor, docs: Tensor | None = None) -> Tensor:
        x = x + self.attn(self.attn_norm(x), positions, docs)
        return x + self.mlp(self.mlp_norm(x))


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.padded_vocab, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = None if cfg.tie_embeddings else nn.Linear(cfg.d_model, cfg.padded_vocab, bias=False)
        self.reset_parameters()

    @property
    def head_weight(self) -> Tensor:
        return self.embed.weight if self.lm_head is None else self.lm_head.weight

    def pes(self) -> list[PositionalEncoding]:
        return [b.attn.pe for b in self.blocks]

    def no_weight_decay(self) -> list[nn.Parameter]:
        """Parameters trained without weight decay: the RMSNorm gains and what each PE names."""
        norms = [p for m in self.modules() if isinstance(m, RMSNorm) for p in m.parameters()]
        return norms + [p for pe in self.pes() for p in pe.no_weight_decay()]

    @torch.no_grad()
    def reset_parameters(self) -> None:
        cfg = self.cfg
        hidden_std = cfg.init_std if cfg.init == "normal" else 0.5 / math.sqrt(cfg.d_model)
        out_std = hidden_std if cfg.init == "normal" else hidden_std / math.sqrt(cfg.n_layer)
        pe_params = {id(p) for pe in self.pes() for p in pe.parameters()}
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear) and id(module.weight) not in pe_params:
                is_output = name.endswith("attn.o_proj") or name.endswith("mlp.down_proj")
                nn.init.normal_(module.weight, 0.0, out_std if is_output else hidden_std)
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)
        nn.init.normal_(self.embed.weight, 0.0, cfg.init_std)
        if self.lm_head is not None:
            nn.init.normal_(self.lm_head.weight, 0.0, cfg.init_std)
        for pe in self.pes():
            pe.reset_parameters()

    def document_ids(self, idx: Tensor) -> Tensor | None:
        """(B, T) int32 document ids when `document_mask` is on (a document begins at each end-of-text
        token), else None. Device-side, no host sync."""
        return doc_ids_from_tokens(idx, self.cfg.eot_id) if self.cfg.document_mask else None

    def hidden_states(self, idx: Tensor, positions: Tensor | None = None) -> Tensor:
        """Final-norm hidden states (B, T, d_model) for token ids (B, T). Positions are global
        (0..T-1) also with document masking."""
        T = idx.shape[1]
        if T > self.cfg.max_seq_len:
            raise ValueError(
                f"sequence length {T} exceeds model.max_seq_len={self.cfg.max_seq_len}; "
                f"raise model.max_seq_len or shorten the input"
            )
        if positions is None:
            positions = torch.arange(T, device=idx.device)
        docs = self.document_ids(idx)
        x = self.embed(idx)
        for block in self.blocks:
            x = block(x, positions, docs)
        return self.norm(x)

    def forward(self, idx: Tensor, positions: Tensor | None = None) -> Tensor:
        """Logits (B, T, padded_vocab)."""
        h = self.hidden_states(idx, positions)
        return h @ self.head_weight.to(h.dtype).t()

    def loss(self, idx: Tensor, targets: Tensor, z_loss: float = 0.0) -> dict[str, Tensor]:
        """Mean next-token CE (targets == -100 ignored) through the fused chunked head.

        Returns {"loss": CE (+ z_loss * mean lse^2), "lse": mean logsumexp, "lse_sq": mean lse^2}."""
        h = self.hidden_states(idx).flatten(0, 1)
        if torch.is_autocast_enabled(h.device.type):
            h = h.to(torch.get_autocast_dtype(h.device.type))
        loss, lse, lse_sq = linear_cross_entropy(
            h, self.head_weight, targets.flatten(), self.cfg.loss_chunk_rows, z_loss
        )
        return {"loss": loss, "lse": lse, "lse_sq": lse_sq}
