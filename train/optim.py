"""Optimizers, chosen by name (`optim.name`), and the optimizer + LR schedule of a run.

An optimizer is one function registered with `@register_optimizer(name, state_bytes_per_param=...)`:
it takes the parameter groups (weight decay set per group), the peak `lr`, and its own options as
keyword arguments with defaults, and returns a `torch.optim.Optimizer`. Those keyword arguments are
its config keys, on top of the keys every optimizer shares (`OptimConfig`), so a new optimizer is the
function plus conf/optim/<name>.yaml. `state_bytes_per_param` (bytes of optimizer state per parameter)
feeds `trainer=auto`'s memory rule.
"""

from __future__ import annotations

import inspect
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from pelab.train.schedule import lr_multiplier
from pelab.train.schema import options_dataclass


@dataclass
class OptimConfig:
    """The keys of the `optim` group every optimizer has (the optimizer's own follow from its function)."""

    name: str = "adamw"
    lr: float = 1.0e-3
    min_lr: float = 3.0e-5
    # On every parameter except those the model exempts (norm gains, PE gate biases: GPT.no_weight_decay).
    weight_decay: float = 0.01
    # On the pre-clip global gradient norm (null: no clipping).
    grad_clip: float | None = 1.0
    warmup_steps: int = 30
    # cosine: warmup then cosine to min_lr at decay_steps (null: trainer.max_steps).
    # wsd: warmup, constant, then cosine to min_lr over the last `decay_steps` steps (RoPE++ recipe).
    # constant: warmup then lr. (pelab.train.schedule)
    schedule: str = "cosine"
    decay_steps: int | None = None
    # PaLM's z-loss coefficient on the mean squared logsumexp of the output logits.
    z_loss: float = 0.0
    # Skip the update on a spiking step (monitor.spike_* rule; costs one host sync per step).
    skip_spikes: bool = False


@dataclass(frozen=True)
class Optimizer:
    name: str
    build: Callable[..., torch.optim.Optimizer]
    state_bytes_per_param: int


_OPTIMIZERS: dict[str, Optimizer] = {}


def register_optimizer(name: str, state_bytes_per_param: int):
    def wrap(fn):
        if name in _OPTIMIZERS:
            raise ValueError(f"optimizer {name!r} registered twice")
        _OPTIMIZERS[name] = Optimizer(name, fn, int(state_bytes_per_param))
        return fn

    return wrap


def available() -> list[str]:
    return sorted(_OPTIMIZERS)


def optimizer(name: str) -> Optimizer:
    if name not in _OPTIMIZERS:
        raise ValueError(f"unknown optimizer optim.name={name!r}; choose one of {available()}")
    return _OPTIMIZERS[name]


def options(name: str) -> list[tuple[str, Any, Any]]:
    """(key, type, default) of the optimizer's own options: its function's keyword arguments after
    the parameter groups and `lr`."""
    fn = optimizer(name).build
    hints = typing.get_type_hints(fn)
    out = []
    for p in list(inspect.signature(fn).parameters.values())[2:]:
        if p.default is p.empty:
            raise TypeError(f"optimizer {name!r}: option {p.name!r} needs a default")
        out.append((p.name, hints.get(p.name, Any), p.default))
    return out


def optim_schema(name: str) -> type:
    """The `optim` group's schema for optimizer `name`: the shared keys plus the function's options."""
    return options_dataclass(f"Optim_{name}", [("name", str, name), *options(name)], bases=(OptimConfig,))


def optim_config(optim: Mapping | DictConfig) -> DictConfig:
    """The `optim` node of a composed config as it is, or a mapping (a script's dict) checked against
    the schema of its optimizer, missing keys taking their defaults."""
    if isinstance(optim, DictConfig):
        return optim
    return OmegaConf.merge(OmegaConf.structured(optim_schema(optim.get("name", OptimConfig.name))), optim)


@register_optimizer("adamw", state_bytes_per_param=8)  # two fp32 moments
def adamw(param_groups: list[dict], lr: float, betas: list[float] = (0.9, 0.95), eps: float = 1.0e-8):
    """AdamW (fused on GPU)."""
    fused = any(p.is_cuda for g in param_groups for p in g["params"])
    return torch.optim.AdamW(param_groups, lr=lr, betas=tuple(betas), eps=eps, fused=fused or None)


def build(model: torch.nn.Module, cfg, max_steps: int):
    """(optimizer, LambdaLR schedule) of `cfg` (the `optim` node) for `model` (a GPT, also inside FSDP):
    weight decay on every parameter except `model.no_weight_decay()`, in that order of groups."""
    exempt = {id(p) for p in model.no_weight_decay()}
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        (no_decay if id(p) in exempt else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    own = {key: cfg[key] for key, _, _ in options(cfg.name)}
    opt = optimizer(cfg.name).build(groups, cfg.lr, **own)
    fn = partial(
        lr_multiplier,
        schedule=cfg.schedule,
        warmup_steps=cfg.warmup_steps,
        decay_steps=cfg.decay_steps or max_steps,
        total_steps=max_steps,
        min_ratio=cfg.min_lr / cfg.lr,
    )
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, fn)
