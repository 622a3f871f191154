"""Positional encodings: a registry from config name to module class.

`build_pe({"name": "rope", "base": 10000.0}, shape)` makes one PE instance for one layer. A PE is one
module of this package whose class is decorated with `@register("<name>")`; every module here is
imported when the package is, so adding a PE is adding its module (plus conf/pe/<name>.yaml).
The PE's config keys are its constructor's keyword arguments (`options`), defaults included.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import typing
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


def options(name: str) -> list[tuple[str, Any, Any]]:
    """(key, type, default) of every option of PE `name`: its constructor's keyword arguments after
    `shape`, through the base classes' signatures where a constructor forwards **kwargs."""
    out, seen = [], set()
    for cls in pe_class(name).__mro__:
        init = cls.__dict__.get("__init__")
        if init is None:
            continue
        hints = typing.get_type_hints(init)
        params = list(inspect.signature(init).parameters.values())[2:]  # self, shape
        for p in params:
            if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD) and p.name not in seen:
                if p.default is p.empty:
                    raise TypeError(f"{cls.__name__}.__init__: option {p.name!r} needs a default")
                out.append((p.name, hints.get(p.name, Any), p.default))
                seen.add(p.name)
        if not any(p.kind is p.VAR_KEYWORD for p in params):
            break
    return out


def build_pe(spec: dict[str, Any], shape: AttentionShape) -> PositionalEncoding:
    spec = dict(spec)
    cls = pe_class(spec.pop("name", None))
    try:
        return cls(shape, **spec)
    except TypeError as e:
        raise ValueError(f"bad options for pe={cls.pe_name}: {e}") from None


def _import_modules() -> None:
    """Import every module of this package: a PE registers itself when its module is imported."""
    for module in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{module.name}")


_import_modules()

__all__ = ["AttentionShape", "HeadLayout", "PositionalEncoding", "available", "build_pe", "options", "register"]
