"""The run directory: its lock, what a run writes there first (config.yaml) and whether it may continue one.

`runs/<run_name>/` holds config.yaml (the resolved config), metrics.csv and probes.csv, checkpoints/,
summary.json, loss.png, run.lock and, with W&B, wandb_id.txt / wandb_group.txt. Rerunning the same
command in the same directory continues from the newest intact checkpoint (`resume`); a finished run
is left as it is. One process at a time works in a run directory (`RunLock`).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from pelab.data.atomic import atomic_write_text
from pelab.train.checkpoints import is_sharded_checkpoint, newest_intact, remove_orphan_temp_files
from pelab.train.config import ConfigError, pe_schema
from pelab.train.schema import ModelConfig

log = logging.getLogger("pelab")

LOCK_FILE = "run.lock"

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


def _is_rank_zero() -> bool:
    return all(os.environ.get(k, "0") in ("", "0") for k in ("RANK", "LOCAL_RANK", "SLURM_PROCID"))


@contextlib.contextmanager
def run_lock(run_dir: Path) -> Iterator[None]:
    """Hold `<run_dir>/run.lock` (an exclusive `flock`) while a run works in the directory; another
    process refuses with one line naming the holder. The kernel drops the lock when its process ends,
    however it ends, so a killed run never leaves a stale lock. Only global rank 0 takes it."""
    if not _is_rank_zero():
        yield
        return
    path = Path(run_dir) / LOCK_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "another process"
            raise ConfigError(
                f"{run_dir} is in use by {holder}; wait for that run to end, or choose another run_name=..."
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(
            fd, f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode(), 0
        )
        yield
    finally:
        os.close(fd)  # releases the lock


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


def _checkpoint_header(ckpt: Path) -> dict:
    """A checkpoint's dict with its tensors memory-mapped, not read."""
    sharded = is_sharded_checkpoint(ckpt)
    path = Path(ckpt) / "meta.pt" if sharded else ckpt
    return torch.load(path, map_location="cpu", mmap=not sharded, weights_only=False)


def checkpoint_step(ckpt: Path) -> int:
    """The optimizer step a checkpoint holds."""
    return int(_checkpoint_header(ckpt)["global_step"])


def checkpoint_model_mismatch(ckpt: Path, model_cfg) -> str | None:
    """Why the model of checkpoint `ckpt` is not the configured one (None: the same, or not recorded)."""
    saved = (_checkpoint_header(ckpt).get("pelab") or {}).get("model_cfg")
    if not saved:
        return None
    now = model_cfg.__dict__
    diff = [k for k in sorted(set(saved) | set(now)) if k != "attention_backend" and saved.get(k) != now.get(k)]
    if not diff:
        return None
    shown = ", ".join(f"{k}={saved.get(k)!r} (configured {now.get(k)!r})" for k in diff[:4])
    return (
        f"{ckpt} holds another model: {shown}{' ...' if len(diff) > 4 else ''}; continue it with the same "
        f"model/pe settings, or choose another run_name=..."
    )


def resume_checkpoint(cfg: DictConfig, run_dir: Path) -> Path | None:
    """The checkpoint this run continues from (None: a fresh start), by `cfg.resume`: the newest intact
    one of last.ckpt and the step files (checksums verified), saying in one line when it is not last.ckpt.
    Never a fresh start while checkpoints exist: with none intact it refuses and says what to delete."""
    ckpt_dir = Path(run_dir) / "checkpoints"
    last = last_checkpoint(run_dir)
    mode = str(cfg.resume).lower()
    if mode not in ("auto", "true", "false"):
        raise ConfigError(f"resume must be auto, true or false, got {cfg.resume!r}")
    existing = [c for c in [last, *ckpt_dir.glob("step-*.ckpt")] if c.exists() or c.is_symlink()]
    if mode == "true" and not existing:
        raise ConfigError(f"resume=true but {ckpt_dir} holds no checkpoint; run without resume=true to start fresh")
    if not existing:
        return None
    if mode == "false":
        raise ConfigError(
            f"{run_dir} already holds a run ({ckpt_dir}); use resume=auto to continue it, "
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
    if _is_rank_zero():
        remove_orphan_temp_files(ckpt_dir)  # rank 0 holds the run lock: no writer owns them
    chosen, problems = newest_intact(ckpt_dir)
    if chosen is None:
        raise ConfigError(
            f"{ckpt_dir} holds no intact checkpoint ({'; '.join(problems)}); not starting over from step 0 over "
            f"them: delete {ckpt_dir} and {Path(run_dir) / 'metrics.csv'} to start over, or choose another run_name=..."
        )
    if problems:
        log.warning("%s; continuing from %s, the newest intact checkpoint", "; ".join(problems), chosen)
    return chosen


def finished_summary(cfg: DictConfig, run_dir: Path, ckpt: Path | None) -> dict | None:
    """summary.json of a run that already reached trainer.max_steps at checkpoint `ckpt` (None: there is
    training to do, or a run killed after its last checkpoint, whose outputs are then completed)."""
    if ckpt is None:
        return None
    try:
        summary = json.loads((Path(run_dir) / "summary.json").read_text())
    except (OSError, ValueError):
        return None
    step = checkpoint_step(ckpt)
    if step >= int(cfg.trainer.max_steps) and summary.get("steps") == step:
        return summary
    return None


def save_config(cfg: DictConfig, run_dir: Path) -> None:
    """<run_dir>/config.yaml, the resolved config. Every rank writes it while the others may read it in
    `resume_checkpoint`, so atomically (a half-written file would read as "different settings")."""
    atomic_write_text(Path(run_dir) / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
