"""Training objectives shared by the methods, and the cross-worker gather they need.

Contrastive-style losses must see the global batch: each worker contributes its
local rows and compares them against the features gathered from every worker.
``gather_with_grad`` keeps the autograd graph across workers (its backward sums
the gradient each worker sends back), so with DDP averaging the result equals
one worker holding the whole batch.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
import torch.nn.functional as F


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` from all workers in rank order, differentiably."""
    if world_size() == 1:
        return x
    return torch.cat(dist_fn.all_gather(x), dim=0)


def gather_no_grad(x: torch.Tensor) -> torch.Tensor:
    if world_size() == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=0)


def identity_labels(row_pids: torch.Tensor, col_pids: torch.Tensor) -> torch.Tensor:
    """1.0 where row and column belong to the same person."""
    return (row_pids.view(-1, 1) == col_pids.view(1, -1)).float()


def _sdm_direction(sims: torch.Tensor, labels: torch.Tensor, scale: float, eps: float) -> torch.Tensor:
    """KL(predicted match distribution || true match distribution), per row, averaged."""
    logits = scale * sims
    target = labels / labels.sum(dim=1, keepdim=True)
    log_pred = F.log_softmax(logits, dim=1)
    kl = log_pred.exp() * (log_pred - torch.log(target + eps))
    return kl.sum(dim=1).mean()


def sdm_loss(
    image_feats: torch.Tensor,
    text_feats: torch.Tensor,
    pids: torch.Tensor,
    temperature: float = 0.02,
    eps: float = 1e-8,
    gather=gather_with_grad,
) -> torch.Tensor:
    """Similarity distribution matching (IRRA), image->text plus text->image.

    Every local image (text) row is scored against all texts (images) of the
    global batch; rows sharing a person id are all correct matches and share the
    target probability mass.
    """
    image_feats = F.normalize(image_feats, dim=-1)
    text_feats = F.normalize(text_feats, dim=-1)
    all_images, all_texts, all_pids = gather(image_feats), gather(text_feats), gather_no_grad(pids)
    scale = 1.0 / temperature
    i2t = _sdm_direction(image_feats @ all_texts.t(), identity_labels(pids, all_pids), scale, eps)
    t2i = _sdm_direction(text_feats @ all_images.t(), identity_labels(pids, all_pids), scale, eps)
    return i2t + t2i


def id_loss(classifier: torch.nn.Module, image_feats: torch.Tensor, text_feats: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Identity classification of both modalities through one shared classifier."""
    logits_img = classifier(image_feats.float())
    logits_txt = classifier(text_feats.float())
    return 0.5 * (F.cross_entropy(logits_img, labels) + F.cross_entropy(logits_txt, labels))
