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
    torchvision's per-image transforms (one erasing attempt instead of up to ten)."""
    n, h, w, _ = images.shape
    device = images.device
    x = images.permute(0, 3, 1, 2).float().div_(255.0)

    def uniform(n):  # drawn on the generator's device (CPU by default), used on the batch's
        return torch.rand(n, generator=generator, device=generator.device if generator else "cpu").to(device)

    flip = uniform(n) < 0.5
    x = torch.where(flip.view(n, 1, 1, 1), x.flip(-1), x)

    if pad:
        padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
        top = (uniform(n) * (2 * pad + 1)).long().clamp_(max=2 * pad)
        left = (uniform(n) * (2 * pad + 1)).long().clamp_(max=2 * pad)
        x = _crop(padded, top, left, h, w)

    if erase_p > 0:
        area = h * w * (erase_scale[0] + (erase_scale[1] - erase_scale[0]) * uniform(n))
        log_ratio = torch.log(torch.tensor(erase_ratio, device=device))
        ratio = torch.exp(log_ratio[0] + (log_ratio[1] - log_ratio[0]) * uniform(n))
        eh = torch.sqrt(area * ratio).round().long()
        ew = torch.sqrt(area / ratio).round().long()
        fits = (eh < h) & (ew < w) & (uniform(n) < erase_p)
        y0 = (uniform(n) * (h - eh + 1).clamp(min=1)).long()
        x0 = (uniform(n) * (w - ew + 1).clamp(min=1)).long()
        r = torch.arange(h, device=device).view(1, h, 1)
        c = torch.arange(w, device=device).view(1, 1, w)
        box = ((r >= y0.view(n, 1, 1)) & (r < (y0 + eh).view(n, 1, 1)) & (c >= x0.view(n, 1, 1))
               & (c < (x0 + ew).view(n, 1, 1)) & fits.view(n, 1, 1))
        mean = CLIP_MEAN.to(device).view(1, 3, 1, 1).expand(n, 3, h, w)
        x = torch.where(box.unsqueeze(1), mean, x)
    return normalize(x)


def _crop(padded: torch.Tensor, top: torch.Tensor, left: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Per-image crops of size (h, w) at (top, left) from an NCHW batch."""
    n, c = padded.shape[:2]
    rows = (top.view(n, 1) + torch.arange(h, device=padded.device)).view(n, 1, h, 1)
    cols = (left.view(n, 1) + torch.arange(w, device=padded.device)).view(n, 1, 1, w)
    batch = torch.arange(n, device=padded.device).view(n, 1, 1, 1)
    channel = torch.arange(c, device=padded.device).view(1, c, 1, 1)
    return padded[batch, channel, rows, cols]
