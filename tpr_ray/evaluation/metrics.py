"""Text-to-image retrieval metrics: R@K (CMC), mAP and mINP, in percent.

Protocol (IRRA): queries are captions, the gallery is images, and a gallery image is a
positive for a query when it shows the same person id. No junk filtering.

Ranking rule. For each query the gallery is ranked by descending score; ties are broken by
ascending gallery position (a stable sort of the negated scores). So the 1-based rank of
gallery item ``g`` for a query is::

    1 + #{items with score > s_g} + #{items with score == s_g and position < g}

Every metric here is computed from the ranks of each query's positives alone, which is what
lets an evaluator that sees the gallery shard by shard reproduce these numbers exactly: it
only has to add up :func:`count_ranked_ahead` over the shards, with positions taken in shard
concatenation order, and then call :func:`metrics_from_positive_ranks`.

With ``r_1 < ... < r_P`` the sorted ranks of a query's P positives:

- hit at K: ``r_1 <= K``; R@K is the share of queries with a hit.
- AP: ``mean_i(i / r_i)`` (precision at each positive, averaged over all positives).
- INP: ``P / r_P`` (how deep one must go to find the last positive).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from tpr_ray.errors import DataError

DEFAULT_KS = (1, 5, 10)


# --------------------------------------------------------------------------- ranks


def count_ranked_ahead(scores, target_scores, target_positions, first_position: int = 0) -> np.ndarray:
    """Count the items of ``scores`` ranked ahead of each target under the tie rule.

    An item at global position ``p`` with score ``s`` is ahead of a target
    ``(t_score, t_position)`` when ``s > t_score``, or ``s == t_score`` and ``p < t_position``.
    ``scores`` may be one shard of the gallery whose first item sits at global position
    ``first_position``; summing the counts over all shards and adding 1 gives the rank.

    Shapes: ``scores`` is ``[G]`` (one query) or ``[Q, G]``; ``target_scores`` and
    ``target_positions`` are ``[P]`` or ``[Q, P]`` to match. Returns int64 counts shaped like
    ``target_scores``. Memory stays O(Q * G): the loop runs over target slots, not items.
    """
    scores = np.asarray(scores)
    target_scores = np.asarray(target_scores, dtype=scores.dtype)
    target_positions = np.asarray(target_positions, dtype=np.int64)
    one_query = scores.ndim == 1
    if one_query:
        scores, target_scores, target_positions = scores[None], target_scores[None], target_positions[None]
    positions = first_position + np.arange(scores.shape[1], dtype=np.int64)

    counts = np.empty(target_scores.shape, dtype=np.int64)
    for slot in range(target_scores.shape[1]):
        t_score = target_scores[:, slot, None]
        t_position = target_positions[:, slot, None]
        above = np.count_nonzero(scores > t_score, axis=1)
        tied_ahead = np.count_nonzero((scores == t_score) & (positions < t_position), axis=1)
        counts[:, slot] = above + tied_ahead
    return counts[0] if one_query else counts


def positive_ranks(scores, is_positive) -> np.ndarray:
    """Sorted 1-based ranks of one query's positives (see the module docstring for ties).

    ``scores`` is ``[G]``; ``is_positive`` a boolean ``[G]``. This is the counting form of the
    rule, the one a streaming evaluator uses; :func:`ranked_positives` is the sorting form.
    """
    scores = np.asarray(scores)
    positive_positions = np.flatnonzero(is_positive)
    ranks = 1 + count_ranked_ahead(scores, scores[positive_positions], positive_positions)
    return np.sort(ranks)


def stable_descending_order(scores: np.ndarray) -> np.ndarray:
    """Per row, gallery positions by descending score, ties by ascending position.

    Equal to ``np.argsort(-scores, axis=-1, kind="stable")`` but several times faster: each
    score becomes a signed 32-bit integer that orders like the float, and that integer and the
    position are packed into one unique int64 key, so numpy's fast (unstable, SIMD) sort
    returns the stable order. Scores must be float32 without NaN.
    """
    if scores.dtype != np.float32:
        raise TypeError(f"scores must be float32, got {scores.dtype}")
    num_items = scores.shape[-1]
    if num_items >= 2**32:
        raise ValueError(f"{num_items} items do not fit the 32-bit position field; score fewer at a time")
    # +0.0 turns -0.0 into +0.0: they compare equal as floats but not as bit patterns.
    bits = (scores + np.float32(0.0)).view(np.int32)
    # Non-negative floats already order like their bits; negative ones order in reverse,
    # and flipping all but the sign bit fixes that.
    keys = np.where(bits < 0, bits ^ np.int32(0x7FFFFFFF), bits).astype(np.int64)
    # Negate for descending order, then put the position in the low 32 bits (in place to
    # keep the peak memory near 8 bytes per score).
    np.negative(keys, out=keys)
    keys <<= 32
    keys |= np.arange(num_items, dtype=np.int64)
    keys.sort(axis=-1)
    return keys & np.int64(0xFFFFFFFF)


def ranked_positives(scores: np.ndarray, query_pids: np.ndarray, gallery_pids: np.ndarray):
    """Ranks of every positive of every query in a block of scores, sorting form.

    Returns ``(query_index, rank)``, two flat int64 arrays sorted by query and then by rank:
    the n-th positive of query q in ranked order sits at ``rank``.
    """
    order = stable_descending_order(scores)
    is_positive_in_order = gallery_pids[order] == query_pids[:, None]
    query_index, column = np.nonzero(is_positive_in_order)
    return query_index.astype(np.int64), column.astype(np.int64) + 1


# --------------------------------------------------------------------------- metrics


def per_query_stats(query_index: np.ndarray, ranks: np.ndarray, num_queries: int) -> dict[str, np.ndarray]:
    """Per-query positive count, best rank, AP and INP (fractions, not percent).

    Input is the flat form returned by :func:`ranked_positives`: sorted by query, then rank.
    Queries without positives get ``num_positives == 0`` and zeros elsewhere.
    """
    num_positives = np.bincount(query_index, minlength=num_queries)
    first = np.cumsum(num_positives) - num_positives  # index of each query's first positive
    has_positive = num_positives > 0

    # i in i / r_i: the 1-based order of each positive within its query.
    order_in_query = np.arange(len(ranks)) - first[query_index] + 1
    precision_sum = np.bincount(query_index, weights=order_in_query / ranks, minlength=num_queries)

    best_rank = np.zeros(num_queries, dtype=np.int64)
    worst_rank = np.zeros(num_queries, dtype=np.int64)
    best_rank[has_positive] = ranks[first[has_positive]]
    worst_rank[has_positive] = ranks[first[has_positive] + num_positives[has_positive] - 1]

    ap = np.zeros(num_queries)
    inp = np.zeros(num_queries)
    ap[has_positive] = precision_sum[has_positive] / num_positives[has_positive]
    inp[has_positive] = num_positives[has_positive] / worst_rank[has_positive]
    return {"num_positives": num_positives, "best_rank": best_rank, "ap": ap, "inp": inp}


def summarise(stats: dict[str, np.ndarray], ks: Sequence[int] = DEFAULT_KS, *,
              skip_queries_without_positives: bool = False) -> dict:
    """Average per-query stats into ``R{k}``, ``mAP``, ``mINP`` (percent) and counts.

    A query without positives raises :class:`DataError` unless
    ``skip_queries_without_positives``; skipped queries are counted in
    ``num_queries_skipped`` and left out of ``num_queries`` and every average.
    """
    ks = check_ks(ks)
    missing = np.flatnonzero(stats["num_positives"] == 0)
    if len(missing) and not skip_queries_without_positives:
        others = f" (and {len(missing) - 1} other queries)" if len(missing) > 1 else ""
        raise DataError(
            f"query has no positive in the gallery{others}, so its rank metrics are undefined; "
            "evaluate on a gallery that holds every query's person, or pass "
            "skip_queries_without_positives=True to leave such queries out",
            entry=int(missing[0]),
        )
    kept = stats["num_positives"] > 0
    if not kept.any():
        raise DataError("no query has a positive in the gallery; nothing to evaluate")

    best_rank = stats["best_rank"][kept]
    result = {f"R{k}": 100.0 * float(np.mean(best_rank <= k)) for k in ks}
    result["mAP"] = 100.0 * float(np.mean(stats["ap"][kept]))
    result["mINP"] = 100.0 * float(np.mean(stats["inp"][kept]))
    result["num_queries"] = int(kept.sum())
    result["num_queries_skipped"] = int(len(missing))
    return result


def metrics_from_positive_ranks(ranks_per_query, ks: Sequence[int] = DEFAULT_KS, *,
                                skip_queries_without_positives: bool = False) -> dict:
    """R@K, mAP and mINP from the 1-based ranks of each query's positives.

    ``ranks_per_query`` is a list of 1-D integer arrays (one per query, any order) or a 2-D
    array padded with values <= 0. Ranks of one query must be distinct. The result has the
    keys of :func:`summarise`; ``num_gallery`` is unknown here and left out.
    """
    query_index, ranks, num_queries = _flatten_ranks(ranks_per_query)
    if len(ranks):
        same_query = query_index[1:] == query_index[:-1]
        repeated = np.flatnonzero(same_query & (ranks[1:] == ranks[:-1]))
        if len(repeated):
            raise DataError(f"rank {ranks[repeated[0]]} appears twice; two positives cannot share a rank",
                            entry=int(query_index[repeated[0]]))
    stats = per_query_stats(query_index, ranks, num_queries)
    return summarise(stats, ks, skip_queries_without_positives=skip_queries_without_positives)


def _flatten_ranks(ranks_per_query):
    """List or padded array of ranks -> (query_index, rank, num_queries), sorted by both."""
    if isinstance(ranks_per_query, np.ndarray) and ranks_per_query.ndim == 2:
        padded = ranks_per_query.astype(np.int64)
        # Padding sorts to the end of each row and is dropped.
        padding = np.iinfo(np.int64).max
        padded = np.sort(np.where(padded > 0, padded, padding), axis=1)
        query_index, column = np.nonzero(padded != padding)
        return query_index.astype(np.int64), padded[query_index, column], padded.shape[0]

    rows = [np.sort(np.asarray(r, dtype=np.int64).ravel()) for r in ranks_per_query]
    for q, row in enumerate(rows):
        if len(row) and row[0] < 1:
            raise DataError(f"ranks are 1-based, got {row[0]}", entry=q)
    lengths = np.array([len(r) for r in rows], dtype=np.int64)
    query_index = np.repeat(np.arange(len(rows), dtype=np.int64), lengths)
    ranks = np.concatenate(rows) if rows else np.zeros(0, dtype=np.int64)
    return query_index, ranks, len(rows)


# --------------------------------------------------------------------------- front doors


def retrieval_metrics(similarity, query_pids, gallery_pids, ks: Sequence[int] = DEFAULT_KS, *,
                      skip_queries_without_positives: bool = False) -> dict:
    """Text-to-image metrics from a full ``[Q, G]`` similarity matrix.

    Returns ``R{k}`` for each k, ``mAP``, ``mINP`` (percent), ``num_queries``,
    ``num_queries_skipped`` and ``num_gallery``. Ties follow the module's ranking rule;
    scores are compared as float32, like the scores of the embedding path.
    """
    similarity = np.asarray(similarity)
    query_pids, gallery_pids = _check_pids(query_pids, gallery_pids)
    if similarity.shape != (len(query_pids), len(gallery_pids)):
        raise DataError(f"similarity has shape {similarity.shape}, expected "
                        f"({len(query_pids)}, {len(gallery_pids)}) from the person ids", field="similarity")
    if np.isnan(similarity).any():
        row = int(np.flatnonzero(np.isnan(similarity).any(axis=1))[0])
        raise DataError("similarity contains NaN", entry=row, field="similarity")
    _check_every_query_has_positive(query_pids, gallery_pids, skip_queries_without_positives)

    query_index, ranks = ranked_positives(similarity.astype(np.float32, copy=False), query_pids, gallery_pids)
    stats = per_query_stats(query_index, ranks, len(query_pids))
    result = summarise(stats, ks, skip_queries_without_positives=skip_queries_without_positives)
    result["num_gallery"] = len(gallery_pids)
    return result


def retrieval_metrics_from_embeddings(query_emb, gallery_emb, query_pids, gallery_pids,
                                      ks: Sequence[int] = DEFAULT_KS, chunk_size: int = 1024, *,
                                      skip_queries_without_positives: bool = False) -> dict:
    """Same result as :func:`retrieval_metrics` on ``query_emb @ gallery_emb.T``, in chunks.

    Similarities are float32 inner products, computed ``chunk_size`` queries at a time so
    memory stays at ``chunk_size x G`` scores. Embeddings should be L2-normalised (inner
    product = cosine); rows whose norm is off by more than 1e-3 are normalised here, so the
    score is always the cosine. A zero or non-finite embedding raises :class:`DataError`.
    Peak memory is about 25 bytes per score of a chunk (scores, sort keys, gathered ids).
    """
    query_pids, gallery_pids = _check_pids(query_pids, gallery_pids)
    query_emb = unit_rows(query_emb, "query_emb")
    gallery_emb = unit_rows(gallery_emb, "gallery_emb")
    if len(query_emb) != len(query_pids) or len(gallery_emb) != len(gallery_pids):
        raise DataError(f"{len(query_emb)} query and {len(gallery_emb)} gallery embeddings but "
                        f"{len(query_pids)} query and {len(gallery_pids)} gallery person ids")
    if query_emb.shape[1] != gallery_emb.shape[1]:
        raise DataError(f"query embeddings have dim {query_emb.shape[1]}, gallery embeddings "
                        f"{gallery_emb.shape[1]}", field="embedding")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    _check_every_query_has_positive(query_pids, gallery_pids, skip_queries_without_positives)

    gallery_t = np.ascontiguousarray(gallery_emb.T)
    parts = []
    for start in range(0, len(query_emb), chunk_size):
        stop = min(start + chunk_size, len(query_emb))
        scores = query_emb[start:stop] @ gallery_t
        query_index, ranks = ranked_positives(scores, query_pids[start:stop], gallery_pids)
        parts.append(per_query_stats(query_index, ranks, stop - start))
    stats = {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}

    result = summarise(stats, ks, skip_queries_without_positives=skip_queries_without_positives)
    result["num_gallery"] = len(gallery_pids)
    return result


# --------------------------------------------------------------------------- checks


def check_ks(ks: Sequence[int]) -> tuple[int, ...]:
    ks = tuple(int(k) for k in ks)
    if not ks or any(k < 1 for k in ks):
        raise ValueError(f"ks must be positive integers, got {ks}")
    return tuple(sorted(set(ks)))


def _check_pids(query_pids, gallery_pids):
    query_pids = np.asarray(query_pids).ravel()
    gallery_pids = np.asarray(gallery_pids).ravel()
    if len(query_pids) == 0 or len(gallery_pids) == 0:
        raise DataError(f"need at least one query and one gallery item, got "
                        f"{len(query_pids)} queries and {len(gallery_pids)} gallery items")
    return query_pids, gallery_pids


def queries_without_positives(query_pids, gallery_pids) -> np.ndarray:
    """Indices of the queries whose person id has no gallery item."""
    return np.flatnonzero(~np.isin(np.asarray(query_pids), np.asarray(gallery_pids)))


def _check_every_query_has_positive(query_pids, gallery_pids, skip: bool) -> None:
    if skip:
        return
    missing = queries_without_positives(query_pids, gallery_pids)
    if len(missing):
        q = int(missing[0])
        others = f" ({len(missing) - 1} other queries too)" if len(missing) > 1 else ""
        raise DataError(
            f"person id {query_pids[q]} has no image in the gallery{others}, so the query's rank "
            "metrics are undefined; pass skip_queries_without_positives=True to leave such queries out",
            entry=q, field="person_id",
        )


def unit_rows(embeddings, name: str) -> np.ndarray:
    embeddings = np.asarray(embeddings, dtype=np.float32)
    if embeddings.ndim != 2:
        raise DataError(f"expected a 2-D array, got shape {embeddings.shape}", field=name)
    norms = np.linalg.norm(embeddings, axis=1)
    bad = np.flatnonzero(~np.isfinite(norms) | (norms == 0))
    if len(bad):
        raise DataError("embedding is zero or not finite, so it has no direction", entry=int(bad[0]), field=name)
    if np.all(np.abs(norms - 1) <= 1e-3):
        return embeddings
    return embeddings / norms[:, None]
