"""Runs that differ only in their seed form a group: the group key is the resolved config minus the seed,
names, paths and where the logs go (`IGNORED`). Used by `train.report`, the sweep summary and the W&B
`job_type` of a run, so that the three agree on what "the same experiment" is.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

# Keys (and whole subtrees) that do not change what is trained.
IGNORED = (
    "seed",
    "run_name",
    "experiment_name",
    "paths",
    "resume",
    "preemption",
    "logger",
    "data.dir",
    "data.num_workers",
    "eval.data_dir",
    "trainer.ckpt_every",
    "trainer.keep_checkpoints",
)
# Shown first, in this order, when a label lists what differs.
_FIRST = ("model.name", "pe.name", "kv_shift", "data.name")


def flatten(cfg: dict, prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}; lists become tuples; already-dotted keys (W&B) pass through."""
    out: dict[str, Any] = {}
    for k, v in cfg.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = tuple(v) if isinstance(v, list) else v
    return out


def _ignored(key: str, ignore: tuple[str, ...]) -> bool:
    # "_..." top-level keys are the tracker's own (W&B adds `_wandb`), not the run's config
    return key.startswith("_") or any(key == i or key.startswith(i + ".") for i in ignore)


def group_key(cfg: dict, ignore: tuple[str, ...] | list[str] = ()) -> dict[str, Any]:
    """The flat config of a run without the ignored keys (IGNORED plus `ignore`)."""
    skip = IGNORED + tuple(ignore)
    return {k: v for k, v in sorted(flatten(cfg).items()) if not _ignored(k, skip)}


def key_id(key: dict[str, Any]) -> str:
    """A stable hash of a group key (equal keys, equal id; across processes and machines)."""
    return hashlib.sha1(json.dumps(sorted(key.items()), default=str).encode()).hexdigest()[:8]


def meta_of(cfg: dict) -> dict:
    """model, pe, kv_shift, data and seed of a (nested or flat) config."""
    flat = flatten(cfg)
    return {
        "model": flat.get("model.name", "?"),
        "pe": flat.get("pe.name", "?"),
        "kv_shift": bool(flat.get("kv_shift", False)),
        "data": flat.get("data.name", "?"),
        "seed": flat.get("seed", "?"),
    }


def short_name(meta: dict) -> str:
    return f"{meta.get('model', '?')}-{meta.get('pe', '?')}{'-kvshift' if meta.get('kv_shift') else ''}"


def job_type(cfg: dict) -> str:
    """The W&B job_type of a run: `{model}-{pe}[-kvshift]-{hash of the group key}`; runs that differ only
    in seed share it, so the workspace can group them (mean and band per group)."""
    return f"{short_name(meta_of(cfg))}-{key_id(group_key(cfg))}"[:64]


def fmt_value(v: Any) -> str:
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, tuple):
        return "[" + ",".join(map(fmt_value, v)) + "]"
    return str(v)


_MISSING = object()


def _differing(keys: list[dict]) -> list[str]:
    names = sorted(set().union(*keys))
    out = [k for k in names if len({repr(d.get(k, _MISSING)) for d in keys}) > 1]
    return sorted(out, key=lambda k: (_FIRST.index(k) if k in _FIRST else len(_FIRST), k))


def _label(key: dict, shown: list[str]) -> str:
    if shown and set(shown) <= {"model.name", "pe.name"}:
        return "/".join(fmt_value(key.get(k, "-")) for k in shown)
    parts = []
    for k in shown:
        name = k[: -len(".name")] if k.endswith(".name") else k
        parts.append(f"{name}={fmt_value(key.get(k, '-'))}")
    return ",".join(parts)


def labels(keys: list[dict]) -> list[str]:
    """One label per group key naming what differs between the groups: `grape_ap` when only the PE
    differs, `gpt_355m/grape_ap` with the model, `pe=fox,kv_shift=true` otherwise. A config group whose
    `name` differs (pe=fox) stands for its sub-keys (pe.init_std ...)."""
    if len(keys) == 1:
        return [short_name(meta_of(keys[0]))]
    differing = _differing(keys)
    named = {k[: -len(".name")] for k in differing if k.endswith(".name")}
    collapsed = [k for k in differing if not any(k.startswith(g + ".") and k != g + ".name" for g in named)]
    out = [_label(key, collapsed) for key in keys]
    if len(set(out)) < len(out):  # e.g. two rope groups with different pe.base: list every differing key
        out = [_label(key, differing) for key in keys]
    return out
