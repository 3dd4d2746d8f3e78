"""Training augmentation on whole batches of uint8 crops, on the model's device.

The per-sample path (`transforms.train_augment`, one image at a time in DataLoader workers)
costs CPU time per image; here one batch of ``N x H x W x 3`` uint8 crops is flipped,
padded and cropped, normalised and randomly erased with a handful of tensor operations, on
the GPU when there is one. The parameters are those of the per-sample path (and of IRRA):
flip with p 0.5, zero padding of 10 then a random crop back to H x W, CLIP mean/std, random
erasing with p 0.5, area 2-40 % and aspect ratio 0.3-3.3 (log-uniform, at most 10 tries, as
torchvision draws it). Erasing comes after normalisation and fills 0, which is the per-sample
path's fill with the CLIP mean before normalisation.

Random numbers are drawn on the CPU from one seeded generator whatever the device, so a seed
gives the same augmentation on CPU and GPU; they are a few numbers per image, the pixels stay
where they are.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from tpr_ray.model.transforms import CLIP_MEAN, CLIP_STD


@dataclass(frozen=True)
class AugmentSettings:
    flip_p: float = 0.5
    pad: int = 10
    erase_p: float = 0.5
    erase_scale: tuple[float, float] = (0.02, 0.4)
    erase_ratio: tuple[float, float] = (0.3, 3.3)
    erase_tries: int = 10


# On a GPU each step is one kernel over the whole batch. On the CPU, per-image slice copies
# touch only the pixels that change and are several times cheaper than the batched index and
# mask arithmetic; ``vectorised`` picks the form (default: batched on CUDA), both give the same.

def flip(images: torch.Tensor, which: torch.Tensor, vectorised: bool | None = None) -> torch.Tensor:
    """Mirror left-right the NHWC images where ``which`` (bool, N) is set."""
    if images.is_cuda if vectorised is None else vectorised:
        return torch.where(which.view(-1, 1, 1, 1).to(images.device), images.flip(2), images)
    out = images.clone()
    for k in torch.nonzero(which).flatten().tolist():
        out[k] = images[k].flip(1)
    return out


def pad_crop(images: torch.Tensor, pad: int, top: torch.Tensor, left: torch.Tensor,
             vectorised: bool | None = None) -> torch.Tensor:
    """Zero-pad NHWC images by ``pad`` on every side, then cut H x W at (top, left) per image."""
    n, h, w, _ = images.shape
    if images.is_cuda if vectorised is None else vectorised:
        padded = torch.nn.functional.pad(images, (0, 0, pad, pad, pad, pad))
        device = images.device
        rows = (top.to(device).view(-1, 1) + torch.arange(h, device=device)).view(n, h, 1)
        cols = (left.to(device).view(-1, 1) + torch.arange(w, device=device)).view(n, 1, w)
        return padded[torch.arange(n, device=device).view(n, 1, 1), rows, cols]
    out = torch.zeros_like(images)
    for k, (dy, dx) in enumerate(zip((top - pad).tolist(), (left - pad).tolist())):
        # output (y, x) shows input (y + dy, x + dx) where that lies inside the image
        rows, cols = h - abs(dy), w - abs(dx)
        if rows > 0 and cols > 0:
            out[k, max(0, -dy):max(0, -dy) + rows, max(0, -dx):max(0, -dx) + cols] = \
                images[k, max(0, dy):max(0, dy) + rows, max(0, dx):max(0, dx) + cols]
    return out


def normalize_nhwc(images: torch.Tensor) -> torch.Tensor:
    """uint8 NHWC -> CLIP-normalised float NCHW (a channels-last view: one pass, no transpose copy)."""
    n, h, w, _ = images.shape
    # The per-channel constants tiled along a row: an inner dimension of W*3 vectorises, one of 3 does not.
    scale = (1.0 / (255.0 * CLIP_STD)).flatten().repeat(w).to(images.device)
    shift = (-CLIP_MEAN / CLIP_STD).flatten().repeat(w).to(images.device)
    x = images.reshape(n, h, w * 3).float().mul_(scale).add_(shift)
    return x.view(n, h, w, 3).permute(0, 3, 1, 2)


def erase_boxes(n: int, size: tuple[int, int], settings: AugmentSettings, generator: torch.Generator) -> torch.Tensor:
    """Per image (top, left, height, width) of the box to erase; height 0 means no erasing.

    Follows torchvision's draw: up to ``erase_tries`` (area, log-ratio) candidates, the first
    whose box fits inside the image wins, none fitting means no erasing.
    """
    h, w = size
    tries = settings.erase_tries
    area = h * w * torch.empty(n, tries).uniform_(*settings.erase_scale, generator=generator)
    log_lo, log_hi = math.log(settings.erase_ratio[0]), math.log(settings.erase_ratio[1])
    ratio = torch.exp(torch.empty(n, tries).uniform_(log_lo, log_hi, generator=generator))
    box_h = torch.sqrt(area * ratio).round().long()
    box_w = torch.sqrt(area / ratio).round().long()
    fits = (box_h < h) & (box_w < w)
    first = fits.long().argmax(dim=1, keepdim=True)  # argmax of a 0/1 row is its first 1
    box_h, box_w = box_h.gather(1, first).squeeze(1), box_w.gather(1, first).squeeze(1)
    chosen = fits.any(dim=1) & (torch.rand(n, generator=generator) < settings.erase_p)
    box_h, box_w = box_h * chosen, box_w * chosen
    top = (torch.rand(n, generator=generator) * (h - box_h + 1)).long()
    left = (torch.rand(n, generator=generator) * (w - box_w + 1)).long()
    return torch.stack([top, left, box_h, box_w], dim=1)


def erase_(x: torch.Tensor, boxes: torch.Tensor, value: float = 0.0, vectorised: bool | None = None) -> torch.Tensor:
    """Fill each NCHW image's box (top, left, height, width) with ``value``, in place."""
    _, _, h, w = x.shape
    if not (x.is_cuda if vectorised is None else vectorised):
        for k, (top, left, bh, bw) in enumerate(boxes.tolist()):
            if bh:
                x[k, :, top:top + bh, left:left + bw] = value
        return x
    boxes = boxes.to(x.device)
    top, left, bh, bw = (boxes[:, k].view(-1, 1, 1, 1) for k in range(4))
    rows = torch.arange(h, device=x.device).view(1, 1, h, 1)
    cols = torch.arange(w, device=x.device).view(1, 1, 1, w)
    inside = (rows >= top) & (rows < top + bh) & (cols >= left) & (cols < left + bw)
    return x.masked_fill_(inside, value)


class BatchAugment:
    """uint8 NHWC batch -> augmented, CLIP-normalised float NCHW on ``device``.

    With ``augment=False`` it only normalises (the recipe's ``augment`` switch).
    """

    def __init__(self, device, seed: int = 0, augment: bool = True, settings: AugmentSettings = AugmentSettings()):
        self.device = torch.device(device)
        self.augment = augment
        self.settings = settings
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[-1] != 3:
            raise ValueError(f"expected uint8 N x H x W x 3 images, got {images.dtype} {tuple(images.shape)}")
        images = images.to(self.device, non_blocking=True)
        if not self.augment:
            return normalize_nhwc(images)
        n, h, w, _ = images.shape
        s, g = self.settings, self.generator
        images = flip(images, torch.rand(n, generator=g) < s.flip_p)
        top = torch.randint(0, 2 * s.pad + 1, (n,), generator=g)
        left = torch.randint(0, 2 * s.pad + 1, (n,), generator=g)
        x = normalize_nhwc(pad_crop(images, s.pad, top, left))
        return erase_(x, erase_boxes(n, (h, w), s, g))
