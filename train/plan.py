"""The sizes a run derives from its config, checked before any model or data work: world size and
gradient accumulation. A single run, every sweep cell and `python -m train.slurm check` use the same
checks.

Ranks and world size: `world_size()` mirrors what Lightning will use (torchrun's WORLD_SIZE, SLURM's
SLURM_NTASKS under `srun`, else devices x num_nodes), so the accumulation is derived from the same
number the trainer runs with.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch
from omegaconf import DictConfig
from pelab.models.kernels import kernel_names
from pelab.train import schedule
from pelab.train.config import ConfigError, check_known_keys


def uses_gpu(t) -> bool:
    return str(t.accelerator) in ("auto", "gpu", "cuda") and torch.cuda.is_available()


def devices_per_node(t) -> int:
    """Processes per node for `trainer.devices` (an int, "auto"/-1, a list or "0,1" of device ids)."""
    d = t.devices
    if isinstance(d, (list, tuple)) or type(d).__name__ == "ListConfig":
        return len(d)
    s = str(d).strip()
    if s in ("auto", "-1"):
        return max(torch.cuda.device_count(), 1) if uses_gpu(t) else 1
    if "," in s:
        return len([x for x in s.split(",") if x.strip()])
    n = int(s)
    if n <= 0:
        raise ValueError(f"trainer.devices must be a positive number, auto, -1 or a list of ids; got {d!r}")
    return n


def world_size(t) -> int:
    """Number of training processes the trainer will run with."""
    env = os.environ
    if "TORCHELASTIC_RUN_ID" in env and "WORLD_SIZE" in env:  # torchrun
        return int(env["WORLD_SIZE"])
    if "SLURM_NTASKS" in env and env.get("SLURM_JOB_NAME") not in ("bash", "interactive"):  # srun
        return int(env["SLURM_NTASKS"])
    return devices_per_node(t) * int(t.num_nodes)


def check_values(cfg: DictConfig) -> None:
    """Values of the right type that cannot work: one ConfigError naming the key and the fix."""
    check_known_keys(cfg)
    t, o = cfg.trainer, cfg.optim
    backends = ["auto", *kernel_names()]
    if t.attention_backend not in backends:
        raise ConfigError(
            f"trainer.attention_backend={t.attention_backend} is not an attention kernel available here; "
            f"choose one of {', '.join(backends)}"
        )
    if o.schedule not in schedule.available():
        raise ConfigError(f"optim.schedule={o.schedule} is unknown; choose one of {', '.join(schedule.available())}")
    if not (math.isfinite(o.lr) and o.lr > 0):
        raise ConfigError(f"optim.lr={o.lr} must be a positive finite number, e.g. optim.lr=1e-3")
    for key in ("warmup_steps", "decay_steps"):
        if o.get(key) is not None and o[key] < 0:
            raise ConfigError(f"optim.{key}={o[key]} must be >= 0")
    for key in ("val_every", "log_every"):
        if t[key] <= 0:
            raise ConfigError(f"trainer.{key}={t[key]} must be positive")
    if str(t.accelerator) in ("gpu", "cuda") and not torch.cuda.is_available():
        raise ConfigError(
            f"trainer.accelerator={t.accelerator} but no GPU is visible to PyTorch (torch.cuda.is_available() is "
            f"False); use trainer.accelerator=auto (GPU when present, else CPU) or cpu"
        )
    if cfg.init_from and not Path(str(cfg.init_from)).expanduser().exists():
        raise ConfigError(f"init_from={cfg.init_from} does not exist; pass a run directory or a .ckpt file")


def plan(cfg: DictConfig) -> dict:
    """{"world", "accum", "tokens_per_step"}, or a ConfigError that names the fix."""
    check_values(cfg)
    t = cfg.trainer
    world = world_size(t)
    per_micro = int(t.micro_batch_size) * int(t.seq_len) * world
    if t.seq_len <= 0 or t.micro_batch_size <= 0:
        raise ConfigError(
            f"trainer.seq_len ({t.seq_len}) and trainer.micro_batch_size ({t.micro_batch_size}) must be positive"
        )
    if t.seq_len > cfg.model.max_seq_len:
        raise ConfigError(
            f"trainer.seq_len={t.seq_len} is longer than model.max_seq_len={cfg.model.max_seq_len}; "
            f"lower trainer.seq_len or set model.max_seq_len={t.seq_len}"
        )
    if t.global_batch_tokens % per_micro:
        raise ConfigError(
            f"trainer.global_batch_tokens={t.global_batch_tokens} is not a multiple of micro_batch_size x seq_len x "
            f"devices = {t.micro_batch_size} x {t.seq_len} x {world} = {per_micro}; choose e.g. "
            f"trainer.global_batch_tokens={max(1, round(t.global_batch_tokens / per_micro)) * per_micro}"
        )
    if t.max_steps <= 0:
        raise ConfigError(f"trainer.max_steps must be positive, got {t.max_steps}")
    return {"world": world, "accum": t.global_batch_tokens // per_micro, "tokens_per_step": int(t.global_batch_tokens)}
