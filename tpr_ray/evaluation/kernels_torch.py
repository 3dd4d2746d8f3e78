"""The rank pass of the streaming evaluator in torch, for a GPU (or torch on CPU).

Same inputs, outputs and tie rule as :func:`tpr_ray.evaluation.kernels.shard_ranks`: an item
is ahead of a target when its score is higher, or equal with a lower gallery position. The
numpy kernel prunes candidates with chunk maxima, which pays on a CPU; on a GPU a full sort
of each block row is cheaper than the bookkeeping, so this one sorts:

- every score and its local position become one int64 key that orders like
  (score descending, position ascending) -- the key of
  :func:`tpr_ray.evaluation.metrics.stable_descending_order`;
- the keys of a block are sorted per row; the count ahead of a target is where its own key
  would be inserted (``searchsorted``), and the top k are the first k keys.

The positive pass stays in numpy (it multiplies only the positives' columns). Memory per
block is about 20 bytes per score (scores, keys, sorted keys), so ``block_size x shard rows``
sizes it, as for the numpy kernel.
"""

from __future__ import annotations

import numpy as np

DEVICES = ("numpy", "auto", "cpu", "cuda")


def resolve_device(device: str) -> str:
    """``numpy`` for the numpy kernels, else the torch device to use; ``auto``: cuda when torch sees one."""
    if device not in DEVICES and not device.startswith("cuda:"):
        raise ValueError(f"device must be one of {', '.join(DEVICES)} (or cuda:N), got {device!r}")
    if device != "auto":
        return device
    try:
        import torch
    except ImportError:
        return "numpy"
    return "cuda" if torch.cuda.is_available() else "numpy"


def _keys(scores, positions, torch):
    """int64 keys ordered by (score descending, position ascending); positions < 2**32."""
    bits = (scores + 0.0).view(torch.int32)  # + 0.0 makes -0.0 equal to +0.0 bitwise
    ordered = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits).to(torch.int64)
    return ((-ordered) << 32) | positions


def shard_ranks_torch(queries: np.ndarray, embeddings: np.ndarray, first_position: int, target_scores: np.ndarray,
                      targets: np.ndarray, top_k: int = 10, block_size: int = 1024, device: str = "cpu") -> dict:
    """:func:`tpr_ray.evaluation.kernels.shard_ranks`, computed with torch on ``device``."""
    import torch

    from tpr_ray.evaluation.kernels import rank_pass_outputs

    num_queries, num_items = len(queries), len(embeddings)
    if num_items >= 2**31:
        raise ValueError(f"a shard of {num_items} rows is too large; write shards of fewer than 2**31 rows")
    valid, counts, top_scores, top_positions = rank_pass_outputs(queries, embeddings, target_scores, targets, top_k)
    k = top_scores.shape[1]
    if num_items == 0:
        return {"counts": counts, "top_scores": top_scores, "top_positions": top_positions}

    with torch.no_grad():
        gallery_t = torch.from_numpy(np.ascontiguousarray(embeddings, dtype=np.float32)).to(device).T
        item_positions = torch.arange(num_items, device=device, dtype=torch.int64)
        for start in range(0, num_queries, block_size):
            stop = min(start + block_size, num_queries)
            block = torch.from_numpy(np.ascontiguousarray(queries[start:stop])).to(device)
            scores = block @ gallery_t
            block_targets = torch.from_numpy(targets[start:stop]).to(device)
            block_valid = block_targets >= 0
            block_scores = torch.where(block_valid, torch.from_numpy(target_scores[start:stop]).to(device),
                                       torch.tensor(float("inf"), device=device))
            # Own positives take the positive pass's score, as in the numpy kernel, so every
            # shard compares against one score per positive.
            local = block_targets - first_position
            inside = block_valid & (local >= 0) & (local < num_items)
            rows, slots = torch.nonzero(inside, as_tuple=True)
            scores[rows, local[rows, slots]] = block_scores[rows, slots]

            keys, _ = torch.sort(_keys(scores, item_positions, torch), dim=1)
            # A target in another shard sits before (after) all of this shard's items in
            # position, so its clamped local position counts the ties on the right side.
            target_keys = _keys(block_scores, local.clamp(0, num_items), torch)
            ahead = torch.searchsorted(keys, target_keys, side="left")
            counts[start:stop] = torch.where(block_valid, ahead, 0).cpu().numpy()
            best = keys[:, :k] & 0xFFFFFFFF
            top_positions[start:stop] = (best + first_position).cpu().numpy()
            top_scores[start:stop] = torch.gather(scores, 1, best).cpu().numpy()
    return {"counts": counts, "top_scores": top_scores, "top_positions": top_positions}
