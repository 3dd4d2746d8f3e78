"""Exact text-to-image R@K, mAP and mINP over a sharded gallery, in bounded memory.

The in-memory evaluator scores a chunk of queries against the whole gallery at once; at
10,000 queries x 1,000,000 images the full matrix would be 40 GB. Every metric only needs
the rank of each query's positives (see :mod:`tpr_ray.evaluation.metrics`), and a rank is one plus the
number of items ranked ahead of the positive: a sum over gallery shards. So the gallery is
never held at once:

1. plan (driver): the person id of every gallery item gives each query the global
   positions of its positives, a ``[Q, P]`` table padded with -1 (the *targets*).
2. positive pass (one task per shard): the score of every target that lies in the shard.
3. rank pass (one task per shard): per block of queries, score the whole shard (float32
   matmul), count the shard's items ranked ahead of every target under the tie rule of
   :mod:`tpr_ray.evaluation.metrics` (higher score, or equal score and lower gallery position), and
   keep the shard's top K by (score desc, position asc).
4. merge (driver): add the counts, merge the top-K lists, metrics from the ranks.

Memory per task is one shard plus ``block_size x shard_rows`` scores; the driver holds the
queries and ``[Q, P]`` / ``[Q, K]`` tables.

Layout: the kernels of steps 1-4 are pure functions in :mod:`tpr_ray.evaluation.kernels`;
shards are read through :mod:`tpr_ray.tables`; :mod:`tpr_ray.evaluation.executors` runs the
per-shard tasks in this process or on Ray; this module plans and merges, configured by one
:class:`StreamingSettings`.

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

import dataclasses
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial

import numpy as np

from tpr_ray.errors import ConfigError, DataError
from tpr_ray.evaluation.in_memory import chance_level
from tpr_ray.evaluation.metrics import (
    DEFAULT_KS,
    check_ks,
    metrics_from_positive_ranks,
    queries_without_positives,
    unit_rows,
)
from tpr_ray.evaluation.executors import run_here, run_with_ray, task_memory
from tpr_ray.evaluation.kernels import (
    merge_top_k,
    positive_positions,
    ranks_from_counts,
    shard_positive_scores,
    shard_ranks,
)
from tpr_ray.evaluation.kernels_torch import resolve_device, shard_ranks_torch
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

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StreamingSettings:
    """How the streaming evaluator runs; none of these change the metrics.

    ``use_ray``: shard tasks as Ray tasks declaring ``cpus_per_task`` CPUs and their memory
    (default: when Ray is initialised); otherwise in this process, ``local_threads`` at a
    time (numpy releases the GIL in the heavy steps; limit BLAS to one thread each then).
    ``device``: where the rank pass runs -- ``numpy``, or torch on ``cpu``/``cuda``;
    ``auto`` takes the GPU when the task sees one (give Ray tasks ``gpus_per_task``), else
    numpy. Every choice follows one tie rule and gives the same ranks (see
    :mod:`tpr_ray.evaluation.kernels_torch`).
    """

    ks: tuple[int, ...] = DEFAULT_KS
    top_k: int = 10
    block_size: int = 1024
    use_ray: bool | None = None
    cpus_per_task: float = 1.0
    local_threads: int = 1
    skip_queries_without_positives: bool = False
    device: str = "auto"
    gpus_per_task: float = 0.0

    def __post_init__(self):
        try:
            object.__setattr__(self, "ks", check_ks(self.ks))
        except ValueError as error:
            raise ConfigError(str(error)) from None
        for name in ("top_k", "block_size", "local_threads"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.cpus_per_task <= 0 or self.gpus_per_task < 0:
            raise ConfigError(f"cpus_per_task must be positive and gpus_per_task not negative, got "
                              f"{self.cpus_per_task} and {self.gpus_per_task}")
        try:
            resolve_device(self.device) if self.device != "auto" else None
        except ValueError as error:
            raise ConfigError(str(error)) from None


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


def _ranks_task(queries, shard, first_position, target_scores, targets, top_k, block_size, device="numpy"):
    tick = time.perf_counter()
    device = resolve_device(device)  # here, in the task: the GPU it sees is the one to use
    if device == "numpy":
        result = shard_ranks(queries, load_shard_embeddings(shard), first_position, target_scores, targets, top_k,
                             block_size)
    else:
        result = shard_ranks_torch(queries, load_shard_embeddings(shard), first_position, target_scores, targets,
                                   top_k, block_size, device)
    result["device"] = device
    result["seconds"] = time.perf_counter() - tick
    return result


# --------------------------------------------------------------------------- front doors


def _settings(settings: StreamingSettings | None, ks, **given) -> StreamingSettings:
    """``settings`` with the keyword arguments the caller gave (None: not given) applied."""
    changes = {k: v for k, v in given.items() if v is not None}
    if ks is not None:
        changes["ks"] = tuple(ks)
    return dataclasses.replace(settings or StreamingSettings(), **changes)


def evaluate_sharded(query_emb, query_pids, shards: Sequence, ks: Sequence[int] | None = None, *,
                     settings: StreamingSettings | None = None, top_k: int | None = None,
                     block_size: int | None = None, use_ray: bool | None = None, cpus_per_task: float | None = None,
                     local_threads: int | None = None,
                     skip_queries_without_positives: bool | None = None) -> StreamingResult:
    """Exact R@K, mAP and mINP of queries against a gallery given as shards.

    ``shards`` are Parquet files of a gallery embedding table (URIs) or :class:`ShardArrays`;
    gallery order is their concatenation. How it runs is ``settings`` (see
    :class:`StreamingSettings`), with any of its fields given as keywords overriding it.
    The metrics equal :func:`tpr_ray.evaluation.metrics.retrieval_metrics_from_embeddings` on the
    concatenated gallery (see the module docstring on rounding), with the same keys plus
    ``num_shards``.
    """
    settings = _settings(settings, ks, top_k=top_k, block_size=block_size, use_ray=use_ray,
                         cpus_per_task=cpus_per_task, local_threads=local_threads,
                         skip_queries_without_positives=skip_queries_without_positives)
    result, _ = _evaluate(query_emb, query_pids, shards, settings)
    return result


def _evaluate(query_emb, query_pids, shards, settings: StreamingSettings):
    ks, top_k, block_size, skip = (settings.ks, settings.top_k, settings.block_size,
                                   settings.skip_queries_without_positives)
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

    use_ray = settings.use_ray
    if use_ray is None:
        import ray

        use_ray = ray.is_initialized()
    run = partial(run_with_ray, gpus=settings.gpus_per_task) if use_ray else \
        partial(run_here, threads=settings.local_threads)
    block = min(block_size, len(queries))
    dim, slots = queries.shape[1], targets.shape[1]

    tick = time.perf_counter()
    parts = run(_positive_scores_task, [(s, first, targets, block_size) for s, first in zip(shards, firsts)],
                queries, [task_memory(n, dim, block, slots, top_k, len(queries), False) for n in sizes],
                settings.cpus_per_task)
    target_scores = np.full(targets.shape, np.nan, dtype=np.float32)
    for part in parts:
        found = ~np.isnan(part)
        target_scores[found] = part[found]
    if np.isnan(target_scores[targets >= 0]).any():
        raise DataError("a positive's score was found in no shard; did the shards change during evaluation?")
    timings["positive_pass_s"] = time.perf_counter() - tick

    tick = time.perf_counter()
    parts = run(_ranks_task, [(s, first, target_scores, targets, top_k, block_size, settings.device)
                              for s, first in zip(shards, firsts)],
                queries, [task_memory(n, dim, block, slots, top_k, len(queries), True) for n in sizes],
                settings.cpus_per_task)
    counts = np.zeros(targets.shape, dtype=np.int64)
    for part in parts:
        counts += part["counts"]
    top_scores, top_positions = merge_top_k([(p["top_scores"], p["top_positions"]) for p in parts], top_k)
    timings["rank_pass_s"] = time.perf_counter() - tick
    timings["rank_task_s"] = [round(p["seconds"], 3) for p in parts]
    timings["rank_devices"] = sorted({p["device"] for p in parts})

    ranks = ranks_from_counts(counts, targets)
    metrics = metrics_from_positive_ranks(ranks, ks, skip_queries_without_positives=skip)
    metrics["num_gallery"] = int(sum(sizes))
    metrics["num_shards"] = len(shards)
    return StreamingResult(metrics, top_positions, top_scores, ranks, timings), gallery_pids


def evaluate_tables(gallery_uri: str, queries_uri: str, ks: Sequence[int] | None = None, *,
                    settings: StreamingSettings | None = None, top_k: int | None = None,
                    block_size: int | None = None, use_ray: bool | None = None, allow_mismatch: bool = False,
                    skip_queries_without_positives: bool | None = None,
                    allow_incomplete: bool = False) -> StreamingResult:
    """Streaming counterpart of :func:`tpr_ray.evaluation.in_memory.evaluate_embeddings`.

    The query table is read whole (it is small), the gallery shard by shard. The metrics
    carry the same extra keys (``method``, ``model``, ``checkpoint``, ``dim``, ``gallery``,
    ``queries``, ``ks``, ``chance``; ``mismatch`` when allowed).
    """
    settings = _settings(settings, ks, top_k=top_k, block_size=block_size, use_ray=use_ray,
                         skip_queries_without_positives=skip_queries_without_positives)
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
    result, gallery_pids = _evaluate(embedding_matrix(queries), query_pids, shards, settings)
    result.metrics.update(gallery_from)
    result.metrics.update(dim=queries_info["dim"], gallery=gallery_uri, queries=queries_uri, ks=list(settings.ks))
    if mismatch:
        result.metrics["mismatch"] = mismatch
    result.metrics["chance"] = chance_level(query_pids, gallery_pids, settings.ks)
    return result
