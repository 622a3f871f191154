"""Lightning loggers from the `logger` config group. metrics.csv is written by a callback in every case."""
from __future__ import annotations

import logging
import os
from pathlib import Path

from omegaconf import DictConfig

log = logging.getLogger("pelab")


def wandb_mode(requested: str) -> str:
    """online when an API key is configured (env or ~/.netrc), offline otherwise."""
    if requested in ("online", "offline", "disabled"):
        return requested
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_MODE") == "online":
        return "online"
    netrc = Path.home() / ".netrc"
    if netrc.exists() and "api.wandb.ai" in netrc.read_text(errors="ignore"):
        return "online"
    return "offline"


def build_loggers(cfg: DictConfig, run_dir: Path) -> list:
    if cfg.logger.name == "csv":
        return []
    if cfg.logger.name != "wandb":
        raise ValueError(f"unknown logger {cfg.logger.name!r}; choose logger=csv or logger=wandb")
    from lightning.pytorch.loggers import WandbLogger
    from omegaconf import OmegaConf

    mode = wandb_mode(cfg.logger.mode)
    if mode == "offline":
        log.info("W&B: no API key found, logging offline to %s/wandb (upload later with `wandb sync %s/wandb/offline-run-*`)",
                 run_dir, run_dir)
    # The run id lives in the run dir so a resumed or requeued job continues the same W&B run.
    id_file = run_dir / "wandb_id.txt"
    if id_file.exists():
        run_id = id_file.read_text().strip()
    else:
        import wandb

        run_id = wandb.util.generate_id()
        run_dir.mkdir(parents=True, exist_ok=True)
        id_file.write_text(run_id + "\n")
    group = cfg.logger.group or cfg.get("experiment_name") or os.environ.get("PELAB_SWEEP_ID")
    return [WandbLogger(
        project=cfg.logger.project, entity=cfg.logger.entity, group=group,
        name=f"{cfg.model.name}-{cfg.pe.name}{'-kvshift' if cfg.kv_shift else ''}-s{cfg.seed}",
        tags=[f"model:{cfg.model.name}", f"pe:{cfg.pe.name}", f"data:{cfg.data.name}", *cfg.logger.tags],
        id=run_id, resume="allow", save_dir=str(run_dir), mode=mode,
        config=OmegaConf.to_container(cfg, resolve=True),
    )]
