"""Pure kernels of the streaming evaluator: per-shard scores, rank counts and top-K lists.

Nothing here reads files or starts tasks; :mod:`tpr_ray.evaluation.streaming` plans the
evaluation and :mod:`tpr_ray.evaluation.executors` runs these per shard. The ranking rule is
:mod:`tpr_ray.evaluation.metrics`'s: higher score first, ties by lower gallery position.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from tpr_ray.errors import ConfigError

# Items gathered (and candidates sorted) at a time by the count; about 40 bytes each.
CANDIDATE_BUDGET = 1 << 22
# Column groups per row whose maxima say where items above a threshold can be.
CHUNKS = 1024


def positive_positions(query_pids, gallery_pids) -> np.ndarray:
    """``[Q, P]`` global positions of each query's positives, ascending, padded with -1.

    P is the largest number of gallery items one person has.
    """
    query_pids = np.asarray(query_pids).ravel()
    gallery_pids = np.asarray(gallery_pids).ravel()
    order = np.argsort(gallery_pids, kind="stable")  # stable: positions ascend within a person
    sorted_pids = gallery_pids[order]
    first = np.searchsorted(sorted_pids, query_pids, side="left")
    count = np.searchsorted(sorted_pids, query_pids, side="right") - first
    width = max(int(count.max()) if len(count) else 0, 1)
    slot = np.arange(width)
    valid = slot < count[:, None]
    index = np.minimum(first[:, None] + slot, max(len(order) - 1, 0))
    return np.where(valid, order[index] if len(order) else 0, -1).astype(np.int64)


def shard_positive_scores(queries: np.ndarray, embeddings: np.ndarray, first_position: int,
                          targets: np.ndarray, block_size: int = 1024) -> np.ndarray:
    """Scores of the targets that lie in this shard; NaN for the others. ``[Q, P]`` float32.

    The product is taken per query block against only the shard rows that are positives of
    that block, so this pass costs a small fraction of the rank pass.
    """
    out = np.full(targets.shape, np.nan, dtype=np.float32)
    num_items = len(embeddings)
    for start in range(0, len(queries), block_size):
        stop = min(start + block_size, len(queries))
        local = targets[start:stop] - first_position
        inside = (targets[start:stop] >= 0) & (local >= 0) & (local < num_items)
        if not inside.any():
            continue
        columns = np.unique(local[inside])
        scores = queries[start:stop] @ embeddings[columns].T
        rows, slots = np.nonzero(inside)
        out[start + rows, slots] = scores[rows, np.searchsorted(columns, local[rows, slots])]
    return out


def rank_pass_outputs(queries: np.ndarray, embeddings: np.ndarray, target_scores: np.ndarray, targets: np.ndarray,
                      top_k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Checked inputs and the empty outputs of a rank pass (numpy or torch): the valid-target
    mask, ``counts`` [Q, P] of zeros, ``top_scores`` [Q, k] of -inf, ``top_positions`` [Q, k] of -1."""
    if top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    valid = targets >= 0
    if np.isnan(target_scores[valid]).any():
        raise ValueError("a target has no score; merge the positive pass over every shard first")
    k = min(top_k, len(embeddings))
    return (valid, np.zeros(targets.shape, dtype=np.int64), np.full((len(queries), k), -np.inf, dtype=np.float32),
            np.full((len(queries), k), -1, dtype=np.int64))


def shard_ranks(queries: np.ndarray, embeddings: np.ndarray, first_position: int, target_scores: np.ndarray,
                targets: np.ndarray, top_k: int = 10, block_size: int = 1024) -> dict:
    """The rank pass over one shard.

    Returns ``counts`` ``[Q, P]`` (items of this shard ranked ahead of each target; 0 for
    padding), ``top_scores`` ``[Q, k]`` and ``top_positions`` ``[Q, k]`` (the shard's best
    items, global positions; k = min(top_k, shard rows)). ``target_scores`` must hold the
    score of every valid target (from :func:`shard_positive_scores`, merged over shards).
    """
    valid, counts, top_scores, top_positions = rank_pass_outputs(queries, embeddings, target_scores, targets, top_k)
    num_queries, num_items, k = len(queries), len(embeddings), top_scores.shape[1]
    gallery_t = embeddings.T
    for start in range(0, num_queries, block_size):
        stop = min(start + block_size, num_queries)
        scores = queries[start:stop] @ gallery_t
        block_targets = targets[start:stop]
        block_scores = np.where(valid[start:stop], target_scores[start:stop], np.float32(np.inf))
        # Own positives take the positive pass's score, so every shard compares against the
        # same value for them (see the module docstring).
        local = block_targets - first_position
        inside = valid[start:stop] & (local >= 0) & (local < num_items)
        rows, slots = np.nonzero(inside)
        scores[rows, local[rows, slots]] = block_scores[rows, slots]

        chunks = Chunks(scores)
        counts[start:stop] = count_ahead(scores, first_position, block_scores, block_targets, chunks)
        top_scores[start:stop], top_positions[start:stop] = top_k_of_block(scores, first_position, k, chunks)
    return {"counts": counts, "top_scores": top_scores, "top_positions": top_positions}


class Chunks:
    """A block's columns dealt into ``CHUNKS`` groups, with each row's maximum per group.

    Group ``j`` holds columns ``j, j + C, j + 2C, ...``: strided rather than contiguous, so
    the maxima are one vectorised pass. Items at or above a threshold can only sit in the
    groups whose maximum reaches it, so the top-K and the count gather from those alone
    instead of scanning the whole block.
    """

    def __init__(self, scores: np.ndarray, num_chunks: int = CHUNKS):
        self.scores = scores
        num_rows, num_items = scores.shape
        self.count = max(1, min(num_items, num_chunks))
        self.width = -(-num_items // self.count)  # items per group, the last ones one fewer
        full = num_items // self.count
        self.max = scores[:, :full * self.count].reshape(num_rows, full, self.count).max(axis=1) if full else \
            np.full((num_rows, self.count), -np.inf, scores.dtype)
        tail = scores[:, full * self.count:]
        np.maximum(self.max[:, :tail.shape[1]], tail, out=self.max[:, :tail.shape[1]])

    def reaching(self, threshold: np.ndarray) -> np.ndarray:
        """Per row, how many groups hold an item >= its threshold."""
        return np.count_nonzero(self.max >= threshold[:, None], axis=1)

    def items_at_or_above(self, threshold: np.ndarray, rows: np.ndarray):
        """``(row, column, score)`` of every item of ``rows`` scoring >= its row's threshold.

        ``row`` indexes ``rows`` and ascends; columns within a row come in no set order.
        """
        num_items = self.scores.shape[1]
        reach = self.max[rows] >= threshold[:, None]
        if np.count_nonzero(reach) * self.width * 4 > len(rows) * num_items:
            # Most groups reach: scanning the rows is cheaper than gathering from groups.
            r, c = np.nonzero(self.scores[rows] >= threshold[:, None])
            return r, c, self.scores[rows[r], c]
        pair_row, pair_chunk = np.nonzero(reach)
        columns = pair_chunk[:, None] + self.count * np.arange(self.width)
        inside = columns < num_items
        np.minimum(columns, num_items - 1, out=columns)
        values = self.scores[rows[pair_row][:, None], columns]
        keep = inside & (values >= threshold[pair_row][:, None])
        return np.broadcast_to(pair_row[:, None], columns.shape)[keep], columns[keep], values[keep]


def count_ahead(scores: np.ndarray, first_position: int, target_scores: np.ndarray, target_positions: np.ndarray,
                chunks: Chunks | None = None) -> np.ndarray:
    """:func:`tpr_ray.evaluation.metrics.count_ranked_ahead` for a block of rows, by sorting candidates.

    Only items scoring at least a row's lowest target can be ahead of any of its targets
    (the *candidates*; few when positives rank high). Candidates and targets are packed
    into uint64 keys (row, score descending, position) that sort in ranking order, so the
    count ahead of a target is where it would be inserted among its row's sorted
    candidates. Rows go in groups of at most ``CANDIDATE_BUDGET`` gathered items, so a
    positive ranked last costs time, not memory. Padding targets must have score +inf.
    """
    num_rows, num_items = scores.shape
    counts = np.zeros(target_scores.shape, dtype=np.int64)
    if num_items == 0:
        return counts
    chunks = chunks or Chunks(scores)
    lowest = target_scores.min(axis=1)
    gathered = chunks.reaching(lowest) * chunks.width  # an upper bound of each row's candidates
    # A tied item is ahead when its position is lower; targets in other shards clamp to the ends.
    local_targets = np.clip(target_positions - first_position, 0, num_items)
    position_bits = max(1, int(num_items).bit_length())
    if position_bits > 31:
        raise ConfigError(f"a shard of {num_items} rows is too large; write shards of fewer than 2**31 rows")
    rows_per_group = 1 << (32 - position_bits)  # the row number takes the bits left over
    row_index = np.arange(num_rows)
    group = (np.cumsum(gathered) // CANDIDATE_BUDGET) * (num_rows // rows_per_group + 1) + row_index // rows_per_group
    for g in np.unique(group[gathered > 0]):
        rows = np.flatnonzero((group == g) & (gathered > 0))
        r, c, values = chunks.items_at_or_above(lowest[rows], rows)
        items = np.sort(_packed_keys(r, values, c, position_bits))
        target_rows = np.broadcast_to(np.arange(len(rows))[:, None], target_scores[rows].shape)
        targets = _packed_keys(target_rows, target_scores[rows], local_targets[rows], position_bits)
        per_row = np.bincount(r, minlength=len(rows))
        row_start = np.concatenate([[0], np.cumsum(per_row)[:-1]])
        counts[rows] = np.searchsorted(items, targets, side="left") - row_start[:, None]
    return counts


def _packed_keys(rows, values, positions, position_bits: int) -> np.ndarray:
    """uint64 keys ordered by (row, score descending, position): row | score | position bits.

    The float32 score maps to an int32 that orders like it (the trick of
    :func:`tpr_ray.evaluation.metrics.stable_descending_order`), flipped so that higher scores come
    first, in 32 bits; ``position`` (0 <= p < 2**position_bits) in the low bits.
    """
    bits = (np.asarray(values, dtype=np.float32) + np.float32(0.0)).view(np.int32)  # -0.0 -> +0.0
    ordered = np.where(bits < 0, bits ^ np.int32(0x7FFFFFFF), bits).astype(np.int64)
    descending = (np.int64(0x7FFFFFFF) - ordered).astype(np.uint64)  # 0 .. 2**32 - 2
    keys = np.asarray(rows, dtype=np.uint64) << np.uint64(32 + position_bits)
    keys |= descending << np.uint64(position_bits)
    keys |= np.asarray(positions, dtype=np.uint64)
    return keys


def top_k_of_block(scores: np.ndarray, first_position: int, k: int,
                   chunks: Chunks | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Each row's k best items by (score desc, position asc): ``(scores, positions)`` ``[R, k]``.

    The k-th largest chunk maximum is a lower bound of the k-th best score (k chunks reach
    it), so only items at or above it, in the chunks that reach it, are sorted; ties at the
    bound are all kept and ordered by position, as the ranking rule asks.
    """
    num_rows, num_items = scores.shape
    top_scores = np.full((num_rows, k), -np.inf, dtype=np.float32)
    top_positions = np.full((num_rows, k), -1, dtype=np.int64)
    if num_items == 0 or k == 0:
        return top_scores, top_positions
    chunks = chunks or Chunks(scores)
    num_chunks = chunks.count
    if num_chunks >= k:
        bound = np.partition(chunks.max, num_chunks - k, axis=1)[:, num_chunks - k]
    else:  # k beyond the number of chunks: every item is a candidate
        bound = np.full(num_rows, -np.inf, dtype=np.float32)
    rows, columns, values = chunks.items_at_or_above(bound, np.arange(num_rows))
    order = np.lexsort((columns, -values, rows))
    rows, columns, values = rows[order], columns[order], values[order]
    row_start = np.searchsorted(rows, np.arange(num_rows))
    place = np.arange(len(rows)) - row_start[rows]
    keep = place < k
    top_scores[rows[keep], place[keep]] = values[keep]
    top_positions[rows[keep], place[keep]] = columns[keep] + first_position
    return top_scores, top_positions


def merge_top_k(parts: Sequence[tuple[np.ndarray, np.ndarray]], k: int) -> tuple[np.ndarray, np.ndarray]:
    """Merge per-shard ``(scores, positions)`` top lists into the global top k per query."""
    scores = np.concatenate([p[0] for p in parts], axis=1)
    positions = np.concatenate([p[1] for p in parts], axis=1)
    # Padding (-inf, -1) sorts last: -inf is the lowest score.
    order = np.lexsort((np.where(positions < 0, np.iinfo(np.int64).max, positions), -scores), axis=-1)[:, :k]
    return np.take_along_axis(scores, order, axis=1), np.take_along_axis(positions, order, axis=1)


def ranks_from_counts(counts: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """``[Q, P]`` sorted 1-based ranks from the summed counts, padded with 0."""
    ranks = np.where(targets >= 0, counts + 1, np.iinfo(np.int64).max)
    ranks.sort(axis=1)
    ranks[ranks == np.iinfo(np.int64).max] = 0
    return ranks
