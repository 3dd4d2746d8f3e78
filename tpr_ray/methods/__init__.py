"""Registry of retrieval methods; everything else looks them up by name here.

Methods are imported on first use, so a method's dependencies load only when it runs.
A new method is one module (a ``Method`` subclass with its ``Recipe`` subclass) plus one
line in ``METHODS``.
"""

from __future__ import annotations

import importlib

from tpr_ray.errors import ConfigError
from tpr_ray.methods.base import Method, Recipe, Stage

METHODS: dict[str, str] = {
    "baseline": "tpr_ray.methods.baseline:Baseline",
    "cskt": "tpr_ray.methods.cskt:CSKT",
    "pd": "tpr_ray.methods.pd:PD",
    "cfine": "tpr_ray.methods.cfine:CFine",
}


def available() -> list[str]:
    """Names of the registered methods (for CLI help and choices)."""
    return list(METHODS)


def get_method(name: str) -> type[Method]:
    if name not in METHODS:
        raise ConfigError(f"unknown method {name!r}; available: {', '.join(METHODS)}")
    module, cls = METHODS[name].split(":")
    try:
        return getattr(importlib.import_module(module), cls)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"method {name!r} could not be loaded from {METHODS[name]}: {exc}") from exc


__all__ = ["METHODS", "Method", "Recipe", "Stage", "available", "get_method"]
