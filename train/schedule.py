"""Learning-rate schedules as multipliers of the peak LR (for LambdaLR)."""

from __future__ import annotations

import math


def lr_multiplier(
    step: int, *, schedule: str, warmup_steps: int, decay_steps: int, total_steps: int, min_ratio: float
) -> float:
    """cosine: linear warmup, then cosine from 1 to min_ratio at `decay_steps` (then flat).
    wsd: linear warmup, constant, then cosine to min_ratio over the last `decay_steps` of `total_steps`."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "cosine":
        start, length = warmup_steps, max(1, decay_steps - warmup_steps)
    elif schedule == "wsd":
        start, length = total_steps - decay_steps, max(1, decay_steps)
    elif schedule == "constant":
        return 1.0
    else:
        raise ValueError(f"unknown optim.schedule {schedule!r}; choose cosine, wsd or constant")
    progress = min(1.0, max(0.0, (step - start) / length))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
