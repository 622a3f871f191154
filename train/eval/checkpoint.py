"""Load a model, its tokenizer and its training config from a Lightning checkpoint or a run directory.

A run directory (`runs/<name>/`) holds `config.yaml` (the resolved training config) and
`checkpoints/last.ckpt`; a checkpoint holds the weights (`state_dict`, keys prefixed `model.`) and
`checkpoint["pelab"]["model_cfg"]` (the `GPTConfig` dict). Either may be given.

Context extension (RoPE++ long-context stage, position interpolation, YaRN) is applied here, on top
of the checkpoint's PE config, by the PE itself: the model is built with the extended PE config
(`pe.base`, `pe.scaling`, `pe.factor`, `pe.original_max_len`), the checkpoint's weights are loaded, and
each PE's `extend_context(trained_pe_cfg)` adapts what it learned (`rope`/`ropepp_*` derive their
frequencies from the config; `grape_m*` rescale their learned ones; YaRN's temperature is a logit factor).
A PE whose constructor takes no such knobs (`models.pe.rope.context_keys`) refuses with a message naming the ones
that can.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from pelab.data.tokenizer import load_tokenizer, tokenizer_from_cfg
from pelab.models.config import GPTConfig
from pelab.models.gpt import GPT
from pelab.models.pe.rope import check_context_extension
from pelab.train.checkpoints import checkpoint_identity, is_sharded_checkpoint, newest_intact, verify
from pelab.train.config import model_config

log = logging.getLogger("pelab.eval")

# Attention is causal and position-free in the backbone, so the only length limit is this guard.
EVAL_MAX_SEQ_LEN = 1 << 24


class CheckpointError(ValueError):
    """A checkpoint or run directory that cannot be evaluated; the message names the fix."""


def resolve_checkpoint(path: str | Path) -> Path:
    """A `.ckpt` file, or a run directory (-> `checkpoints/last.ckpt`)."""
    p = Path(path).expanduser()
    if p.is_file():
        return p
    for cand in (p, p / "checkpoints" / "last.ckpt", p / "last.ckpt"):
        if is_sharded_checkpoint(cand):
            raise CheckpointError(
                f"{cand} is a sharded (FSDP) checkpoint; make it one file first: "
                f"python -m train.consolidate {cand} <file.ckpt>"
            )
    if (p / "checkpoints").is_dir():  # a run directory: its newest intact checkpoint
        chosen, problems = newest_intact(p / "checkpoints")
        if chosen is not None and problems:
            log.warning("%s; evaluating %s, the newest intact checkpoint", "; ".join(problems), chosen)
        if chosen is not None:
            return chosen
    for cand in (p / "checkpoints" / "last.ckpt", p / "last.ckpt"):
        if cand.is_file():
            return cand
    if p.is_dir():
        ckpts = [c for c in sorted(p.glob("checkpoints/*.ckpt")) or sorted(p.glob("*.ckpt")) if c.is_file()]
        if ckpts:
            return ckpts[-1]
        raise CheckpointError(f"{p} holds no checkpoint (expected checkpoints/last.ckpt); pass checkpoint=<file.ckpt>")
    raise CheckpointError(f"checkpoint {p} not found; pass checkpoint=<run dir or .ckpt file>")


def run_dir_of(ckpt: Path) -> Path:
    """The run directory a checkpoint belongs to (where eval outputs go by default)."""
    return ckpt.parent.parent if ckpt.parent.name == "checkpoints" else ckpt.parent


def training_config(ckpt: Path) -> DictConfig | None:
    for cand in (ckpt.parent / "config.yaml", ckpt.parent.parent / "config.yaml"):
        if cand.is_file():
            return OmegaConf.load(cand)
    return None


def _clean_overrides(overrides: dict | None) -> dict:
    return {k: v for k, v in dict(overrides or {}).items() if v is not None}


def effective_pe(pe_cfg: dict, overrides: dict, train_len: int | None) -> dict:
    """The PE config after context-extension overrides (`original_max_len` defaults to the training
    length when a scaling is chosen without it)."""
    overrides = _clean_overrides(overrides)
    out = {**pe_cfg, **overrides}
    if overrides.get("scaling", "none") != "none" and "original_max_len" not in overrides and train_len:
        out["original_max_len"] = int(train_len)
    return out


def build_model(
    model_cfg: dict,
    pe_overrides: dict | None = None,
    train_len: int | None = None,
    attention_backend: str | None = None,
) -> tuple[GPT, dict]:
    """An untrained GPT for `model_cfg` with the context-extension overrides applied to its PE config
    (a PE that cannot take them refuses). Returns (model, effective pe cfg)."""
    base_cfg = dict(model_cfg)
    old_pe = dict(base_cfg["pe"])
    overrides = _clean_overrides(pe_overrides)
    try:
        check_context_extension(old_pe.get("name"), overrides)
    except ValueError as e:
        raise CheckpointError(str(e)) from None
    new_pe = effective_pe(old_pe, overrides, train_len)
    base_cfg["max_seq_len"] = max(int(base_cfg.get("max_seq_len", 0)), EVAL_MAX_SEQ_LEN)
    if attention_backend:
        base_cfg["attention_backend"] = attention_backend
    base_cfg["pe"] = new_pe
    return GPT(GPTConfig.from_dict(base_cfg)), new_pe


def checkpoint_state(ckpt: Path) -> dict:
    problem = verify(ckpt)
    if problem:
        raise CheckpointError(f"checkpoint {ckpt} is {problem}; pass another checkpoint=<run dir or .ckpt file>")
    try:
        return torch.load(ckpt, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001  (a foreign file; PyTorch's message is many lines)
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(
            f"cannot read checkpoint {ckpt} ({first}); pass a checkpoint written by python -m train"
        ) from None


def model_state_dict(state: dict) -> dict[str, torch.Tensor]:
    sd = state.get("state_dict", state)
    out = {}
    for k, v in sd.items():
        if k.startswith("model."):
            out[k[len("model.") :].replace("_orig_mod.", "")] = v
    if not out:
        raise CheckpointError("checkpoint has no `model.*` weights in its state_dict; is it a pelab checkpoint?")
    return out


def load_weights(model: GPT, state: dict, trained_pe: dict) -> list[str]:
    """Load a checkpoint's weights (trained with PE config `trained_pe`) into `model`, then let each PE
    adapt them to the PE config the model was built with (context extension). Returns notes."""
    missing, unexpected = model.load_state_dict(model_state_dict(state), strict=False)
    if missing or unexpected:
        raise CheckpointError(
            f"checkpoint does not match the model: missing {missing[:5]}, unexpected "
            f"{unexpected[:5]}; was it trained with another model/pe config?"
        )
    try:
        notes = {pe.extend_context(trained_pe) for pe in model.pes()}
    except ValueError as e:
        raise CheckpointError(str(e)) from None
    return sorted(n for n in notes if n)


@dataclass
class Loaded:
    model: GPT
    tokenizer: Any
    model_cfg: dict
    train_cfg: DictConfig | None
    ckpt: Path
    run_dir: Path
    train_len: int
    step: int
    device: torch.device
    autocast_dtype: torch.dtype | None
    pe: dict
    pe_overrides: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    sha256: str | None = None

    @property
    def precision(self) -> str:
        return "bf16" if self.autocast_dtype == torch.bfloat16 else "fp32"

    def describe(self) -> dict:
        return {
            "checkpoint": str(self.ckpt),
            "step": self.step,
            "sha256": self.sha256,
            "model": self.model_cfg.get("name"),
            "pe": self.pe,
            "pe_overrides": self.pe_overrides,
            "train_len": self.train_len,
            "device": self.device.type,
            "precision": self.precision,
            "notes": self.notes,
        }


def pick_device(device: str = "auto") -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def pick_autocast(precision: str, device: torch.device) -> torch.dtype | None:
    """bf16 autocast on GPU (as in training), fp32 on CPU."""
    if precision in (None, "auto"):
        return torch.bfloat16 if device.type == "cuda" else None
    if precision in ("bf16", "bf16-mixed", "bfloat16"):
        return torch.bfloat16
    if precision in ("fp32", "32", "32-true", "float32"):
        return None
    raise CheckpointError(f"eval.precision must be auto, bf16 or fp32, got {precision!r}")


def tokenizer_for(train_cfg: DictConfig | None, vocab_size: int):
    tok = tokenizer_from_cfg(train_cfg.data.tokenizer) if train_cfg is not None else load_tokenizer("gpt2")
    if tok.vocab_size > vocab_size:
        raise CheckpointError(
            f"the tokenizer has {tok.vocab_size} tokens but the model only {vocab_size}; "
            f"set data.tokenizer in the run's config.yaml to the one it was trained with"
        )
    return tok


def load(
    checkpoint: str | Path,
    pe_overrides: dict | None = None,
    *,
    device: str = "auto",
    precision: str = "auto",
    attention_backend: str | None = None,
    train_len: int | None = None,
) -> Loaded:
    """Model (eval mode, on `device`), tokenizer and training config of a checkpoint or run dir."""
    ckpt = resolve_checkpoint(checkpoint)
    state = checkpoint_state(ckpt)
    train_cfg = training_config(ckpt)
    model_cfg = (state.get("pelab") or {}).get("model_cfg")
    if model_cfg is None:
        if train_cfg is None:
            raise CheckpointError(f"{ckpt} has no pelab model config and no config.yaml next to it")
        model_cfg = model_config(train_cfg).__dict__.copy()
    if train_len is None:
        train_len = int(OmegaConf.select(train_cfg, "trainer.seq_len", default=0) or 0) if train_cfg else 0
    if not train_len:
        raise CheckpointError(f"no config.yaml next to {ckpt} tells the training length; pass eval.train_len=<tokens>")
    model, new_pe = build_model(model_cfg, pe_overrides, train_len, attention_backend)
    notes = load_weights(model, state, dict(model_cfg["pe"]))
    dev = pick_device(device)
    model.to(dev).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    tok = tokenizer_for(train_cfg, int(model_cfg["vocab_size"]))
    return Loaded(
        model=model,
        tokenizer=tok,
        model_cfg=dict(model_cfg),
        train_cfg=train_cfg,
        ckpt=ckpt,
        run_dir=run_dir_of(ckpt),
        train_len=int(train_len),
        step=int(state.get("global_step", 0)),
        device=dev,
        autocast_dtype=pick_autocast(precision, dev),
        pe=new_pe,
        pe_overrides=_clean_overrides(pe_overrides),
        notes=notes,
        sha256=checkpoint_identity(ckpt),
    )


def init_from(model: GPT, path: str | Path, new_pe: dict) -> list[str]:
    """Continued training: start `model` (built with the new PE config, e.g. `pe.base=500000`) from the
    weights of a checkpoint or run dir; learned rotary frequencies are adapted to the new config."""
    ckpt = resolve_checkpoint(path)
    state = checkpoint_state(ckpt)
    old_pe = (state.get("pelab") or {}).get("model_cfg", {}).get("pe", new_pe)
    notes = load_weights(model, state, dict(old_pe))
    return [f"weights of {ckpt} (step {state.get('global_step', '?')}), pe {dict(old_pe)} -> {dict(new_pe)}", *notes]
