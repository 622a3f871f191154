"""Positional encodings: a registry from config name to module class.

`build_pe({"name": "rope", "base": 10000.0}, shape)` makes one PE instance for one layer.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pelab.models.pe.base import AttentionShape, HeadLayout, PositionalEncoding

_REGISTRY: dict[str, type[PositionalEncoding]] = {}


def register(name: str) -> Callable[[type[PositionalEncoding]], type[PositionalEncoding]]:
    def wrap(cls: type[PositionalEncoding]) -> type[PositionalEncoding]:
        if name in _REGISTRY:
            raise ValueError(f"positional encoding {name!r} registered twice")
        _REGISTRY[name] = cls
        cls.pe_name = name
        return cls

    return wrap


def available() -> list[str]:
    return sorted(_REGISTRY)


def pe_class(name: str) -> type[PositionalEncoding]:
    if name not in _REGISTRY:
        raise ValueError(f"unknown positional encoding {name!r}; choose one of {available()} (pe=<name>)")
    return _REGISTRY[name]


def check_context_extension(name: str, keys) -> None:
    """A clear error when pe `name` cannot take the context-extension `keys` (pe.base, pe.scaling, ...)."""
    from pelab.models.pe.rope import RotaryContext

    bad = sorted(set(keys) & set(RotaryContext.keys()) - set(pe_class(name).context_keys))
    if bad:
        can = ", ".join(n for n in available() if _REGISTRY[n].context_keys)
        knobs = ", ".join(f"pe.{k}" for k in bad)
        raise ValueError(
            f"pe={name} cannot extend its context: it has no rotary frequencies for {knobs}; "
            f"context extension applies to {can}"
        )


def build_pe(spec: dict[str, Any], shape: AttentionShape) -> PositionalEncoding:
    """`spec` is the PE's config: its name, its constructor's options, and `init` (native: the PE's own
    reference initialisation; grape: the GRAPE code's global init, as the GRAPE presets train)."""
    spec = dict(spec)
    name = spec.pop("name", None)
    cls = pe_class(name)
    init = spec.pop("init", "native")
    if init not in ("native", "grape"):
        raise ValueError(f"pe.init must be native or grape, got {init!r}")
    check_context_extension(name, spec)
    try:
        pe = cls(shape, **spec)
    except TypeError as e:
        raise ValueError(f"bad options for pe={name}: {e}") from None
    if init != pe.init:
        pe.init = init
        pe.reset_parameters()
    return pe


# Importing the modules registers them.
from pelab.models.pe import alibi, fox, grape_a, grape_ap, grape_m, nope, rope, ropepp  # noqa: E402,F401

__all__ = [
    "AttentionShape",
    "HeadLayout",
    "PositionalEncoding",
    "available",
    "build_pe",
    "check_context_extension",
    "pe_class",
    "register",
]
