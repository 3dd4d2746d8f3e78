"""The GPU suite's exact evaluation: R@K, mAP and mINP of queries against a gallery on the
device, block by block, with the library's tie rule (ranks go through tpr_ray's metrics);
and the library's own streaming kernels run the same way, for comparison."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from tpr_ray.evaluation.metrics import metrics_from_positive_ranks


def positive_slots(query_pids: torch.Tensor, gallery_pids: torch.Tensor) -> torch.Tensor:
    """Gallery positions of each query's positives, ``[Q, P]`` ascending, padded with -1."""
    order = torch.argsort(gallery_pids, stable=True)
    sorted_pids = gallery_pids[order]
    start = torch.searchsorted(sorted_pids, query_pids)
    count = torch.searchsorted(sorted_pids, query_pids, right=True) - start
    slots = torch.arange(max(1, int(count.max())), device=query_pids.device)
    valid = slots < count[:, None]
    index = (start[:, None] + slots).clamp(max=len(order) - 1)
    return torch.where(valid, order[index], -1)


def block_scores(queries: torch.Tensor, gallery: torch.Tensor) -> torch.Tensor:
    """float32 inner products of a block of queries with the whole gallery."""
    return queries.float() @ gallery.float().T


def count_ahead(scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Items ranked ahead of each target under tpr_ray.evaluation.metrics' tie rule (score desc, position asc).

    ``targets`` are gallery positions ``[B, P]`` (-1 = none). Ties with another item are rare
    with real features, so the position-aware count runs only on rows that have one.
    """
    positions = torch.arange(scores.shape[1], device=scores.device)
    target_scores = scores.gather(1, targets.clamp(min=0))
    counts = torch.empty_like(targets)
    for slot in range(targets.shape[1]):
        t = target_scores[:, slot, None]
        counts[:, slot] = (scores > t).sum(1)
        tied = ((scores == t).sum(1) > 1).nonzero().squeeze(1)
        if len(tied):
            earlier = (scores[tied] == t[tied]) & (positions < targets[tied, slot, None])
            counts[tied, slot] += earlier.sum(1)
    return counts


def top_k_stable(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Best ``k`` per row by (score desc, position asc), the order tpr_ray.evaluation.metrics ranks by."""
    values, columns = torch.topk(scores, min(k, scores.shape[1]), dim=1)
    threshold = values[:, -1:]
    # topk keeps an arbitrary subset of the items tied at the k-th score: redo the rows where
    # some were left out, keeping the earliest positions.
    short = ((scores == threshold).sum(1) > (values == threshold).sum(1)).nonzero().squeeze(1)
    for row in short.tolist():
        above = (scores[row] > threshold[row]).nonzero().squeeze(1)
        tied = (scores[row] == threshold[row]).nonzero().squeeze(1)[: values.shape[1] - len(above)]
        columns[row] = torch.cat([above, tied])
        values[row] = scores[row, columns[row]]
    by_position = columns.argsort(dim=1)
    columns, values = columns.gather(1, by_position), values.gather(1, by_position)
    by_score = torch.sort(values, dim=1, descending=True, stable=True).indices
    return values.gather(1, by_score), columns.gather(1, by_score)


def exact_eval(queries, gallery, query_pids, gallery_pids, *, top_k: int = 10, block: int = 1024,
               skip_queries_without_positives: bool = False) -> dict:
    """R@1/5/10, mAP, mINP and each query's top-k, exact, ``block`` queries at a time on their device.

    Each block's scores are counted against its positives (no full sort of the gallery) and
    the ranks go through tpr_ray.evaluation.metrics, so the numbers are the CPU evaluator's.
    """
    targets = positive_slots(query_pids, gallery_pids)
    ranks = torch.zeros_like(targets)
    top_scores = torch.empty(len(queries), min(top_k, len(gallery)), device=queries.device)
    top_positions = torch.empty(top_scores.shape, dtype=torch.int64, device=queries.device)
    for start in range(0, len(queries), block):
        stop = min(start + block, len(queries))
        scores = block_scores(queries[start:stop], gallery)
        block_targets = targets[start:stop]
        ranks[start:stop] = torch.where(block_targets >= 0, count_ahead(scores, block_targets) + 1, 0)
        top_scores[start:stop], top_positions[start:stop] = top_k_stable(scores, top_k)
        del scores
    metrics = metrics_from_positive_ranks(ranks.cpu().numpy(),
                                          skip_queries_without_positives=skip_queries_without_positives)
    metrics["num_gallery"] = len(gallery)
    return {"metrics": metrics, "top_scores": top_scores, "top_positions": top_positions}


def library_eval(queries, gallery, query_pids, gallery_pids, *, shard_rows: int, top_k: int = 10, block: int = 1024,
                 device: str = "cpu") -> dict:
    """The streaming evaluator's kernels, as the library runs them: the positive pass in numpy,
    the rank pass in torch on ``device`` (tpr_ray.evaluation.kernels_torch), shard by shard."""
    from tpr_ray.evaluation.kernels import merge_top_k, positive_positions, ranks_from_counts, shard_positive_scores
    from tpr_ray.evaluation.kernels_torch import shard_ranks_torch

    targets = positive_positions(query_pids, gallery_pids)
    firsts = range(0, len(gallery), shard_rows)
    target_scores = np.full(targets.shape, np.nan, dtype=np.float32)
    for first in firsts:
        part = shard_positive_scores(queries, gallery[first:first + shard_rows], first, targets, block)
        target_scores = np.where(np.isnan(part), target_scores, part)
    counts, tops = np.zeros(targets.shape, dtype=np.int64), []
    for first in firsts:
        out = shard_ranks_torch(queries, gallery[first:first + shard_rows], first, target_scores, targets,
                                top_k, block, device)
        counts += out["counts"]
        tops.append((out["top_scores"], out["top_positions"]))
    metrics = metrics_from_positive_ranks(ranks_from_counts(counts, targets), skip_queries_without_positives=True)
    metrics["num_gallery"] = len(gallery)
    top_scores, top_positions = merge_top_k(tops, top_k)
    return {"metrics": metrics, "top_scores": top_scores, "top_positions": top_positions}


def synthetic_embeddings(num_queries, num_gallery, dim, per_person, device, seed=0, noise=2.0):
    """Person centres plus noise: realistic score distributions and a few positives per query."""
    gen = torch.Generator(device=device).manual_seed(seed)
    persons = max(1, num_gallery // per_person)
    centres = torch.randn(persons, dim, device=device, generator=gen)
    gallery_pids = torch.randperm(num_gallery, device=device, generator=gen) % persons
    query_pids = torch.randint(0, persons, (num_queries,), device=device, generator=gen)

    def views(pids):
        x = centres[pids] + noise * torch.randn(len(pids), dim, device=device, generator=gen)
        return F.normalize(x, dim=1)

    return views(query_pids), views(gallery_pids), query_pids, gallery_pids
