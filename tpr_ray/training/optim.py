"""Optimizer and learning-rate schedule of a training stage, from its recipe.

Torch-only (no Ray, no data readers), so benchmarks build exactly the optimizer that
training uses.
"""

from __future__ import annotations

import math

import torch

from tpr_ray.errors import ConfigError
from tpr_ray.methods import Method, Recipe, Stage

SCHEDULE_UNITS = ("epoch", "step")


def lr_factor(step: int, warmup_steps: int, total_steps: int, warmup_factor: float, schedule: str = "cosine",
              decay_steps: int = 0, gamma: float = 0.1, milestones: tuple[int, ...] = ()) -> float:
    """Multiplier of the base lr at ``step``: linear warm-up from ``warmup_factor``, then
    cosine to 0, constant, or step decay: ``gamma`` once per milestone reached (absolute
    steps, as torch's MultiStepLR and CFine's WarmupMultiStepLR count them) or, without
    milestones, every ``decay_steps`` after the warm-up.

    ``step`` counts whatever unit the schedule is stepped in (epochs or iterations)."""
    if step < warmup_steps:
        alpha = step / warmup_steps
        return warmup_factor * (1 - alpha) + alpha
    if schedule == "constant":
        return 1.0
    if schedule == "step":
        if milestones:
            return gamma ** sum(step >= m for m in milestones)
        return gamma ** ((step - warmup_steps) // max(1, decay_steps))
    if schedule != "cosine":
        raise ConfigError(f"unknown lr schedule {schedule!r}; use cosine, step or constant")
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def schedule_unit(recipe: Recipe) -> str:
    """"epoch" (IRRA and CSKT step their scheduler once per epoch) or "step" (once per iteration).
    Recipes without the field predate it and were always stepped per iteration."""
    unit = getattr(recipe, "schedule_unit", "step")
    if unit not in SCHEDULE_UNITS:
        raise ConfigError(f"unknown schedule_unit {unit!r}; use {' or '.join(SCHEDULE_UNITS)}")
    return unit


def build_scheduler(optimizer: torch.optim.Optimizer, recipe: Recipe,
                    steps_per_epoch: int) -> torch.optim.lr_scheduler.LambdaLR:
    """The stage's schedule in units of ``schedule_unit(recipe)``; advance it with :func:`advance`."""
    per_unit = 1 if schedule_unit(recipe) == "epoch" else steps_per_epoch
    total = recipe.epochs * per_unit
    warmup = recipe.warmup_epochs * per_unit
    decay = recipe.step_decay_epochs * per_unit
    milestones = tuple(m * per_unit for m in getattr(recipe, "step_milestones", ()))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(
        s, warmup, total, recipe.warmup_factor, recipe.schedule, decay, recipe.step_gamma, milestones))


def fused_adam_possible(params) -> bool:
    """torch's fused Adam kernel wants every parameter as a floating-point CUDA tensor."""
    params = list(params)
    return bool(params) and all(p.device.type == "cuda" and p.is_floating_point() for p in params)


def build_optimizer(method: Method, stage: Stage) -> torch.optim.Optimizer:
    recipe = stage.recipe
    groups = method.param_groups(recipe)
    if not groups:
        raise ConfigError(f"stage {stage.name!r} of method {method.name!r} trains no parameters")
    if recipe.optimizer == "adam":
        # On GPU: one fused kernel per step instead of several per parameter tensor; same update.
        fused = fused_adam_possible(p for g in groups for p in g["params"])
        return torch.optim.Adam(groups, lr=recipe.lr, eps=recipe.adam_eps, fused=fused or None)
    if recipe.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=recipe.lr)
    raise ConfigError(f"unknown optimizer {recipe.optimizer!r}; use adam or sgd")


def advance(scheduler: torch.optim.lr_scheduler.LRScheduler, recipe: Recipe, event: str) -> None:
    """Called after every optimizer step (``event="step"``) and after every complete epoch
    (``"epoch"``); the schedule moves on the events of its unit only."""
    if event == schedule_unit(recipe):
        scheduler.step()
