"""`python -m train.export checkpoint=<run dir or .ckpt> out=<dir> [layout=auto] [dtype=float32] [verify=true]`:
a pelab checkpoint as a Hugging Face model folder that `transformers.AutoModelForCausalLM.from_pretrained(out)`
and `AutoTokenizer.from_pretrained(out)` load offline.

Layouts (`layout=auto` picks the native one whenever the model is exactly that architecture):
  * `qwen3`: Hugging Face's Qwen3 (QK-RMSNorm with one head_dim gain, rotation after the norm), for `nope` and
    for `rope` with `pe.before_qk_norm=false`, no KV-shift, no document masking, scaling none or linear. NoPE is
    a Qwen3 config whose rotation is the identity (linear scaling by 1e30: every angle below 1e-26 rad, so
    cos = 1 and the sin term vanishes in fp32 and bf16);
  * `llama`: Hugging Face's Llama, for the same models trained without QK-norm;
  * `custom`: every other model (RoPE++, GRAPE-M/A/AP, ALiBi, FoX, KV-shift, document masking, YaRN, and RoPE
    rotating *before* the QK-norm, pelab's default: with learned gains that differ within a rotary pair,
    gain(rotate(x)) != rotate(gain(x)), so it is not a Qwen3 model): the self-contained `modeling_pelab.py`
    (train/modeling_pelab.py, no pelab import) is written into the folder (`auto_map`), loaded with
    `trust_remote_code=True`.
The embedding and a separate LM head are cut from the padded vocabulary (a multiple of 64) to the tokenizer's;
pelab's SwiGLU padding exists only inside its forward, so the weights are exported at their real width. Rotary
weights pass through `models.pe.rope.convert_rotation` from pelab's direction to Hugging Face's (both
counter-clockwise: unchanged). The tokenizer is written as tokenizer.json (GPT-2: rebuilt from the BPE ranks;
`data.tokenizer.name=hf`: its tokenizer.json). `verify=true` (fp32 exports) reloads the folder and checks its
logits against pelab's on random tokens. The folder appears complete or not at all
(`pelab.data.atomic.atomic_dir`).
"""

from __future__ import annotations

import functools
import json
import logging
import sys
from pathlib import Path

import torch
from pelab.data.atomic import atomic_dir

log = logging.getLogger("pelab.export")

LAYOUTS = ("auto", "qwen3", "llama", "custom")
HF_ROTATION = "counter-clockwise"  # transformers' rotate_half, and train/modeling_pelab.py
NOPE_LINEAR_FACTOR = 1e30
VERIFY_TOLERANCE = 1e-3  # max |logit difference| of an fp32 export (tests hold it to 1e-4)


class ExportError(ValueError):
    """A bad export request; the message names the fix."""


def native_layout(model_cfg: dict) -> tuple[str | None, str]:
    """("qwen3" | "llama" | None, why) for a pelab model config."""
    pe = model_cfg["pe"]
    name = pe.get("name")
    if name not in ("rope", "nope"):
        return None, f"pe={name} has no Hugging Face layout"
    if model_cfg.get("kv_shift"):
        return None, "KV-shift has no Hugging Face layout"
    if model_cfg.get("document_mask"):
        return None, "document masking has no Hugging Face layout"
    if name == "rope" and (pe.get("scaling") or "none") == "yarn" and float(pe.get("factor") or 1.0) != 1.0:
        return None, "pelab's YaRN ramp (RoPE++'s) differs from Hugging Face's"
    if not model_cfg.get("qk_norm", True):
        return "llama", "no QK-norm: Llama"
    if name == "rope" and pe.get("before_qk_norm", True):
        return None, "RoPE rotates before the QK-norm (pe.before_qk_norm=true): not a Qwen3 model"
    return "qwen3", "QK-norm with the rotation after it: Qwen3"


def rope_parameters(pe: dict) -> dict:
    base = float(pe.get("base", 10000.0))
    if pe["name"] == "nope":
        return {"rope_type": "linear", "factor": NOPE_LINEAR_FACTOR, "rope_theta": base}
    if (pe.get("scaling") or "none") == "linear" and float(pe.get("factor") or 1.0) != 1.0:
        return {"rope_type": "linear", "factor": float(pe["factor"]), "rope_theta": base}
    return {"rope_type": "default", "rope_theta": base}


def hf_config(model_cfg: dict, layout: str, eot_id: int, vocab: int, max_len: int):
    common = dict(
        vocab_size=vocab,
        hidden_size=model_cfg["d_model"],
        intermediate_size=model_cfg["mlp_hidden"],
        num_hidden_layers=model_cfg["n_layer"],
        num_attention_heads=model_cfg["n_head"],
        num_key_value_heads=model_cfg["n_kv_head"],
        head_dim=model_cfg["head_dim"],
        rms_norm_eps=model_cfg["norm_eps"],
        tie_word_embeddings=model_cfg["tie_embeddings"],
        max_position_embeddings=max_len,
        bos_token_id=eot_id,
        eos_token_id=eot_id,
    )
    if layout == "custom":
        from pelab.train.modeling_pelab import PelabConfig

        pe = {k: v for k, v in model_cfg["pe"].items() if k != "init"}
        return PelabConfig(
            **common,
            qk_norm=model_cfg["qk_norm"],
            kv_shift=model_cfg["kv_shift"],
            document_mask=model_cfg["document_mask"],
            pe=pe,
        )
    from transformers import LlamaConfig, Qwen3Config

    rope = rope_parameters(model_cfg["pe"])
    if layout == "qwen3":
        return Qwen3Config(**common, hidden_act="silu", attention_bias=False, rope_parameters=rope)
    return LlamaConfig(**common, hidden_act="silu", attention_bias=False, mlp_bias=False, rope_parameters=rope)


def hf_state_dict(model, vocab: int, layout: str) -> dict[str, torch.Tensor]:
    """pelab's weights under Hugging Face names (Qwen3's; PE and KV-shift parameters under `self_attn.`)."""
    from pelab.models.pe.rope import ROTATION, context_keys, convert_rotation

    cfg = model.cfg
    rotary = bool(context_keys(cfg.pe["name"]))  # the PEs that rotate q and k
    out = {"model.embed_tokens.weight": model.embed.weight[:vocab], "model.norm.weight": model.norm.weight}
    if model.lm_head is not None:
        out["lm_head.weight"] = model.lm_head.weight[:vocab]
    elif layout != "custom":  # transformers' tied head is a second name for the embedding
        out["lm_head.weight"] = out["model.embed_tokens.weight"]
    for i, block in enumerate(model.blocks):
        p = f"model.layers.{i}."
        attn = block.attn
        out[p + "input_layernorm.weight"] = block.attn_norm.weight
        out[p + "post_attention_layernorm.weight"] = block.mlp_norm.weight
        for name in ("gate_proj", "up_proj", "down_proj"):
            out[p + f"mlp.{name}.weight"] = getattr(block.mlp, name).weight
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            w = getattr(attn, name).weight
            if rotary and name in ("q_proj", "k_proj"):
                w = convert_rotation(w, cfg.head_dim, ROTATION, HF_ROTATION)
            out[p + f"self_attn.{name}.weight"] = w
        if cfg.qk_norm:
            out[p + "self_attn.q_norm.weight"] = attn.q_norm.weight
            out[p + "self_attn.k_norm.weight"] = attn.k_norm.weight
        for name, t in attn.pe.named_parameters():
            if name == "probe.weight":  # GRAPE-AP's key probes are rotated too
                t = convert_rotation(t, attn.pe.probe_dim, ROTATION, HF_ROTATION)
            out[p + f"self_attn.pe.{name}"] = t
        if attn.kv_shift is not None:
            out[p + "self_attn.kv_shift.k_proj.weight"] = attn.kv_shift.k_proj.weight
            out[p + "self_attn.kv_shift.v_proj.weight"] = attn.kv_shift.v_proj.weight
    return {k: v.detach().clone().contiguous() for k, v in out.items()}


# ---- tokenizer ---------------------------------------------------------------------------------------------


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table (vocab.json / merges.txt spelling)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    table.update({b: chr(256 + i) for i, b in enumerate(b for b in range(256) if b not in table)})
    return table


def bpe_merges(ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
    """The merge list of a byte-level BPE from its ranks: token t of rank r is the merge of the two parts
    that BPE with the ranks below r leaves of t's bytes."""
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(token) < 2:
            continue
        parts = [bytes([b]) for b in token]
        while len(parts) > 2:
            best = min(
                range(len(parts) - 1),
                key=lambda i: ranks.get(parts[i] + parts[i + 1], 1 << 62),
            )
            if ranks.get(parts[best] + parts[best + 1], 1 << 62) >= rank:
                break
            parts[best : best + 2] = [parts[best] + parts[best + 1]]
        if len(parts) != 2:
            raise ExportError(f"BPE token {token!r} (rank {rank}) is not the merge of two lower-ranked tokens")
        merges.append((parts[0], parts[1]))
    return merges


def hf_tokenizer(tok):
    """A transformers fast tokenizer equal to pelab's tokenizer."""
    return _hf_tokenizer(*tok._spec)


@functools.cache
def _hf_tokenizer(name: str, path: str | None, eot_id: int | None):
    from pelab.data.tokenizer import load_tokenizer
    from transformers import PreTrainedTokenizerFast

    tok = load_tokenizer(name, path, eot_id)
    if name == "hf":
        from tokenizers import Tokenizer

        p = Path(path)
        backend = Tokenizer.from_file(str(p / "tokenizer.json" if p.is_dir() else p))
        eot = backend.id_to_token(tok.eot_id)
    else:
        from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

        enc = tok.encoding
        ranks = {b: enc.encode_single_token(b) for b in enc.token_byte_values()}
        spell = _bytes_to_unicode()
        word = lambda b: "".join(spell[x] for x in b)  # noqa: E731
        vocab = {word(b): r for b, r in ranks.items()}
        merges = [(word(a), word(b)) for a, b in bpe_merges(ranks)]
        backend = Tokenizer(models.BPE(vocab, merges, fuse_unk=False, byte_fallback=False))
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        backend.decoder = decoders.ByteLevel()
        backend.post_processor = processors.ByteLevel(trim_offsets=False)
        eot = "<|endoftext|>"
        backend.add_special_tokens([AddedToken(eot, special=True)])
        if backend.token_to_id(eot) != tok.eot_id:
            raise ExportError(f"the end-of-text token got id {backend.token_to_id(eot)}, pelab's is {tok.eot_id}")
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=eot, eos_token=eot, unk_token=eot)


# ---- export ------------------------------------------------------------------------------------------------


def build_hf_model(loaded, layout: str):
    """The transformers model of `layout` holding the loaded checkpoint's weights."""
    from transformers import AutoModelForCausalLM

    model_cfg = dict(loaded.model_cfg)
    vocab, eot = int(model_cfg["vocab_size"]), int(loaded.tokenizer.eot_id)
    config = hf_config(model_cfg, layout, eot, vocab, int(loaded.train_len))
    if layout == "custom":
        from pelab.train.modeling_pelab import PES, PelabForCausalLM

        if model_cfg["pe"]["name"] not in PES:
            raise ExportError(
                f"pe={model_cfg['pe']['name']} has no Hugging Face implementation yet: add its attention to "
                f"train/modeling_pelab.py (PES) to export it"
            )
        config.register_for_auto_class()
        PelabForCausalLM.register_for_auto_class("AutoModelForCausalLM")
        hf = PelabForCausalLM(config)
    else:
        hf = AutoModelForCausalLM.from_config(config)
    missing, unexpected = hf.load_state_dict(hf_state_dict(loaded.model, vocab, layout), strict=False)
    if missing or unexpected:
        raise ExportError(
            f"weights do not map onto the {layout} layout: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    if layout == "custom":
        hf.generation_config.use_cache = False
    return hf.eval()


@torch.no_grad()
def max_logit_difference(loaded, out: Path, layout: str, tokens: int = 48, seed: int = 0) -> float:
    """max |logits(exported folder) - logits(pelab)| on random token ids, fp32 on the CPU."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(out), trust_remote_code=layout == "custom", dtype=torch.float32)
    vocab = int(loaded.model_cfg["vocab_size"])
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, vocab, (2, tokens), generator=g)
    ours = loaded.model(idx)[..., :vocab]
    return float((hf(input_ids=idx).logits.float() - ours).abs().max())


def model_card(loaded, layout: str, why: str) -> str:
    pe = loaded.model_cfg["pe"]
    remote = ", trust_remote_code=True" if layout == "custom" else ""
    return (
        f"# {loaded.run_dir.name}\n\n"
        f"A pelab model (`{loaded.model_cfg.get('name')}`, pe `{json.dumps(pe, sort_keys=True)}`"
        f"{', kv_shift' if loaded.model_cfg.get('kv_shift') else ''}), step {loaded.step}, training length "
        f"{loaded.train_len}; exported from `{loaded.ckpt}` in the `{layout}` layout ({why}).\n\n"
        "```python\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n"
        f'model = AutoModelForCausalLM.from_pretrained("<this folder>"{remote})\n'
        f'tokenizer = AutoTokenizer.from_pretrained("<this folder>"{remote})\n```\n'
    )


def export(
    checkpoint: str | Path,
    out: str | Path,
    layout: str = "auto",
    dtype: str = "float32",
    verify: bool = True,
    overwrite: bool = False,
    train_len: int | None = None,
) -> dict:
    """Write the Hugging Face folder `out`; returns a summary (layout, why, verification)."""
    from pelab.train.eval.checkpoint import CheckpointError, load

    if layout not in LAYOUTS:
        raise ExportError(f"layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    if dtype not in ("float32", "bfloat16", "float16"):
        raise ExportError(f"dtype must be float32, bfloat16 or float16, got {dtype!r}")
    out = Path(out).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise ExportError(f"{out} exists and is not empty; choose another out= or pass overwrite=true")
    try:
        loaded = load(checkpoint, device="cpu", precision="fp32", train_len=train_len)
    except CheckpointError as e:
        raise ExportError(str(e).replace("eval.train_len", "train_len")) from None
    native, why = native_layout(loaded.model_cfg)
    if layout in ("qwen3", "llama") and layout != native:
        raise ExportError(f"the model cannot be exported as {layout}: {why}; use layout=custom (or auto)")
    if layout == "custom" and native:
        why = f"asked for (the model is also a {native} model)"
    layout = (native or "custom") if layout == "auto" else layout
    log.info("layout %s: %s", layout, why)
    hf = build_hf_model(loaded, layout)
    hf.to(getattr(torch, dtype))
    with atomic_dir(out) as tmp:
        hf.save_pretrained(str(tmp))
        hf_tokenizer(loaded.tokenizer).save_pretrained(str(tmp))
        (tmp / "README.md").write_text(model_card(loaded, layout, why))
        summary = {"out": str(out), "layout": layout, "why": why, "pe": loaded.model_cfg["pe"]["name"], "dtype": dtype}
        if verify and dtype == "float32":
            diff = max_logit_difference(loaded, tmp, layout)
            summary["max_logit_difference"] = diff
            if not diff <= VERIFY_TOLERANCE:
                raise ExportError(f"the exported model's logits differ from pelab's by {diff:.3g}; nothing was written")
    return summary


def parse_args(argv: list[str]) -> dict:
    allowed = {"checkpoint", "out", "layout", "dtype", "verify", "overwrite", "train_len"}
    args = {}
    for a in argv:
        key, sep, value = a.partition("=")
        if not sep or key not in allowed:
            raise ExportError(
                f"bad argument {a!r}; usage: python -m train.export checkpoint=<run dir or .ckpt> "
                f"out=<dir> [layout={'|'.join(LAYOUTS)}] [dtype=float32|bfloat16] [verify=true] [overwrite=false] "
                f"[train_len=<tokens, when the run has no config.yaml>]"
            )
        args[key] = value
    for key in ("verify", "overwrite"):
        if key in args:
            if args[key].lower() not in ("true", "false"):
                raise ExportError(f"{key} must be true or false, got {args[key]!r}")
            args[key] = args[key].lower() == "true"
    if "train_len" in args:
        if not args["train_len"].isdigit():
            raise ExportError(f"train_len must be a number of tokens, got {args['train_len']!r}")
        args["train_len"] = int(args["train_len"])
    if not args.get("checkpoint") or not args.get("out"):
        raise ExportError("checkpoint=<run dir or .ckpt> and out=<dir> are required")
    return args


def main(argv: list[str] | None = None) -> None:
    from pelab.train.eval.checkpoint import CheckpointError

    logging.basicConfig(level=logging.INFO, format="[%(name)s] %(message)s")
    try:
        summary = export(**parse_args(sys.argv[1:] if argv is None else argv))
    except ImportError as e:
        raise SystemExit(
            f"error: {e}; the export needs transformers: pip install -e '.[dev]' (or transformers)"
        ) from None
    except (ExportError, CheckpointError) as e:
        raise SystemExit(f"error: {e}") from None
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
