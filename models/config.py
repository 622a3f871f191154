"""Backbone hyper-parameters (one dataclass; the Hydra `model` group fills it)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class GPTConfig:
    name: str = "gpt_tiny"
    vocab_size: int = 50257  # tokenizer vocabulary; the embedding is padded to a multiple of `pad_vocab_to`
    pad_vocab_to: int = 64
    n_layer: int = 4
    d_model: int = 256
    n_head: int = 4
    n_kv_head: int | None = None  # None: multi-head attention (= n_head)
    head_dim: int | None = None  # None: d_model // n_head
    mlp_hidden: int | None = None  # None: floor(8/3 * d_model) (SwiGLU)
    # The SwiGLU runs at a width padded to this multiple (zero rows/columns, no parameters: same model).
    mlp_pad_to: int = 64
    tie_embeddings: bool = True
    qk_norm: bool = True
    norm_eps: float = 1e-5
    # "grape": embeddings N(0, 0.02), other matrices N(0, 0.5/sqrt(d_model)), output projections
    #          additionally / sqrt(n_layer) (GRAPE code). "normal": every matrix N(0, init_std) (HF Llama).
    init: str = "grape"
    init_std: float = 0.02
    max_seq_len: int = 4096
    kv_shift: bool = False
    attention_backend: str = "auto"
    # Rows per chunk of the fused LM-head + cross-entropy (0: plain logits + F.cross_entropy).
    loss_chunk_rows: int = 8192
    # Document masking: attention stays within the documents of a packed sequence, each beginning
    # with the end-of-text token `eot_id` (train.config fills it from the tokenizer). Positions stay global.
    document_mask: bool = False
    eot_id: int | None = None
    pe: dict[str, Any] = field(default_factory=lambda: {"name": "rope"})

    def __post_init__(self):
        if self.n_kv_head is None:
            self.n_kv_head = self.n_head
        if self.head_dim is None:
            if self.d_model % self.n_head:
                raise ValueError(f"d_model {self.d_model} is not divisible by n_head {self.n_head}; set model.head_dim")
            self.head_dim = self.d_model // self.n_head
        if self.mlp_hidden is None:
            self.mlp_hidden = int(8 * self.d_model / 3)
        if self.n_head % self.n_kv_head:
            raise ValueError(f"n_head {self.n_head} must be a multiple of n_kv_head {self.n_kv_head}")
        if self.init not in ("grape", "normal"):
            raise ValueError(f"model.init must be 'grape' or 'normal', got {self.init!r}")
        if self.document_mask and self.eot_id is None:
            raise ValueError(
                "model.document_mask needs model.eot_id, the end-of-text id that begins each document "
                "(train.config.model_config fills it from data.tokenizer)"
            )

    @property
    def padded_vocab(self) -> int:
        m = self.pad_vocab_to
        return (self.vocab_size + m - 1) // m * m

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> GPTConfig:
        known = set(cls.__dataclass_fields__)
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown model options {sorted(unknown)}; known: {sorted(known)}")
        return cls(**d)
