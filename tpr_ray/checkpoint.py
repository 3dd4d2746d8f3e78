"""Checkpoint layout shared by the trainer, the embedder and the CLI.

A checkpoint is a directory (local or on object storage) holding:

- ``model.pt``      the method's weights (all of them, or only the trainable ones
                    for methods that keep the backbone frozen), loaded with
                    ``torch.load(weights_only=True)``;
- ``config.json``   method, backbone reference, recipe, number of classes, stage,
                    epoch, step, parameter counts: everything needed to rebuild it;
- ``optimizer.pt``  optimizer and schedule state, for resuming (training only).

A training run directory also holds ``best.json`` naming its best checkpoint by
validation R@1; pointing the embedder at the run directory uses that one.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile

import torch

from tpr_ray import storage
from tpr_ray.backbone import BackboneConfig
from tpr_ray.errors import ConfigError
from tpr_ray.methods import Method, get_method

MODEL_FILE = "model.pt"
CONFIG_FILE = "config.json"
OPTIMIZER_FILE = "optimizer.pt"
BEST_FILE = "best.json"


def save_checkpoint(method: Method, directory: str, info: dict, optimizer_state: dict | None = None) -> None:
    """Write a checkpoint into a local directory (Ray Train uploads it to storage)."""
    os.makedirs(directory, exist_ok=True)
    torch.save(method.checkpoint_state(), os.path.join(directory, MODEL_FILE))
    config = {
        "method": method.name,
        "backbone": method.backbone_config.to_dict(),
        "recipe": method.recipe.to_dict(),
        "num_classes": method.num_classes,
        "embed_dim": method.embed_dim,
        **info,
    }
    storage.write_json(os.path.join(directory, CONFIG_FILE), config)
    if optimizer_state is not None:
        torch.save(optimizer_state, os.path.join(directory, OPTIMIZER_FILE))


def resolve_checkpoint(uri: str) -> str:
    """A checkpoint directory, or a training run directory (then its best checkpoint)."""
    if storage.exists(storage.join(uri, CONFIG_FILE)):
        return uri
    best = storage.join(uri, BEST_FILE)
    if storage.exists(best):
        return storage.read_json(best)["checkpoint"]
    raise ConfigError(
        f"{uri} is neither a checkpoint (no {CONFIG_FILE}) nor a training run directory (no {BEST_FILE}); "
        f"pass the directory printed at the end of `tpr-ray train`"
    )


def local_copy(uri: str) -> str:
    """A local directory with the checkpoint's files (downloaded when remote)."""
    if not storage.is_remote(uri):
        return uri
    fs, path = storage.filesystem(uri)
    target = tempfile.mkdtemp(prefix="tpr-ckpt-")
    for name in (MODEL_FILE, CONFIG_FILE):
        fs.get(f"{path}/{name}", os.path.join(target, name))
    return target


def read_config(uri: str) -> dict:
    return storage.read_json(storage.join(uri, CONFIG_FILE))


def load_method(uri: str, map_location: str | torch.device = "cpu") -> tuple[Method, dict]:
    """Rebuild a method from a checkpoint; returns (method in eval mode, its config)."""
    uri = resolve_checkpoint(uri)
    local = local_copy(uri)
    config = read_config(local)
    cls = get_method(config["method"])
    backbone = BackboneConfig.from_dict(config["backbone"])
    if cls.checkpoint_holds_backbone:
        backbone = dataclasses.replace(backbone, pretrained=None)  # every weight is in the file
    recipe = cls.default_recipe.override(**config["recipe"])
    method = cls(backbone, recipe, config["num_classes"])
    state = torch.load(os.path.join(local, MODEL_FILE), map_location=map_location, weights_only=True)
    missing, unexpected = method.load_state_dict(state, strict=False)
    if unexpected or (cls.checkpoint_holds_backbone and missing):
        raise ConfigError(
            f"checkpoint {uri} does not match method {cls.name} / {backbone.model}: "
            f"missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    config["checkpoint"] = uri
    return method.eval(), config
