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

import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
import time

import open_clip
import torch

from tpr_ray.io import storage
from tpr_ray.errors import ConfigError
from tpr_ray.methods import Method, Recipe, get_method
from tpr_ray.methods.backbone import BackboneConfig, check_model, weights_loaded_after

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


CACHE_ENV = "TPR_RAY_CHECKPOINT_CACHE"  # folder of the local copies of remote checkpoints
CACHE_BYTES_ENV = "TPR_RAY_CHECKPOINT_CACHE_BYTES"  # their total size, least recently used evicted first
DEFAULT_CACHE_BYTES = 20 * 1024**3
CHECKPOINT_FILES = (MODEL_FILE, CONFIG_FILE)


def checkpoint_digest(uri: str) -> str:
    """What a checkpoint's files hold, as a short hash: the same path rewritten with other
    weights gets another digest. Local files are hashed; for an object store its own content
    tag (the ETag, an MD5 of the bytes or of their parts) is used, so nothing is downloaded.
    """
    h = hashlib.sha256()
    fs, path = storage.filesystem(uri)
    for name in CHECKPOINT_FILES:
        h.update(f"{name}\n".encode())
        file_path = f"{path}/{name}"
        if storage.is_remote(uri):
            h.update(json.dumps(_content_tag(fs.info(file_path)), sort_keys=True).encode())
            continue
        with open(file_path, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
    return h.hexdigest()[:32]


def _content_tag(info: dict) -> dict:
    """The parts of an object's listing entry that change whenever its bytes do."""
    tags = {k: str(info[k]) for k in ("ETag", "etag", "md5Hash", "crc32c", "VersionId") if info.get(k)}
    if not tags:  # a store without content tags: size and modification time
        tags = {k: str(info[k]) for k in ("size", "mtime", "LastModified", "created", "updated") if k in info}
    return tags


def _cache_root() -> str:
    return os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "tpr-ray", "checkpoints")


def local_copy(uri: str) -> str:
    """A local directory with the checkpoint's files (downloaded once per content when remote).

    Remote checkpoints are kept in a cache keyed by their URI and content tags, so every
    actor, restart and search on a node reuses one copy, and a rewritten checkpoint is
    downloaded anew. The cache is bounded (``TPR_RAY_CHECKPOINT_CACHE_BYTES``): the least
    recently used copies are removed first.
    """
    if not storage.is_remote(uri):
        return uri
    root = _cache_root()
    key = hashlib.sha256(f"{uri}\n{checkpoint_digest(uri)}".encode()).hexdigest()[:24]
    target = os.path.join(root, key)
    if not os.path.isdir(target):
        fs, path = storage.filesystem(uri)
        os.makedirs(root, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=f"{storage.TEMP_PREFIX}{key}.", dir=root)
        try:
            for name in CHECKPOINT_FILES:
                fs.get(f"{path}/{name}", os.path.join(tmp, name))
            os.rename(tmp, target)  # atomic: readers see a whole copy or none
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
            if not os.path.isdir(target):  # not another process that won the race
                raise
    os.utime(target)  # most recently used
    _evict(root, keep=target)
    return target


def _evict(root: str, keep: str) -> None:
    """Remove the least recently used copies (and stale temporaries) beyond the size bound."""
    limit = int(os.environ.get(CACHE_BYTES_ENV, DEFAULT_CACHE_BYTES))
    entries = []
    for name in os.listdir(root):
        entry = os.path.join(root, name)
        try:
            stat = os.stat(entry)
            size = sum(os.path.getsize(os.path.join(entry, f)) for f in os.listdir(entry))
        except OSError:  # removed meanwhile by another process
            continue
        if name.startswith(storage.TEMP_PREFIX):
            if time.time() - stat.st_mtime > 3600:  # a download that died
                shutil.rmtree(entry, ignore_errors=True)
            continue
        entries.append((stat.st_mtime, size, entry))
    total = sum(size for _, size, _ in entries)
    for _, size, entry in sorted(entries):
        if total <= limit:
            break
        if entry != keep:
            shutil.rmtree(entry, ignore_errors=True)
            total -= size


def read_config(uri: str) -> dict:
    return storage.read_json(storage.join(uri, CONFIG_FILE))


def is_tpr_checkpoint(pretrained: str | None) -> bool:
    """A checkpoint or run directory written by `tpr-ray train` (local or URI)."""
    return bool(pretrained) and any(storage.exists(storage.join(pretrained, name)) for name in (CONFIG_FILE, BEST_FILE))


def _towers_of(cfg: BackboneConfig) -> tuple[BackboneConfig, torch.nn.Module]:
    """The CLIP towers of a method trained by tpr-ray, at ``cfg``'s image size, and ``cfg``
    with the activation they were trained with."""
    from open_clip.model import resize_pos_embed

    check_model(cfg)
    trained, config = load_method(cfg.pretrained)
    if config["backbone"]["model"] != cfg.model:
        raise ConfigError(f"checkpoint {config['checkpoint']} holds a {config['backbone']['model']} backbone, "
                          f"not {cfg.model}; pass --model {config['backbone']['model']}")
    cfg = dataclasses.replace(cfg, quick_gelu=bool(trained.backbone_config.quick_gelu))
    model = open_clip.create_model(cfg.model, pretrained=None, force_image_size=tuple(cfg.image_size),
                                   quick_gelu=cfg.quick_gelu)
    state = trained.clip.state_dict()
    resize_pos_embed(state, model)
    model.load_state_dict(state)
    model.output_dict = True
    return cfg, model


def build_method(cls: type[Method], backbone: BackboneConfig, recipe: Recipe, num_classes: int) -> Method:
    """``cls`` on ``backbone``, whose ``pretrained`` may also be a checkpoint (or run directory)
    of any method trained by tpr-ray: its CLIP towers are the starting point."""
    if is_tpr_checkpoint(backbone.pretrained):
        backbone, towers = _towers_of(backbone)
        return cls(backbone, recipe, num_classes, clip=towers)
    return cls(backbone, recipe, num_classes)


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
    # every weight comes from the file: open_clip's "initialized randomly" would be false
    with weights_loaded_after() if cls.checkpoint_holds_backbone else contextlib.nullcontext():
        method = build_method(cls, backbone, recipe, config["num_classes"])
    state = torch.load(os.path.join(local, MODEL_FILE), map_location=map_location, weights_only=True)
    missing, unexpected = method.load_state_dict(state, strict=False)
    if unexpected or (cls.checkpoint_holds_backbone and missing):
        raise ConfigError(
            f"checkpoint {uri} does not match method {cls.name} / {backbone.model}: "
            f"missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    config["checkpoint"] = uri
    return method.eval(), config
