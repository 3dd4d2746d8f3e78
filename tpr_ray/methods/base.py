"""The interface every retrieval method implements.

A method is a CLIP backbone plus whatever it adds (heads, prompts, adapters),
its losses, and the training stages that say which parameters learn. The
trainer, the embedder and the evaluator only talk to this interface, so they
never need to know which method they are running.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Callable, ClassVar

import torch
from torch import nn

from tpr_ray.methods.backbone import BackboneConfig, build_clip, get_tokenizer, resolved
from tpr_ray.errors import ConfigError

SCHEDULE_UNITS = ("epoch", "step")


@dataclass(frozen=True)
class Recipe:
    """How a method is optimised; the fields every method shares.

    A method extends it in one way: a frozen dataclass subclass that adds the method's own
    options (its losses' weights and temperatures, prompt lengths ...), with the paper's
    values as the method's ``default_recipe``. Loss settings live only in the recipes of
    the methods whose losses read them.
    """

    epochs: int = 60
    batch_size: int = 64
    lr: float = 1e-5
    new_module_lr_mult: float = 5.0  # replaces the bias multiplier for new modules (IRRA)
    bias_lr_mult: float = 2.0
    weight_decay: float = 4e-5
    bias_weight_decay: float = 0.0
    optimizer: str = "adam"
    adam_eps: float = 1e-3
    schedule: str = "cosine"  # cosine | step | constant, after the linear warm-up
    step_decay_epochs: int = 20  # step schedule: multiply the lr by step_gamma every N epochs ...
    step_milestones: tuple[int, ...] = ()  # ... or at these epochs (absolute, warm-up included), when given
    step_gamma: float = 0.1
    warmup_epochs: int = 5
    warmup_factor: float = 0.1
    schedule_unit: str = "epoch"  # the lr changes once per epoch (IRRA, CSKT, CFine) or every "step"
    augment: bool = True

    def __post_init__(self):
        if self.schedule_unit not in SCHEDULE_UNITS:
            raise ConfigError(f"recipe option 'schedule_unit' must be one of {', '.join(SCHEDULE_UNITS)}, "
                              f"got {self.schedule_unit!r}")

    def override(self, **changes) -> "Recipe":
        """Return a copy with ``changes`` applied; unknown keys or wrong types are errors."""
        known = {f.name: f for f in dataclasses.fields(self)}
        typed = {}
        for key, value in changes.items():
            if key not in known:
                raise ConfigError(f"unknown recipe option {key!r}; known options: {', '.join(sorted(known))}")
            typed[key] = _coerce(key, value, type(getattr(self, key)))
        return dataclasses.replace(self, **typed)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _coerce(key: str, value, kind: type):
    if kind is tuple:  # a list of epochs: "20,25,35" on the command line, a list in JSON
        try:
            items = value.split(",") if isinstance(value, str) else list(value)
            return tuple(int(v) for v in items if str(v).strip())
        except (TypeError, ValueError):
            raise ConfigError(f"recipe option {key!r} expects comma-separated integers, got {value!r}") from None
    if isinstance(value, kind):
        return value
    if isinstance(value, str):
        try:
            if kind is bool:
                if value.lower() in ("1", "true", "yes", "on"):
                    return True
                if value.lower() in ("0", "false", "no", "off"):
                    return False
                raise ValueError(value)
            return kind(value)
        except ValueError:
            raise ConfigError(f"recipe option {key!r} expects {kind.__name__}, got {value!r}") from None
    if kind is float and isinstance(value, int):
        return float(value)
    raise ConfigError(f"recipe option {key!r} expects {kind.__name__}, got {value!r}")


@dataclass(frozen=True)
class Stage:
    """One phase of training: its own recipe and the rule for which parameters learn."""

    name: str
    recipe: Recipe
    trainable: Callable[[str], bool] = field(compare=False)


class Method(nn.Module):
    """Base class: a CLIP backbone (``self.clip``) plus the method's additions."""

    name: ClassVar[str]
    default_recipe: ClassVar[Recipe]  # an instance of the method's own Recipe subclass
    # When True a checkpoint holds every weight and loads without the pretrained
    # backbone; when False it holds only the trainable weights and the backbone is
    # rebuilt from its reference (pretrained tag or file).
    checkpoint_holds_backbone: ClassVar[bool] = True
    # Parameter-name prefixes of modules the method adds (trained at a higher lr).
    new_module_prefixes: ClassVar[tuple[str, ...]] = ()

    def __init__(self, backbone: BackboneConfig, recipe: Recipe, num_classes: int, clip: nn.Module | None = None):
        """``clip``: towers built elsewhere (a tpr-ray checkpoint as the backbone); ``backbone``
        then says what they are, with its activation decided."""
        super().__init__()
        self.recipe = self.check_recipe(recipe)
        self.num_classes = num_classes
        if clip is None:
            self.backbone_config = resolved(backbone)  # with its activation decided, for checkpoints
            self.clip = build_clip(self.backbone_config)
        else:
            if backbone.quick_gelu is None:
                raise ConfigError("towers passed to a method need a backbone config with quick_gelu decided")
            self.backbone_config, self.clip = backbone, clip
        self.tokenizer = get_tokenizer(backbone)

    @classmethod
    def check_recipe(cls, recipe: Recipe) -> Recipe:
        """The one way to configure a method: its ``default_recipe`` with overrides."""
        kind = type(cls.default_recipe)
        if not isinstance(recipe, kind):
            raise ConfigError(f"method {cls.name!r} takes a {kind.__name__}, got a {type(recipe).__name__}; "
                              f"build it with {cls.__name__}.default_recipe.override(...)")
        return recipe

    # --- inference -------------------------------------------------------
    @property
    def embed_dim(self) -> int:
        """Dimension of the retrieval feature that encode_image/encode_text return."""
        return int(self.clip.text_projection.shape[1])

    def tokenize(self, captions: list[str]) -> torch.Tensor:
        return self.tokenizer(captions)

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    # --- training --------------------------------------------------------
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute the towers' block activations in the backward pass (open_clip's switch,
        honoured by ``clip_blocks.run_blocks``): less memory, same gradients, ~30 % more compute."""
        self.clip.set_grad_checkpointing(enable)

    def prepare_batch(self, batch: dict, device: torch.device) -> dict:
        """The inputs of ``forward`` from one training batch: ``images`` (normalised, on the
        device), ``captions`` (strings), ``person_ids`` and ``labels``. Here: the captions
        tokenized. A method that builds more inputs (IRRA's MLM: masked tokens and their
        targets) overrides this and adds its own keys. Runs outside autocast and DDP."""
        return {"images": batch["images"], "tokens": self.tokenize(batch["captions"]).to(device),
                "person_ids": batch["person_ids"], "labels": batch["labels"]}

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        """Losses for one batch (made by ``prepare_batch``); ``loss`` is the total to back-propagate.

        Training goes through ``forward`` (not a named method) so DDP sees the call.
        """
        raise NotImplementedError

    def stages(self) -> list[Stage]:
        return [Stage("train", self.recipe, lambda name: True)]

    def set_stage(self, stage: Stage) -> None:
        for name, param in self.named_parameters():
            param.requires_grad_(stage.trainable(name))

    def lr_and_weight_decay(self, name: str, recipe: Recipe) -> tuple[float, float]:
        """IRRA's rule: biases get ``bias_lr_mult`` and ``bias_weight_decay``; a new module's
        parameters get ``new_module_lr_mult`` instead of (not on top of) the bias multiplier."""
        lr, wd = recipe.lr, recipe.weight_decay
        if name.endswith("bias"):
            lr, wd = recipe.lr * recipe.bias_lr_mult, recipe.bias_weight_decay
        if name.startswith(self.new_module_prefixes):
            lr = recipe.lr * recipe.new_module_lr_mult
        return lr, wd

    def param_groups(self, recipe: Recipe) -> list[dict]:
        """One optimizer group per trainable parameter, with ``lr_and_weight_decay``'s settings."""
        groups = []
        for name, param in self.named_parameters():
            if param.requires_grad:
                lr, wd = self.lr_and_weight_decay(name, recipe)
                groups.append({"params": [param], "lr": lr, "weight_decay": wd, "name": name})
        return groups

    def parameter_counts(self) -> dict[str, int]:
        total = sum(p.numel() for p in self.parameters())
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        return {"total": total, "trainable": trainable}

    # --- checkpoints -----------------------------------------------------
    def checkpoint_state(self) -> dict[str, torch.Tensor]:
        state = self.state_dict()
        if self.checkpoint_holds_backbone:
            return state
        keep = {name for name, p in self.named_parameters() if p.requires_grad or not name.startswith("clip.")}
        return {k: v for k, v in state.items() if k in keep}
