"""Option parsing and error handling shared by the CLI commands."""

from __future__ import annotations

import functools

import click

from tpr_ray.errors import TprRayError


def clean_errors(fn):
    """Show tpr-ray's own errors as one clear message instead of a traceback."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except TprRayError as error:
            raise click.ClickException(str(error)) from error
    return wrapper


def parse_overrides(pairs: tuple[str, ...]) -> dict:
    """`--set KEY=VALUE` pairs as a dict (dashes in keys become underscores)."""
    overrides = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise click.BadParameter(f"expected KEY=VALUE, got {pair!r}", param_hint="--set")
        overrides[key.strip().replace("-", "_")] = value.strip()
    return overrides


def parse_size(text: str) -> tuple[int, int]:
    """`384x128` -> (384, 128)."""
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise click.BadParameter(f"expected HxW such as 384x128, got {text!r}", param_hint="--image-size") from None
    return h, w
