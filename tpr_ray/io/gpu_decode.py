"""JPEG decoding on the model's GPU (nvJPEG through torchvision), with the CPU path as fallback.

On a GPU node the embedding job's CPU side is mostly JPEG decoding and bicubic resizing (see
`benchmarks/decode.py`); nvJPEG does both on the device the model already holds. Outputs are
not bit-identical to the CPU path: the resize is torch's antialiased bicubic, which follows
Pillow's filter but rounds differently, and large JPEGs are decoded whole instead of through
Pillow's DCT draft. `TOLERANCE` states the agreement that tests pin on crop-sized images.

Anything nvJPEG cannot take or would get wrong (PNG and other formats, CMYK, EXIF-rotated,
truncated or broken files, and any it refuses) goes through `images.load_pixels`' decode on the CPU, so which images are
rejected, and why, is decided in one place whatever the device.
"""

from __future__ import annotations

import numpy as np
import torch

from tpr_ray.io import images

# CPU vs GPU output on the same JPEG, in uint8 levels, when the CPU path decodes at full scale
# (the source is under twice the model size, as CUHK-PEDES crops are at 384x128): mean absolute
# difference and largest single difference. Measured on 100 CUHK-sized crops at 384x128: mean
# 0.19, max 3. When the source is over twice the model size, the CPU path decodes through the
# JPEG draft (a coarser DCT scale) and the difference grows (mean 3.8, max 50 for those crops
# at 96x32): both are valid downscales, not the same one.
TOLERANCE = {"mean": 0.5, "max": 4}

JPEG_MAGIC, JPEG_END = b"\xff\xd8\xff", b"\xff\xd9"


def _device_decode(tensors: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """nvJPEG batch decode to RGB CxHxW uint8 on ``device`` (the seam tests replace)."""
    from torchvision.io import ImageReadMode, decode_jpeg

    return decode_jpeg(tensors, mode=ImageReadMode.RGB, device=device)


def gpu_decode_available(device: torch.device) -> bool:
    if device.type != "cuda":
        return False
    try:
        import torchvision.io  # noqa: F401
    except ImportError:
        return False
    return True


def resize_on_device(chw: torch.Tensor, image_size) -> torch.Tensor:
    """CxHxW uint8 -> HxWx3 uint8 at ``image_size`` (H, W), antialiased bicubic like Pillow's."""
    h, w = image_size
    if tuple(chw.shape[1:]) != (h, w):
        x = torch.nn.functional.interpolate(chw[None].float(), size=(h, w), mode="bicubic", antialias=True,
                                            align_corners=False)
        chw = x[0].round_().clamp_(0, 255).to(torch.uint8)
    return chw.permute(1, 2, 0)


def decode_on_device(blobs, image_size, device: torch.device, *, use_gpu: bool | None = None):
    """(pixels NxHxWx3 uint8 on ``device``, reject reasons) for a batch of encoded images.

    JPEGs are decoded on the GPU when ``use_gpu`` (default: when ``device`` is CUDA and
    torchvision is there); the rest, and any JPEG nvJPEG refuses, on the CPU.
    """
    if use_gpu is None:
        use_gpu = gpu_decode_available(device)
    h, w = image_size
    pixels = torch.zeros((len(blobs), h, w, 3), dtype=torch.uint8, device=device)
    reasons = [""] * len(blobs)
    on_cpu = list(range(len(blobs)))
    if use_gpu:
        # Only whole, plain JPEGs go to the GPU: nvJPEG may fill a truncated file with grey where
        # Pillow refuses it, and on CUDA torchvision ignores EXIF rotation; CMYK, rotated, over
        # the pixel limit or broken ones are the CPU path's to decode or reject.
        jpegs = [i for i, b in enumerate(blobs) if bytes(b[:3]) == JPEG_MAGIC and bytes(b[-2:]) == JPEG_END
                 and images.plain_header(bytes(b))]
        decoded = []
        if jpegs:
            tensors = [torch.frombuffer(bytearray(blobs[i]), dtype=torch.uint8) for i in jpegs]
            try:
                decoded = _device_decode(tensors, device)
            except (RuntimeError, ValueError):  # one file nvJPEG refuses fails the batch: retry one by one
                decoded = [_decode_one(t, device) for t in tensors]
        done = set()
        for i, chw in zip(jpegs, decoded):
            if chw is not None:
                pixels[i] = resize_on_device(chw, (h, w))
                done.add(i)
        on_cpu = [i for i in on_cpu if i not in done]
    for i in on_cpu:
        try:
            pixels[i] = torch.from_numpy(images.decode_pixels(bytes(blobs[i]), (h, w))).to(device)
        except images.UnreadableImage as exc:
            reasons[i] = exc.reason
    return pixels, np.array(reasons, dtype=object)


def _decode_one(tensor: torch.Tensor, device: torch.device) -> torch.Tensor | None:
    try:
        return _device_decode([tensor], device)[0]
    except (RuntimeError, ValueError):
        return None
