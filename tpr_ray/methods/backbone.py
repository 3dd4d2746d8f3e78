"""The CLIP backbone every method starts from, built through open_clip.

Any open_clip architecture name works, with weights from a pretrained tag
(``openai``, ``laion2b_s34b_b88k`` ...) or a local checkpoint file. Pedestrian
crops are 384x128 (H x W); open_clip interpolates the pretrained positional
embedding to the new patch grid when it loads the weights (14x14 -> 24x8 for
ViT-B/16; bicubic with antialiasing, the [CLS] row kept; IRRA uses bilinear).
``tpr-tiny`` is a small randomly initialised architecture shipped for tests and the demo.

The MLP activation belongs to the weights, not to the architecture name: OpenAI's CLIP
was trained with QuickGELU, while open_clip's ``ViT-B-16`` config builds GELU and only
warns when the ``openai`` tag disagrees. ``resolve_quick_gelu`` decides it from the
weights (see there), and the decision is recorded in ``BackboneConfig.quick_gelu`` so
that a checkpoint rebuilds the same network without its pretrained source.
"""

from __future__ import annotations

import contextlib
import logging
import os
import zipfile
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import open_clip
import torch

from tpr_ray.errors import ConfigError

MODEL_CONFIG_DIR = Path(__file__).parents[1] / "model_configs"
open_clip.add_model_config(MODEL_CONFIG_DIR)

DEFAULT_IMAGE_SIZE = (384, 128)


@dataclass(frozen=True)
class BackboneConfig:
    """Which CLIP to build. ``pretrained`` is a tag, a local file, or None (random init)."""

    model: str = "ViT-B-16"
    pretrained: str | None = "openai"
    image_size: tuple[int, int] = DEFAULT_IMAGE_SIZE
    # True: QuickGELU (OpenAI's weights), False: GELU, None: decided from the weights.
    quick_gelu: bool | None = None

    def to_dict(self) -> dict:
        d = asdict(self)
        d["image_size"] = list(self.image_size)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "BackboneConfig":
        return cls(model=d["model"], pretrained=d.get("pretrained"), image_size=tuple(d["image_size"]),
                   quick_gelu=d.get("quick_gelu"))


def _is_local_file(pretrained: str) -> bool:
    return os.sep in pretrained or pretrained.endswith((".pt", ".pth", ".bin", ".safetensors")) or os.path.exists(pretrained)


log = logging.getLogger(__name__)


def is_openai_file(path: str) -> bool:
    """Whether a weights file is in the format OpenAI publishes CLIP in.

    OpenAI's releases are TorchScript archives, and its ``clip.model.build_model`` keeps
    the weights in half precision; open_clip's own checkpoints are plain fp32 state dicts
    (or safetensors). Either OpenAI sign is taken to mean OpenAI-trained, QuickGELU weights.
    """
    if path.endswith(".safetensors"):
        return False
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            if any(name.endswith("constants.pkl") or "/code/" in name for name in archive.namelist()):
                return True  # TorchScript
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # not a plain state dict; open_clip reports what it is when it loads it
        return False
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    weight = state.get("visual.conv1.weight") if isinstance(state, dict) else None
    return isinstance(weight, torch.Tensor) and weight.dtype == torch.float16


def resolve_quick_gelu(cfg: BackboneConfig) -> bool:
    """QuickGELU or GELU for these weights, in this order:

    an explicit ``cfg.quick_gelu`` (a tpr-ray checkpoint as the backbone sets it to what it
    was trained with: ``tpr_ray.model.checkpoint.build_method``); a
    pretrained tag: its pretrained config (``openai`` and MetaCLIP tags say QuickGELU,
    LAION/DataComp tags GELU); a local file in OpenAI's format (``is_openai_file``):
    QuickGELU; otherwise the architecture's config (``ViT-B-16-quickgelu`` says QuickGELU).
    """
    if cfg.quick_gelu is not None:
        return cfg.quick_gelu
    architecture = bool((open_clip.get_model_config(cfg.model) or {}).get("quick_gelu", False))
    pretrained = cfg.pretrained
    if not pretrained:
        return architecture
    tag = open_clip.get_pretrained_cfg(cfg.model, pretrained)
    if tag:
        return bool(tag.get("quick_gelu", False))
    if os.path.isfile(pretrained) and is_openai_file(pretrained):
        return True
    if not architecture and f"{cfg.model}-quickgelu" in open_clip.list_models():
        log.warning("%s does not say which activation its weights need; building GELU as %s's config does. "
                    "For OpenAI-trained weights pass --model %s-quickgelu", pretrained, cfg.model, cfg.model)
    return architecture


def resolved(cfg: BackboneConfig) -> BackboneConfig:
    """``cfg`` with its activation decided (what checkpoints record)."""
    check_model(cfg)
    if cfg.pretrained and _is_local_file(cfg.pretrained) and not os.path.exists(cfg.pretrained):
        raise ConfigError(f"pretrained checkpoint file {cfg.pretrained} does not exist")
    return replace(cfg, quick_gelu=resolve_quick_gelu(cfg))


def check_model(cfg: BackboneConfig) -> None:
    if cfg.model not in open_clip.list_models():
        raise ConfigError(
            f"unknown open_clip model {cfg.model!r}; choose one of open_clip.list_models() "
            f"(e.g. ViT-B-16) or 'tpr-tiny' for tests"
        )


class _NoRandomInitWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("No pretrained weights loaded")


@contextlib.contextmanager
def weights_loaded_after():
    """Build models whose weights are loaded right after (from a checkpoint): open_clip's
    warning that the model was "initialized randomly" would be false, and is dropped."""
    quiet = _NoRandomInitWarning()
    logging.getLogger().addFilter(quiet)  # open_clip logs through the root logger
    try:
        yield
    finally:
        logging.getLogger().removeFilter(quiet)


def build_clip(cfg: BackboneConfig) -> torch.nn.Module:
    """Return an open_clip CLIP at ``cfg.image_size`` with the requested weights.

    ``cfg.pretrained`` may be an open_clip tag or a local checkpoint file (open_clip's or
    OpenAI's format). A checkpoint of a method trained by tpr-ray, as the starting point of
    another, is loaded one layer up (``tpr_ray.model.checkpoint.build_method``). The activation follows ``resolve_quick_gelu``.
    """
    cfg = resolved(cfg)
    pretrained = cfg.pretrained or None
    try:
        model = open_clip.create_model(
            cfg.model,
            pretrained=pretrained,
            force_image_size=tuple(cfg.image_size),
            require_pretrained=bool(pretrained),
            force_quick_gelu=cfg.quick_gelu,  # also silences open_clip's mismatch warning
            quick_gelu=cfg.quick_gelu,  # a model keyword wins over the config, both ways
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

