"""Model-side image transforms: normalisation and training augmentation.

Decoding and resizing (`images.py`) produce uint8 HWC arrays on the CPU (4x less data to
move than float); normalisation happens next to the model, on its device. Training
augmentation follows the anchors: horizontal flip, pad 10 + random crop, random erasing.
"""

from __future__ import annotations

import torch
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from torchvision.transforms import v2

CLIP_MEAN = torch.tensor(OPENAI_DATASET_MEAN).view(1, 3, 1, 1)
CLIP_STD = torch.tensor(OPENAI_DATASET_STD).view(1, 3, 1, 1)


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


def batch_augment(images: torch.Tensor, pad: int = 10, erase_p: float = 0.5, erase_scale=(0.02, 0.4),
                  erase_ratio=(0.3, 3.3), generator: torch.Generator | None = None) -> torch.Tensor:
    """:func:`train_augment` for a whole uint8 NHWC batch at once, on the batch's device:
    horizontal flip, zero pad + random crop back to size, random erasing with the CLIP mean,
    then normalisation. Returns CLIP-normalised float NCHW.

    Each image draws its own flip, crop offset and erasing box, with the same distributions as
    torchvision's per-image transforms (one erasing attempt instead of up to ten). The draws are
    made at once on the CPU; flip and crop then are views of the padded uint8 batch, so the only
    full-size float work is one conversion and the normalisation."""
    n, h, w, _ = images.shape
    u = torch.rand(n, 6, generator=generator)  # flip, top, left, erase?, area, ratio
    flip = (u[:, 0] < 0.5).tolist()
    top = (u[:, 1] * (2 * pad + 1)).long().clamp_(max=2 * pad).tolist()
    left = (u[:, 2] * (2 * pad + 1)).long().clamp_(max=2 * pad).tolist()
    padded = torch.nn.functional.pad(images.permute(0, 3, 1, 2), (pad, pad, pad, pad)) if pad else images.permute(0, 3, 1, 2)
    crops = []
    for i in range(n):
        crop = padded[i, :, top[i]:top[i] + h, left[i]:left[i] + w] if pad else padded[i]
        crops.append(crop.flip(-1) if flip[i] else crop)
    x = torch.stack(crops).float().div_(255.0)
    if erase_p > 0:
        area = h * w * (erase_scale[0] + (erase_scale[1] - erase_scale[0]) * u[:, 4])
        lo, hi = torch.log(torch.tensor(erase_ratio[0])), torch.log(torch.tensor(erase_ratio[1]))
        ratio = torch.exp(lo + (hi - lo) * u[:, 5])
        eh = torch.sqrt(area * ratio).round().long().tolist()
        ew = torch.sqrt(area / ratio).round().long().tolist()
        fill = CLIP_MEAN.view(3, 1, 1).to(x.device)
        pos = torch.rand(n, 2, generator=generator)
        for i in range(n):
            if u[i, 3] < erase_p and eh[i] < h and ew[i] < w:
                y0 = int(pos[i, 0] * (h - eh[i] + 1))
                x0 = int(pos[i, 1] * (w - ew[i] + 1))
                x[i, :, y0:y0 + eh[i], x0:x0 + ew[i]] = fill
    return normalize(x)
