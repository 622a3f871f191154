"""Config helpers shared by every command line: resolvers, composition, and the model config."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from pelab.models.config import GPTConfig

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"


def short_dirname(name: str, limit: int = 200) -> str:
    """A sweep cell's directory name (its overrides), cut to fit file-system limits (255 bytes) with a
    hash of the full name so distinct cells stay distinct."""
    import hashlib

    if len(name.encode()) <= limit:
        return name
    return name.encode()[: limit - 9].decode(errors="ignore") + "-" + hashlib.sha1(name.encode()).hexdigest()[:8]


def register_resolvers() -> None:
    OmegaConf.register_new_resolver("pelab.if", lambda cond, a, b: a if cond else b, replace=True)
    OmegaConf.register_new_resolver("pelab.dirname", short_dirname, replace=True)


register_resolvers()


def compose(overrides: list[str] | None = None, config_name: str = "config") -> DictConfig:
    """The config `python -m train <overrides>` would see (without Hydra's runtime keys)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return hydra_compose(config_name=config_name, overrides=list(overrides or []))


def to_dict(node: Any) -> Any:
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node


def vocab_size(cfg: DictConfig) -> int:
    """Model vocabulary: `model.vocab_size` when set, else the configured tokenizer's."""
    from pelab.data.tokenizer import tokenizer_from_cfg

    tok = cfg.data.tokenizer
    tokenizer_vocab = tokenizer_from_cfg(tok).vocab_size
    requested = cfg.model.get("vocab_size")
    if requested and int(requested) < tokenizer_vocab:
        raise ValueError(
            f"model.vocab_size={requested} is smaller than the {tok.name} tokenizer's {tokenizer_vocab} "
            f"tokens; drop model.vocab_size (it defaults to the tokenizer's) or pick a matching tokenizer"
        )
    return int(requested or tokenizer_vocab)


def model_config(cfg: DictConfig) -> GPTConfig:
    d = to_dict(cfg.model)
    d["vocab_size"] = vocab_size(cfg)
    d["pe"] = to_dict(cfg.pe)
    d["kv_shift"] = bool(cfg.kv_shift)
    backend = cfg.get("trainer", {}).get("attention_backend") if "trainer" in cfg else None
    if backend:
        d["attention_backend"] = backend
    if d.get("document_mask") and d.get("eot_id") is None:  # documents begin with the tokenizer's eot
        from pelab.data.tokenizer import tokenizer_from_cfg

        d["eot_id"] = tokenizer_from_cfg(cfg.data.tokenizer).eot_id
    return GPTConfig.from_dict(d)
