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


def _match_divergence(logits: torch.Tensor, target: torch.Tensor, eps: float) -> torch.Tensor:
    """sum_j p_j (log p_j - log(target_j + eps)) with p = softmax(logits), per row, averaged."""
    log_pred = F.log_softmax(logits, dim=1)
    kl = log_pred.exp() * (log_pred - torch.log(target + eps))
    return kl.sum(dim=1).mean()


def _sdm_direction(sims: torch.Tensor, labels: torch.Tensor, scale: float, eps: float) -> torch.Tensor:
    """KL(predicted match distribution || true match distribution), per row, averaged."""
    return _match_divergence(scale * sims, labels / labels.sum(dim=1, keepdim=True), eps)


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


# --- CFine objectives ------------------------------------------------------------


def cmpm_loss(
    image_feats: torch.Tensor,
    text_feats: torch.Tensor,
    pids: torch.Tensor,
    eps: float = 1e-8,
    gather=gather_with_grad,
) -> torch.Tensor:
    """Cross-modal projection matching (CMPM, Zhang & Lu 2018), image->text plus text->image.

    A feature is projected onto the unit-length features of the other modality (its raw
    norm is kept, so there is no temperature); per row, sum p (log p - log(q + eps)) with
    p the softmax of the projections and q the same-identity indicator divided by its L2
    norm, as CMPM's and CFine's code do (q sums to sqrt(n), not 1: a constant offset of
    -log sqrt(n) per row, the same gradients as a normalised target). Like ``sdm_loss``,
    local rows are scored against the gathered global batch.
    """
    image_feats, text_feats = image_feats.float(), text_feats.float()
    all_images, all_texts, all_pids = gather(image_feats), gather(text_feats), gather_no_grad(pids)
    labels = identity_labels(pids, all_pids)
    target = labels / labels.norm(dim=1, keepdim=True)
    i2t = _match_divergence(image_feats @ F.normalize(all_texts, dim=-1).t(), target, eps)
    t2i = _match_divergence(text_feats @ F.normalize(all_images, dim=-1).t(), target, eps)
    return i2t + t2i


def cmpc_loss(image_feats: torch.Tensor, text_feats: torch.Tensor, labels: torch.Tensor,
              class_weight: torch.Tensor) -> torch.Tensor:
    """Cross-modal projection classification (CMPC): identity loss on projected features.

    Each image feature is projected onto the direction of its paired text feature (and
    vice versa) and classified by a norm-softmax classifier: ``class_weight`` is
    (dim, classes) and its columns are L2-normalised, with no bias. Sum of both modalities.
    """
    image_feats, text_feats = image_feats.float(), text_feats.float()
    image_dir, text_dir = F.normalize(image_feats, dim=-1), F.normalize(text_feats, dim=-1)
    image_on_text = (image_feats * text_dir).sum(dim=-1, keepdim=True) * text_dir
    text_on_image = (text_feats * image_dir).sum(dim=-1, keepdim=True) * image_dir
    weight = F.normalize(class_weight.float(), dim=0)
    return F.cross_entropy(image_on_text @ weight, labels) + F.cross_entropy(text_on_image @ weight, labels)


def diversity_loss(parts: torch.Tensor) -> torch.Tensor:
    """CFine's diversity term: ||off-diagonal Gram of the unit part features||_F / P^2, per
    sample, averaged. ``parts`` is (batch, P, dim); 0 when the parts are orthogonal."""
    unit = F.normalize(parts.float(), dim=-1)
    gram = unit @ unit.transpose(1, 2)
    n = parts.shape[1]
    off_diagonal = gram.masked_fill(torch.eye(n, dtype=torch.bool, device=parts.device), 0.0)
    # sqrt(x + tiny) keeps the gradient finite where the parts are exactly orthogonal
    frobenius = (off_diagonal.pow(2).sum(dim=(1, 2)) + 1e-12).sqrt()
    return (frobenius / n**2).mean()


def cfine_triplet_loss(scores: torch.Tensor, pids: torch.Tensor, margin: float = 0.2) -> torch.Tensor:
    """CFine's triplet loss on a pair-score matrix (``scores[i, j]``: image i, text j; the
    pair (i, i) is the positive).

    For each image anchor (row) and each text anchor (column), the hardest negative (the
    highest-scoring item of another person) counts only when it outscores the positive;
    then the hinge is ``margin - positive + hardest``. Hinges are summed over anchors and
    both directions, as the official ``CRLoss`` (``semi=False``) does. (The official code
    adds one fallback triplet when no anchor of a direction qualifies; that is not copied.)
    """
    scores = scores.float()
    negative = pids.view(-1, 1) != pids.view(1, -1)
    positive = scores.diagonal()
    masked = scores.masked_fill(~negative, float("-inf"))
    total = scores.new_zeros(())
    for dim in (1, 0):  # image anchors (rows), then text anchors (columns)
        hardest = masked.max(dim=dim).values
        violated = hardest > positive  # -inf (no negative in the batch) never is
        total = total + (margin - positive[violated] + hardest[violated]).sum()
    return total
