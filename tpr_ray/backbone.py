"""The CLIP backbone every method starts from, built through open_clip.

Any open_clip architecture name works, with weights from a pretrained tag
(``openai``, ``laion2b_s34b_b88k`` ...) or a local checkpoint file. Pedestrian
crops are 384x128 (H x W); open_clip interpolates the pretrained positional
embedding to the new patch grid when it loads the weights (14x14 -> 24x8 for
ViT-B/16). ``tpr-tiny`` is a small randomly initialised architecture shipped for
tests and the demo.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path

import open_clip
import torch

from tpr_ray.errors import ConfigError

MODEL_CONFIG_DIR = Path(__file__).parent / "model_configs"
open_clip.add_model_config(MODEL_CONFIG_DIR)

DEFAULT_IMAGE_SIZE = (384, 128)


@dataclass(frozen=True)
class BackboneConfig:
    """Which CLIP to build. ``pretrained`` is a tag, a local file, or None (random init)."""

    model: str = "ViT-B-16"
    pretrained: str | None = "openai"
    image_size: tuple[int, int] = DEFAULT_IMAGE_SIZE

    def to_dict(self) -> dict:
        d = asdict(self)
        d["image_size"] = list(self.image_size)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "BackboneConfig":
        return cls(model=d["model"], pretrained=d.get("pretrained"), image_size=tuple(d["image_size"]))


def _is_local_file(pretrained: str) -> bool:
    return os.sep in pretrained or pretrained.endswith((".pt", ".pth", ".bin", ".safetensors")) or os.path.exists(pretrained)


def is_tpr_checkpoint(pretrained: str) -> bool:
    """A checkpoint or run directory written by `tpr-ray train` (local or URI)."""
    from tpr_ray import storage
    from tpr_ray.checkpoint import BEST_FILE, CONFIG_FILE

    return any(storage.exists(storage.join(pretrained, name)) for name in (CONFIG_FILE, BEST_FILE))


def _clip_from_tpr_checkpoint(cfg: BackboneConfig) -> torch.nn.Module:
    """The CLIP towers of a method trained by tpr-ray, as the starting point of another."""
    from open_clip.model import resize_pos_embed

    from tpr_ray.checkpoint import load_method

    trained, config = load_method(cfg.pretrained)
    if config["backbone"]["model"] != cfg.model:
        raise ConfigError(f"checkpoint {config['checkpoint']} holds a {config['backbone']['model']} backbone, "
                          f"not {cfg.model}; pass --model {config['backbone']['model']}")
    model = open_clip.create_model(cfg.model, pretrained=None, force_image_size=tuple(cfg.image_size))
    state = trained.clip.state_dict()
    resize_pos_embed(state, model)
    model.load_state_dict(state)
    model.output_dict = True
    return model


def build_clip(cfg: BackboneConfig) -> torch.nn.Module:
    """Return an open_clip CLIP at ``cfg.image_size`` with the requested weights.

    ``cfg.pretrained`` may be an open_clip tag, a local open_clip checkpoint file, or a
    checkpoint (or run directory) of any method trained by tpr-ray, whose CLIP towers are used.
    """
    if cfg.model not in open_clip.list_models():
        raise ConfigError(
            f"unknown open_clip model {cfg.model!r}; choose one of open_clip.list_models() "
            f"(e.g. ViT-B-16) or 'tpr-tiny' for tests"
        )
    pretrained = cfg.pretrained or None
    if pretrained and is_tpr_checkpoint(pretrained):
        return _clip_from_tpr_checkpoint(cfg)
    if pretrained and _is_local_file(pretrained) and not os.path.exists(pretrained):
        raise ConfigError(f"pretrained checkpoint file {pretrained} does not exist")
    try:
        model = open_clip.create_model(
            cfg.model,
            pretrained=pretrained,
            force_image_size=tuple(cfg.image_size),
            require_pretrained=bool(pretrained),
        )
    except Exception as exc:  # download and load failures come in many types
        if pretrained and not _is_local_file(pretrained):
            raise ConfigError(
                f"could not load pretrained weights {cfg.model}/{pretrained}: {exc}\n"
                f"If this machine cannot download them, fetch the checkpoint elsewhere "
                f"(e.g. open_clip's '{cfg.model}' '{pretrained}' file from the Hugging Face hub) "
                f"and pass its local path instead: --pretrained /path/to/open_clip_model.safetensors"
            ) from exc
        raise ConfigError(f"could not build {cfg.model} with weights {pretrained}: {exc}") from exc
    model.output_dict = True
    return model


def get_tokenizer(cfg: BackboneConfig):
    """CLIP's BPE tokenizer (77 tokens; over-long captions are cut and keep [EOS])."""
    return open_clip.get_tokenizer(cfg.model)


def eos_token_id(tokenizer) -> int:
    return tokenizer.eot_token_id
