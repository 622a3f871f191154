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


def build_pe(spec: dict[str, Any], shape: AttentionShape) -> PositionalEncoding:
    spec = dict(spec)
    name = spec.pop("name", None)
    if name not in _REGISTRY:
        raise ValueError(f"unknown positional encoding {name!r}; choose one of {available()} (pe=<name>)")
    try:
        return _REGISTRY[name](shape, **spec)
    except TypeError as e:
        raise ValueError(f"bad options for pe={name}: {e}") from None


# Importing the modules registers them.
from pelab.models.pe import alibi, fox, grape_a, grape_ap, grape_m, nope, rope, ropepp  # noqa: E402,F401

__all__ = ["AttentionShape", "HeadLayout", "PositionalEncoding", "available", "build_pe", "register"]
