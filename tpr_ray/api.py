"""The Python API: a trained model as an object with the shape open_clip users expect.

    import tpr_ray
    model = tpr_ray.load("runs/pd-CUHK-PEDES")          # a run (its best checkpoint) or a checkpoint
    text = model.encode_text(["a woman in a red coat"])   # (1, model.embed_dim) float32, unit length
    images = model.encode_images(["crops/0001.jpg"])      # paths / URIs, PIL images or HxWx3 uint8 arrays
    scores = text @ images.T                              # cosine similarities

``tpr_ray.search`` and ``tpr_ray.read_table`` come from the index and table modules.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable

import numpy as np

from tpr_ray.errors import ConfigError


def _as_list(items) -> list:
    if isinstance(items, (str, bytes)) or _is_one_image(items):
        return [items]
    return list(items)


def _is_one_image(item) -> bool:
    from PIL import Image

    return isinstance(item, Image.Image) or (isinstance(item, np.ndarray) and item.ndim == 3)


def _to_uint8(item, size: tuple[int, int]) -> np.ndarray:
    """A path / URI, PIL image or HxWx3 uint8 array -> the model's HxWx3 uint8 input."""
    from PIL import Image, ImageOps

    from tpr_ray.io import storage
    from tpr_ray.io.images import decode_image, resize_uint8

    if isinstance(item, str):
        image = decode_image(storage.read_bytes(item), size)
    elif isinstance(item, Image.Image):
        image = ImageOps.exif_transpose(item).convert("RGB")
    elif isinstance(item, np.ndarray):
        if item.dtype != np.uint8 or item.ndim != 3 or item.shape[2] != 3:
            raise ConfigError(f"an image array must be HxWx3 uint8, got shape {item.shape} dtype {item.dtype}")
        image = Image.fromarray(item)
    else:
        raise ConfigError(f"cannot read an image from a {type(item).__name__}: pass a path or URI, "
                          f"a PIL image or an HxWx3 uint8 array")
    return resize_uint8(image, size)


@dataclass
class Model:
    """A trained retrieval model: text and images in, unit-length numpy features out."""

    net: Any = field(repr=False)
    method: str
    embed_dim: int
    image_size: tuple[int, int]
    checkpoint: str
    device: Any = field(repr=False)

    def encode_text(self, texts: Iterable[str], batch_size: int = 256) -> np.ndarray:
        from tpr_ray.model.encode import encode_captions

        texts = _as_list(texts)
        if not all(isinstance(t, str) for t in texts):
            raise ConfigError("encode_text takes a list of strings")
        parts = [encode_captions(self.net, texts[i:i + batch_size], self.device)
                 for i in range(0, len(texts), batch_size)]
        return np.concatenate(parts) if parts else np.zeros((0, self.embed_dim), np.float32)

    def encode_images(self, images, batch_size: int = 64) -> np.ndarray:
        from tpr_ray.model.encode import encode_images

        images = _as_list(images)
        parts = []
        for i in range(0, len(images), batch_size):
            pixels = np.stack([_to_uint8(item, self.image_size) for item in images[i:i + batch_size]])
            parts.append(encode_images(self.net, pixels, self.device))
        return np.concatenate(parts) if parts else np.zeros((0, self.embed_dim), np.float32)

    def transform(self, image):
        """One image -> the normalised 3xHxW float tensor the image tower takes (open_clip's
        ``preprocess``); ``encode_images`` applies it itself."""
        import torch

        from tpr_ray.model.transforms import normalize

        return normalize(torch.from_numpy(_to_uint8(image, self.image_size))[None])[0]


def load(run_or_checkpoint: str, device: str | None = None) -> Model:
    """Load a training run (its best checkpoint) or a checkpoint folder, local or s3://."""
    import torch

    from tpr_ray.model.checkpoint import load_method

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    net, config = load_method(run_or_checkpoint, map_location=device)
    net.to(device)
    return Model(net=net, method=config["method"], embed_dim=int(net.embed_dim),
                 image_size=tuple(net.backbone_config.image_size), checkpoint=config["checkpoint"], device=device)
