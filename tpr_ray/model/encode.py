"""Turning images and captions into L2-normalised retrieval features with any method."""

from __future__ import annotations

import contextlib

import numpy as np
import torch
import torch.nn.functional as F

from tpr_ray.methods import Method
from tpr_ray.model.transforms import normalize


def autocast(device: torch.device):
    """bf16 autocast on GPU; full precision on CPU (bf16 matmuls are slow there)."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.inference_mode()
def encode_images(method: Method, images_uint8: np.ndarray | torch.Tensor, device: torch.device) -> np.ndarray:
    """NHWC uint8 images -> (N, dim) float32 unit vectors."""
    x = torch.as_tensor(images_uint8).to(device, non_blocking=True)
    with autocast(device):
        feats = method.encode_image(normalize(x))
    return F.normalize(feats.float(), dim=-1).cpu().numpy()


@torch.inference_mode()
def encode_captions(method: Method, captions: list[str], device: torch.device) -> np.ndarray:
    """Captions -> (N, dim) float32 unit vectors, tokenised the method's way."""
    tokens = method.tokenize(list(captions)).to(device)
    with autocast(device):
        feats = method.encode_text(tokens)
    return F.normalize(feats.float(), dim=-1).cpu().numpy()
