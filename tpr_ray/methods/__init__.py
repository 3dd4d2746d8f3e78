"""Registry of retrieval methods; everything else looks them up by name here."""

from __future__ import annotations

from tpr_ray.errors import ConfigError
from tpr_ray.methods.base import Method, Recipe, Stage
from tpr_ray.methods.baseline import Baseline

METHODS: dict[str, type[Method]] = {cls.name: cls for cls in (Baseline,)}


def get_method(name: str) -> type[Method]:
    try:
        return METHODS[name]
    except KeyError:
        raise ConfigError(f"unknown method {name!r}; available: {', '.join(sorted(METHODS))}") from None


__all__ = ["METHODS", "Method", "Recipe", "Stage", "get_method"]
