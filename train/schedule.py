"""Learning-rate schedules as multipliers of the peak LR (for LambdaLR), registered by name (`optim.schedule`).

A schedule is a function `(step, *, warmup_steps, decay_steps, total_steps, min_ratio) -> float` for the
steps after the linear warmup, which every schedule shares.
"""

from __future__ import annotations

import math
from collections.abc import Callable

_SCHEDULES: dict[str, Callable[..., float]] = {}


def register_schedule(name: str):
    def wrap(fn):
        if name in _SCHEDULES:
            raise ValueError(f"LR schedule {name!r} registered twice")
        _SCHEDULES[name] = fn
        return fn

    return wrap


def available() -> list[str]:
    return list(_SCHEDULES)


def lr_multiplier(
    step: int, *, schedule: str, warmup_steps: int, decay_steps: int, total_steps: int, min_ratio: float
) -> float:
    """Linear warmup over `warmup_steps`, then the schedule named `schedule`."""
    if schedule not in _SCHEDULES:
        raise ValueError(f"unknown optim.schedule {schedule!r}; choose {', '.join(available())}")
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    return _SCHEDULES[schedule](
        step, warmup_steps=warmup_steps, decay_steps=decay_steps, total_steps=total_steps, min_ratio=min_ratio
    )


def _cosine(progress: float, min_ratio: float) -> float:
    progress = min(1.0, max(0.0, progress))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


@register_schedule("cosine")
def cosine(step, *, warmup_steps, decay_steps, total_steps, min_ratio) -> float:
    """Cosine from 1 after the warmup to min_ratio at `decay_steps` (then flat)."""
    return _cosine((step - warmup_steps) / max(1, decay_steps - warmup_steps), min_ratio)


@register_schedule("wsd")
def warmup_stable_decay(step, *, warmup_steps, decay_steps, total_steps, min_ratio) -> float:
    """Constant, then cosine to min_ratio over the last `decay_steps` of `total_steps` (RoPE++ recipe)."""
    return _cosine((step - (total_steps - decay_steps)) / max(1, decay_steps), min_ratio)


@register_schedule("constant")
def constant(step, *, warmup_steps, decay_steps, total_steps, min_ratio) -> float:
    return 1.0
