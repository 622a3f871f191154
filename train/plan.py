"""The sizes a run derives from its config, checked before any model or data work: world size and
gradient accumulation. A single run, every sweep cell and `python -m train.slurm check` use the same
checks.

Ranks and world size: `world_size()` mirrors what Lightning will use (torchrun's WORLD_SIZE, SLURM's
SLURM_NTASKS under `srun`, else devices x num_nodes), so the accumulation is derived from the same
number the trainer runs with.
"""

from __future__ import annotations

import os

import torch
from omegaconf import DictConfig
from pelab.train.config import ConfigError


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


def plan(cfg: DictConfig) -> dict:
    """{"world", "accum", "tokens_per_step"}, or a ConfigError that names the fix."""
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
