"""`python -m models.inspect model=<m> pe=<p> [overrides]`: one JSON object describing a (backbone, PE) cell.

flops_per_token = 6 * N + 12 * L * H_attn * D * T, where N counts the parameters that take part in
matrix multiplies (every parameter except an untied input embedding; a tied embedding counts once,
as the LM head), L layers, H_attn the query heads fed to the kernel, D head_dim and T the training
sequence length: forward + backward of the dense matmuls (6N) plus QK^T and PV (2 matmuls x 2 FLOP
x 3 for fwd+bwd x T/2 keys on average under the causal mask would give 6LHDT; we follow the
nanoGPT/torchtitan/MPT convention of counting the full T, 12 L H D T). MFU in pelab uses this.
"""

from __future__ import annotations

import json
import sys

import torch
from pelab.models.config import GPTConfig
from pelab.models.gpt import GPT


def describe(cfg: GPTConfig, seq_len: int) -> dict:
    with torch.device("meta"):
        model = GPT(cfg)
    total = sum(p.numel() for p in model.parameters())
    embed = model.embed.weight.numel()
    head = 0 if model.lm_head is None else model.lm_head.weight.numel()
    layout = model.blocks[0].attn.pe.layout()
    matmul_params = total - (embed if model.lm_head is not None else 0)
    attn_flops = 12 * cfg.n_layer * layout.attn_heads * cfg.head_dim * seq_len
    return {
        "model": cfg.name,
        "pe": cfg.pe.get("name"),
        "kv_shift": cfg.kv_shift,
        "vocab_size": cfg.vocab_size,
        "padded_vocab": cfg.padded_vocab,
        "total_params": total,
        "non_embedding_params": total - embed - head,
        "pe_params": sum(p.numel() for pe in model.pes() for p in pe.parameters()),
        "attention_heads": layout.attn_heads,
        "query_heads_projected": layout.q_heads,
        "kv_heads": layout.kv_heads,
        "head_dim": cfg.head_dim,
        "kv_cache_bytes_per_token": 2 * cfg.n_layer * layout.kv_heads * cfg.head_dim * 2,
        "seq_len": seq_len,
        "flops_per_token": 6 * matmul_params + attn_flops,
    }


def main(argv: list[str] | None = None) -> None:
    from hydra.errors import HydraException
    from pelab.train.config import compose, model_config

    try:
        cfg = compose(sys.argv[1:] if argv is None else argv)
        info = describe(model_config(cfg), int(cfg.trainer.seq_len))
    except (HydraException, ValueError) as e:
        raise SystemExit(f"error: {e}") from None
    print(json.dumps(info, indent=2))


if __name__ == "__main__":
    main()
