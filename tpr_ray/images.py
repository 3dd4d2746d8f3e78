"""Decoding and resizing images on the CPU, with nothing heavier than Pillow and numpy.

Kept free of torch so the decode stage of an embedding job (many small Ray tasks) starts
fast and stays small in memory; the model side lives in `transforms.py`.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageOps

from tpr_ray import storage

# Pillow refuses images above ~179 M pixels as "decompression bombs"; real crops are tiny, but
# a gallery may hold large frames. Above this limit an image is rejected, not embedded.
Image.MAX_IMAGE_PIXELS = 1 << 28


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


def decode_batch(batch: dict, image_size) -> dict:
    """Ray Data stage: fetch, decode and resize each image; unreadable ones carry a reason instead."""
    h, w = image_size
    pixels = np.zeros((len(batch["image_uri"]), h, w, 3), dtype=np.uint8)
    reasons = []
    for i, uri in enumerate(batch["image_uri"]):
        try:
            pixels[i] = resize_uint8(decode_image(storage.read_bytes(uri), (h, w)), (h, w))
            reasons.append("")
        except Exception as exc:  # every failure is recorded with its reason, none is dropped
            reasons.append(f"{type(exc).__name__}: {exc}"[:500])
    return {**batch, "pixels": pixels, "reject_reason": np.array(reasons, dtype=object)}
