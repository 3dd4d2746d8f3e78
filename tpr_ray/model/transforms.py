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
