"""Image preprocessing shared by training, validation and embedding.

Decoding and resizing happen on the CPU and produce uint8 HWC arrays (4x less
data to move than float); normalisation happens next to the model, on its device.
Training augmentation follows the anchors: horizontal flip, pad 10 + random crop,
random erasing.
"""

from __future__ import annotations

import io

import numpy as np
import torch
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from PIL import Image, ImageOps
from torchvision.transforms import v2

# Pillow refuses images above ~179 M pixels as "decompression bombs"; real crops are tiny, but
# a gallery may hold large frames. Above this limit an image is rejected, not embedded.
Image.MAX_IMAGE_PIXELS = 1 << 28

CLIP_MEAN = torch.tensor(OPENAI_DATASET_MEAN).view(1, 3, 1, 1)
CLIP_STD = torch.tensor(OPENAI_DATASET_STD).view(1, 3, 1, 1)


def decode_image(data: bytes, target_size: tuple[int, int] | None = None) -> Image.Image:
    """Decode bytes into an RGB image (palette, grey, RGBA, CMYK and 16-bit included).

    With ``target_size`` (H, W), JPEGs are decoded at the smallest power-of-two reduction
    that is still at least that large: decoding a large photo at 1/8 scale is several times
    cheaper than decoding it whole and resizing (the usual CPU bottleneck of bulk embedding).
    """
    img = Image.open(io.BytesIO(data))
    if target_size is not None and img.format == "JPEG":
        img.draft("RGB", (target_size[1], target_size[0]))
    img.load()
    img = ImageOps.exif_transpose(img)
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, dtype=np.float32)
        img = Image.fromarray(np.clip(arr / max(arr.max(), 1.0) * 255.0, 0, 255).astype(np.uint8))
    if img.mode in ("RGBA", "LA", "P"):
        img = img.convert("RGBA")
        background = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, img)
    return img.convert("RGB")


def resize_uint8(img: Image.Image, size: tuple[int, int]) -> np.ndarray:
    """Resize to ``size`` (H, W) with bicubic filtering, as CLIP does; returns HxWx3 uint8."""
    h, w = size
    if img.size != (w, h):
        img = img.resize((w, h), Image.BICUBIC)
    return np.array(img, dtype=np.uint8)  # a writable copy: torch refuses read-only arrays


def normalize(batch_uint8: torch.Tensor) -> torch.Tensor:
    """uint8 NHWC (or NCHW float in 0..1) -> CLIP-normalised float NCHW on the same device."""
    if batch_uint8.dtype == torch.uint8:
        x = batch_uint8.permute(0, 3, 1, 2).float().div_(255.0)
    else:
        x = batch_uint8
    mean, std = CLIP_MEAN.to(x.device), CLIP_STD.to(x.device)
    return (x - mean) / std


def train_augment(size: tuple[int, int]) -> v2.Transform:
    """Per-image augmentation on a CHW float tensor in 0..1 (before normalisation)."""
    return v2.Compose([
        v2.RandomHorizontalFlip(0.5),
        v2.Pad(10),
        v2.RandomCrop(size),
        v2.RandomErasing(p=0.5, scale=(0.02, 0.4), value=list(OPENAI_DATASET_MEAN)),
    ])
