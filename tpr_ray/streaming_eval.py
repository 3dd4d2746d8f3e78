"""Exact text-to-image R@K, mAP and mINP over a sharded gallery, in bounded memory.

The in-memory evaluator scores a chunk of queries against the whole gallery at once; at
10,000 queries x 1,000,000 images the full matrix would be 40 GB. Every metric only needs
the rank of each query's positives (see :mod:`tpr_ray.metrics`), and a rank is one plus the
number of items ranked ahead of the positive: a sum over gallery shards. So the gallery is
never held at once:

1. plan (driver): the person id of every gallery item gives each query the global
   positions of its positives, a ``[Q, P]`` table padded with -1 (the *targets*).
2. positive pass (one task per shard): the score of every target that lies in the shard.
3. rank pass (one task per shard): per block of queries, score the whole shard (float32
   matmul), count the shard's items ranked ahead of every target under the tie rule of
   :mod:`tpr_ray.metrics` (higher score, or equal score and lower gallery position), and
   keep the shard's top K by (score desc, position asc).
4. merge (driver): add the counts, merge the top-K lists, metrics from the ranks.

Memory per task is one shard plus ``block_size x shard_rows`` scores; the driver holds the
queries and ``[Q, P]`` / ``[Q, K]`` tables.

Exactness. BLAS rounds a dot product differently depending on the shape of the product
it belongs to (a row of ``q @ G.T`` and the same entry of ``q @ G[cols].T`` can differ in
the last bit). The rank pass therefore replaces the score of each of its own positives with
the one the positive pass computed, so every comparison, in every shard, uses one score per
(query, item) and the merged ranks are exactly the stable ranking of those scores. On data
whose dot products are exact (the tie tests) these are the in-memory evaluator's scores and
the results are identical; otherwise the two can differ only where two scores are within
one float32 rounding of each other.

Gallery order (which breaks ties) is the concatenation of the shards in the order given;
for an embedding table that is its ``part-*.parquet`` files in name order, the order
:func:`tpr_ray.tables.read_embeddings` uses.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from tpr_ray.errors import ConfigError, DataError
from tpr_ray.evaluate import chance_level
from tpr_ray.tables import (
    check_complete,
    check_kind,
    check_row_count,
    check_same_model,
    embedding_matrix,
    fixed_size_embeddings,
    list_shards,
    person_ids,
    provenance,
    provenance_of_shards,
    read_columns,
    read_embeddings,
    read_sidecar,
)
from tpr_ray.metrics import (
    DEFAULT_KS,
    check_ks,
    metrics_from_positive_ranks,
    queries_without_positives,
    unit_rows,
)

log = logging.getLogger(__name__)

# Items gathered (and candidates sorted) at a time by the count; about 40 bytes each.
CANDIDATE_BUDGET = 1 << 22
# Column groups per row whose maxima say where items above a threshold can be.
CHUNKS = 1024


@dataclass(frozen=True)
class ShardArrays:
    """A gallery shard held in memory (tests, benchmarks); the alternative is a Parquet URI."""

    embeddings: np.ndarray  # [n, dim] float32
    person_ids: np.ndarray  # [n] int64


@dataclass
class StreamingResult:
    """Metrics plus what the report needs per query.

    ``top_positions``/``top_scores`` are ``[Q, K]``, best first, global gallery positions
    (-1 and -inf where the gallery has fewer than K items); ``positive_ranks`` is ``[Q, P]``,
    the sorted 1-based ranks of each query's positives, padded with 0.
    """

    metrics: dict
    top_positions: np.ndarray
    top_scores: np.ndarray
    positive_ranks: np.ndarray
    timings: dict = field(default_factory=dict)


# --------------------------------------------------------------------------- pure pieces


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


def shard_ranks(queries: np.ndarray, embeddings: np.ndarray, first_position: int, target_scores: np.ndarray,
                targets: np.ndarray, top_k: int = 10, block_size: int = 1024) -> dict:
    """The rank pass over one shard.

    Returns ``counts`` ``[Q, P]`` (items of this shard ranked ahead of each target; 0 for
    padding), ``top_scores`` ``[Q, k]`` and ``top_positions`` ``[Q, k]`` (the shard's best
    items, global positions; k = min(top_k, shard rows)). ``target_scores`` must hold the
    score of every valid target (from :func:`shard_positive_scores`, merged over shards).
    """
    if top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    valid = targets >= 0
    if np.isnan(target_scores[valid]).any():
        raise ValueError("a target has no score; merge the positive pass over every shard first")
    num_queries, num_items = len(queries), len(embeddings)
    k = min(top_k, num_items)
    counts = np.zeros(targets.shape, dtype=np.int64)
    top_scores = np.full((num_queries, k), -np.inf, dtype=np.float32)
    top_positions = np.full((num_queries, k), -1, dtype=np.int64)
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
    """:func:`tpr_ray.metrics.count_ranked_ahead` for a block of rows, by sorting candidates.

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
    :func:`tpr_ray.metrics.stable_descending_order`), flipped so that higher scores come
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


# --------------------------------------------------------------------------- shards


def shard_person_ids(shard) -> np.ndarray:
    """The person ids of a shard (a Parquet URI reads only that column)."""
    if isinstance(shard, ShardArrays):
        return np.asarray(shard.person_ids).ravel()
    return person_ids(read_columns(shard, ["person_id"]), {"uri": shard},
                      why="; a bare gallery has no ground truth to evaluate against")


def load_shard_embeddings(shard) -> np.ndarray:
    """A shard's embeddings as unit-norm ``[n, dim]`` float32 (rows off by > 1e-3 normalised)."""
    if isinstance(shard, ShardArrays):
        return unit_rows(shard.embeddings, "gallery_emb")
    table = read_columns(shard, ["embedding"])
    table = table.set_column(0, "embedding", fixed_size_embeddings(table.column("embedding"), shard))
    return unit_rows(embedding_matrix(table), "gallery_emb")


def _positive_scores_task(queries, shard, first_position, targets, block_size):
    return shard_positive_scores(queries, load_shard_embeddings(shard), first_position, targets, block_size)


def _ranks_task(queries, shard, first_position, target_scores, targets, top_k, block_size):
    tick = time.perf_counter()
    result = shard_ranks(queries, load_shard_embeddings(shard), first_position, target_scores, targets, top_k,
                         block_size)
    result["seconds"] = time.perf_counter() - tick
    return result


# --------------------------------------------------------------------------- front doors


def evaluate_sharded(query_emb, query_pids, shards: Sequence, ks: Sequence[int] = DEFAULT_KS, *, top_k: int = 10,
                     block_size: int = 1024, use_ray: bool | None = None, cpus_per_task: float = 1.0,
                     local_threads: int = 1, skip_queries_without_positives: bool = False) -> StreamingResult:
    """Exact R@K, mAP and mINP of queries against a gallery given as shards.

    ``shards`` are Parquet files of a gallery embedding table (URIs) or :class:`ShardArrays`;
    gallery order is their concatenation. With ``use_ray`` (default: when Ray is
    initialised) each shard is a Ray task declaring ``cpus_per_task`` CPUs and its memory;
    otherwise shards run in this process, ``local_threads`` at a time (numpy releases the
    GIL in the heavy steps; limit BLAS to one thread each then). The metrics equal
    :func:`tpr_ray.metrics.retrieval_metrics_from_embeddings` on the concatenated gallery
    (see the module docstring on rounding), with the same keys plus ``num_shards``.
    """
    result, _ = _evaluate(query_emb, query_pids, shards, ks, top_k, block_size, use_ray, cpus_per_task,
                          skip_queries_without_positives, local_threads)
    return result


def _evaluate(query_emb, query_pids, shards, ks, top_k, block_size, use_ray, cpus_per_task, skip,
              local_threads: int = 1):
    ks = check_ks(ks)
    if block_size < 1:
        raise ConfigError(f"block_size must be >= 1, got {block_size}")
    if top_k < 1:
        raise ConfigError(f"top_k must be >= 1, got {top_k}")
    if not shards:
        raise DataError("the gallery has no shards")
    timings = {}
    tick = time.perf_counter()
    queries = np.ascontiguousarray(unit_rows(query_emb, "query_emb"))
    query_pids = np.asarray(query_pids).ravel()
    if len(queries) != len(query_pids) or len(queries) == 0:
        raise DataError(f"{len(queries)} query embeddings but {len(query_pids)} query person ids (need at least one)")

    shard_pids = [shard_person_ids(s) for s in shards]
    sizes = [len(p) for p in shard_pids]
    firsts = [int(f) for f in np.cumsum([0] + sizes[:-1])]
    gallery_pids = np.concatenate(shard_pids)
    if len(gallery_pids) == 0:
        raise DataError("the gallery shards hold no rows")
    missing = queries_without_positives(query_pids, gallery_pids)
    if len(missing) and not skip:
        q = int(missing[0])
        others = f" ({len(missing) - 1} other queries too)" if len(missing) > 1 else ""
        raise DataError(f"person id {query_pids[q]} has no image in the gallery{others}, so the query's rank "
                        "metrics are undefined; pass skip_queries_without_positives=True to leave such queries out",
                        entry=q, field="person_id")
    targets = positive_positions(query_pids, gallery_pids)
    timings["plan_s"] = time.perf_counter() - tick

    if use_ray is None:
        import ray

        use_ray = ray.is_initialized()
    if use_ray:
        run = _run_with_ray
    else:
        def run(fn, arg_list, queries, memories, cpus):
            return _run_here(fn, arg_list, queries, local_threads)
    block = min(block_size, len(queries))
    dim, slots = queries.shape[1], targets.shape[1]

    tick = time.perf_counter()
    parts = run(_positive_scores_task, [(s, first, targets, block_size) for s, first in zip(shards, firsts)],
                queries, [_task_memory(n, dim, block, slots, top_k, len(queries), False) for n in sizes],
                cpus_per_task)
    target_scores = np.full(targets.shape, np.nan, dtype=np.float32)
    for part in parts:
        found = ~np.isnan(part)
        target_scores[found] = part[found]
    if np.isnan(target_scores[targets >= 0]).any():
        raise DataError("a positive's score was found in no shard; did the shards change during evaluation?")
    timings["positive_pass_s"] = time.perf_counter() - tick

    tick = time.perf_counter()
    parts = run(_ranks_task, [(s, first, target_scores, targets, top_k, block_size) for s, first in zip(shards, firsts)],
                queries, [_task_memory(n, dim, block, slots, top_k, len(queries), True) for n in sizes],
                cpus_per_task)
    counts = np.zeros(targets.shape, dtype=np.int64)
    for part in parts:
        counts += part["counts"]
    top_scores, top_positions = merge_top_k([(p["top_scores"], p["top_positions"]) for p in parts], top_k)
    timings["rank_pass_s"] = time.perf_counter() - tick
    timings["rank_task_s"] = [round(p["seconds"], 3) for p in parts]

    ranks = ranks_from_counts(counts, targets)
    metrics = metrics_from_positive_ranks(ranks, ks, skip_queries_without_positives=skip)
    metrics["num_gallery"] = int(sum(sizes))
    metrics["num_shards"] = len(shards)
    return StreamingResult(metrics, top_positions, top_scores, ranks, timings), gallery_pids


def evaluate_tables(gallery_uri: str, queries_uri: str, ks: Sequence[int] = DEFAULT_KS, *, top_k: int = 10,
                    block_size: int = 1024, use_ray: bool | None = None, allow_mismatch: bool = False,
                    skip_queries_without_positives: bool = False, allow_incomplete: bool = False) -> StreamingResult:
    """Streaming counterpart of :func:`tpr_ray.evaluate.evaluate_embeddings`.

    The query table is read whole (it is small), the gallery shard by shard. The metrics
    carry the same extra keys (``method``, ``model``, ``checkpoint``, ``dim``, ``gallery``,
    ``queries``, ``ks``, ``chance``; ``mismatch`` when allowed).
    """
    ks = check_ks(ks)
    queries, queries_info = read_embeddings(queries_uri, allow_incomplete=allow_incomplete)
    check_kind(queries_info, "queries")
    shards = list_shards(gallery_uri)
    gallery_info = {**read_sidecar(gallery_uri), "uri": gallery_uri}
    check_kind(gallery_info, "gallery")
    check_complete(gallery_info, gallery_uri, allow_incomplete)
    # The shards are read one at a time later; a missing or extra one must not pass for the gallery.
    check_row_count(gallery_info, shards)
    gallery_from = provenance_of_shards(shards, gallery_info)
    queries_from = provenance(queries, queries_info)
    mismatch = check_same_model(gallery_from, queries_from, allow_mismatch)

    query_pids = person_ids(queries, queries_info)
    result, gallery_pids = _evaluate(embedding_matrix(queries), query_pids, shards, ks, top_k, block_size, use_ray,
                                     1.0, skip_queries_without_positives)
    result.metrics.update(gallery_from)
    result.metrics.update(dim=queries_info["dim"], gallery=gallery_uri, queries=queries_uri, ks=list(ks))
    if mismatch:
        result.metrics["mismatch"] = mismatch
    result.metrics["chance"] = chance_level(query_pids, gallery_pids, ks)
    return result


# --------------------------------------------------------------------------- executors


def _task_memory(rows: int, dim: int, block: int, slots: int, top_k: int, num_queries: int, rank_pass: bool) -> int:
    """Bytes a shard task needs at its peak (declared to Ray so tasks do not over-commit RAM)."""
    shard = 2 * rows * dim * 4  # the Arrow read and the float32 matrix
    queries = num_queries * dim * 4 + num_queries * slots * 16
    block_bytes = block * rows * 4 + CANDIDATE_BUDGET * 48 if rank_pass else block * slots * dim * 4
    return int(shard + queries + block_bytes + num_queries * top_k * 12 + (64 << 20))


def _run_here(fn, arg_list, queries, threads: int):
    if threads <= 1:
        return [fn(queries, *args) for args in arg_list]
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(threads) as pool:
        return list(pool.map(lambda args: fn(queries, *args), arg_list))


def _run_with_ray(fn, arg_list, queries, memories, cpus):
    import ray

    task = ray.remote(fn)
    queries_ref = ray.put(queries)
    shared = {}  # arrays every task gets (targets, target scores) go to the object store once
    refs = []
    for args, memory in zip(arg_list, memories):
        args = tuple(_shared_ref(a, shared) for a in args)
        refs.append(task.options(num_cpus=cpus, memory=memory, max_retries=2).remote(queries_ref, *args))
    return ray.get(refs)


def _shared_ref(value, shared: dict):
    import ray

    if isinstance(value, np.ndarray) and value.nbytes > 1 << 16:
        if id(value) not in shared:
            shared[id(value)] = ray.put(value)
        return shared[id(value)]
    return value
