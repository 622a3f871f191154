"""The run directory: what a run writes there first (config.yaml) and whether it may continue one.

`runs/<run_name>/` holds config.yaml (the resolved config), metrics.csv and probes.csv, checkpoints/,
summary.json, loss.png and, with W&B, wandb_id.txt / wandb_group.txt. Rerunning the same command in
the same directory continues from checkpoints/last.ckpt (`resume`).
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from pelab.data.atomic import atomic_write_text
from pelab.train.config import ConfigError, pe_schema
from pelab.train.schema import ModelConfig

# What must be equal for a run directory to be continued by another command.
SAME_EXPERIMENT_KEYS = (
    "model",
    "pe",
    "kv_shift",
    "data.name",
    "seed",
    "trainer.seq_len",
    "trainer.global_batch_tokens",
)


def last_checkpoint(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints" / "last.ckpt"


def changed_keys(saved: DictConfig, cfg: DictConfig) -> list[str]:
    """The SAME_EXPERIMENT_KEYS whose values differ; a saved model or PE counts with its defaults filled
    in (a config.yaml written before a key existed means that key's default)."""
    return [k for k in SAME_EXPERIMENT_KEYS if _completed(saved, k) != OmegaConf.select(cfg, k)]


def _completed(saved: DictConfig, key: str):
    node = OmegaConf.select(saved, key)
    if key not in ("model", "pe") or not isinstance(node, DictConfig):
        return node
    try:
        schema = ModelConfig if key == "model" else pe_schema(node.name)
        return OmegaConf.merge(OmegaConf.structured(schema), node)
    except Exception:  # noqa: BLE001  (an unknown PE or key: certainly not the same experiment)
        return node


def resume_checkpoint(cfg: DictConfig, run_dir: Path) -> Path | None:
    """The checkpoint this run continues from (None: a fresh start), by `cfg.resume`."""
    last = last_checkpoint(run_dir)
    mode = str(cfg.resume).lower()
    if mode not in ("auto", "true", "false"):
        raise ConfigError(f"resume must be auto, true or false, got {cfg.resume!r}")
    if mode == "true" and not last.exists():
        raise ConfigError(f"resume=true but {last} does not exist; run without resume=true to start fresh")
    if not last.exists():
        return None
    if mode == "false":
        raise ConfigError(
            f"{run_dir} already holds a run (checkpoints/last.ckpt); use resume=auto to continue it, "
            f"another run_name=..., or delete the directory"
        )
    saved_cfg = Path(run_dir) / "config.yaml"
    if saved_cfg.exists():
        diff = changed_keys(OmegaConf.load(saved_cfg), cfg)
        if diff:
            raise ConfigError(
                f"{run_dir} holds a run with different {', '.join(diff)}; continue it with the same "
                f"settings, or choose another run_name=..."
            )
    return last


def save_config(cfg: DictConfig, run_dir: Path) -> None:
    """<run_dir>/config.yaml, the resolved config. Every rank writes it while the others may read it in
    `resume_checkpoint`, so atomically (a half-written file would read as "different settings")."""
    atomic_write_text(Path(run_dir) / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
