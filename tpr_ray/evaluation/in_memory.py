"""Evaluate embedding tables in memory: score queries against the gallery, report metrics.

The tables are read through :mod:`tpr_ray.tables` (the format's one home); the gallery's
order, which breaks ties in the ranking (see :mod:`tpr_ray.evaluation.metrics`), is the rows of its
shards in file-name order.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from tpr_ray.io import storage
from tpr_ray.errors import DataError
from tpr_ray.evaluation.metrics import DEFAULT_KS, check_ks, queries_without_positives, retrieval_metrics_from_embeddings
from tpr_ray.tables import (
    check_kind,
    check_same_model,
    embedding_matrix,
    person_ids,
    provenance,
    read_embeddings,
)

# --------------------------------------------------------------------------- evaluating


def evaluate_embeddings(gallery_uri: str, queries_uri: str, ks: Sequence[int] = DEFAULT_KS, *,
                        allow_mismatch: bool = False, skip_queries_without_positives: bool = False,
                        chunk_size: int = 1024, allow_incomplete: bool = False) -> dict:
    """Text-to-image metrics of a query table against a gallery table.

    Returns the keys of :func:`tpr_ray.evaluation.metrics.retrieval_metrics` plus ``method``,
    ``model``, ``checkpoint``, ``dim``, ``gallery``/``queries`` (the URIs), ``ks`` and
    ``chance`` (see :func:`chance_level`). Raises :class:`ConfigError` when the two tables
    come from different methods, models or checkpoints (or one table mixes several), unless
    ``allow_mismatch``; the differences are then listed under ``mismatch``. A table whose
    embedding job has not finished is a :class:`DataError` unless ``allow_incomplete``.
    """
    ks = check_ks(ks)
    gallery, gallery_info = read_embeddings(gallery_uri, allow_incomplete=allow_incomplete)
    queries, queries_info = read_embeddings(queries_uri, allow_incomplete=allow_incomplete)
    check_kind(gallery_info, "gallery")
    check_kind(queries_info, "queries")
    if gallery_info["dim"] != queries_info["dim"]:
        raise DataError(f"query embeddings have dim {queries_info['dim']} but gallery embeddings have "
                        f"{gallery_info['dim']}; they come from different models", file=queries_uri,
                        field="embedding")

    gallery_from = provenance(gallery, gallery_info)
    mismatch = check_same_model(gallery_from, provenance(queries, queries_info), allow_mismatch)

    query_pids = person_ids(queries, queries_info)
    gallery_pids = person_ids(gallery, gallery_info)
    missing = queries_without_positives(query_pids, gallery_pids)
    if len(missing) and not skip_queries_without_positives:
        row = int(missing[0])
        others = f" ({len(missing) - 1} other queries too)" if len(missing) > 1 else ""
        raise DataError(f"person id {query_pids[row]} has no image in the gallery {gallery_uri}{others}, so "
                        "the query's rank metrics are undefined; evaluate against the matching gallery, or "
                        "leave such queries out with --skip-queries-without-positives "
                        "(skip_queries_without_positives=True)", file=queries_uri, entry=row, field="person_id")
    result = retrieval_metrics_from_embeddings(
        embedding_matrix(queries), embedding_matrix(gallery), query_pids, gallery_pids, ks, chunk_size,
        skip_queries_without_positives=skip_queries_without_positives)

    result.update(gallery_from)
    result.update(dim=gallery_info["dim"], gallery=gallery_uri, queries=queries_uri, ks=list(ks))
    if mismatch:
        result["mismatch"] = mismatch
    result["chance"] = chance_level(query_pids, gallery_pids, ks)
    return result


def chance_level(query_pids, gallery_pids, ks: Sequence[int] = DEFAULT_KS) -> dict:
    """Expected metrics (percent) of a uniformly random ranking, averaged over queries.

    Queries without a positive in the gallery are left out, as in the evaluation with
    ``skip_queries_without_positives``. With G gallery items and P positives, all exact:

    - R@K: ``1 - C(G-P, K) / C(G, K)``.
    - AP: ``((G-P) H_G / G + P - 1) / (G - 1)`` with ``H_G`` the G-th harmonic number
      (a positive at rank r, uniform on 1..G, has on average ``(r-1)(P-1)/(G-1)``
      positives ahead of it).
    - INP: ``sum_m (P/m) C(m-1, P-1) / C(G, P)`` over the rank m of the last positive.
    """
    ks = check_ks(ks)
    query_pids = np.asarray(query_pids).ravel()
    gallery_pids = np.asarray(gallery_pids).ravel()
    unique_pids, counts = np.unique(gallery_pids, return_counts=True)
    where = np.searchsorted(unique_pids, query_pids).clip(max=len(unique_pids) - 1)
    positives = np.where(unique_pids[where] == query_pids, counts[where], 0)
    positives = positives[positives > 0]
    if len(positives) == 0:
        raise DataError("no query has a positive in the gallery; chance level is undefined")

    num_gallery = len(gallery_pids)
    # log(n!) for n = 0..G, for the binomials.
    log_factorial = np.concatenate([[0.0], np.cumsum(np.log(np.arange(1, num_gallery + 1)))])
    harmonic = float(np.sum(1.0 / np.arange(1, num_gallery + 1)))

    totals = {f"R{k}": 0.0 for k in ks} | {"mAP": 0.0, "mINP": 0.0}
    distinct, how_many = np.unique(positives, return_counts=True)
    for p, weight in zip(distinct.tolist(), how_many.tolist()):
        for k in ks:
            totals[f"R{k}"] += weight * _hit_probability(num_gallery, p, k)
        if num_gallery == 1:
            expected_ap = expected_inp = 1.0
        else:
            expected_ap = ((num_gallery - p) * harmonic / num_gallery + p - 1) / (num_gallery - 1)
            last = np.arange(p, num_gallery + 1)  # possible ranks of the last positive
            log_prob = (log_factorial[last - 1] - log_factorial[p - 1] - log_factorial[last - p]
                        - (log_factorial[num_gallery] - log_factorial[p] - log_factorial[num_gallery - p]))
            expected_inp = float(np.sum(p / last * np.exp(log_prob)))
        totals["mAP"] += weight * expected_ap
        totals["mINP"] += weight * expected_inp
    return {name: 100.0 * value / len(positives) for name, value in totals.items()}


def _hit_probability(num_gallery: int, num_positives: int, k: int) -> float:
    """P(at least one of P positives in the top K of G) for a random order."""
    if k >= num_gallery - num_positives + 1:
        return 1.0
    # C(G-P, K) / C(G, K) = prod_{i<K} (G-P-i) / (G-i), taken in logs to avoid underflow.
    i = np.arange(k)
    return 1.0 - math.exp(float(np.sum(np.log((num_gallery - num_positives - i) / (num_gallery - i)))))


# --------------------------------------------------------------------------- reporting


def metric_names(metrics: dict) -> list[str]:
    """``R{k}`` keys in order of k, then ``mAP`` and ``mINP``."""
    recall = sorted((key for key in metrics if key[:1] == "R" and key[1:].isdigit()), key=lambda key: int(key[1:]))
    return recall + [key for key in ("mAP", "mINP") if key in metrics]


def format_metrics_table(metrics: dict, chance: dict | None = None) -> str:
    """A small aligned text table of R@K, mAP and mINP (percent, two decimals).

    One row for ``metrics`` (labelled with its ``method`` when known) and, when given, one
    for ``chance``.
    """
    names = metric_names(metrics)
    rows = [(str(metrics.get("method") or "result"), metrics)]
    if chance is not None:
        rows.append(("chance", chance))
    label_width = max(len(label) for label, _ in rows)
    widths = [max(len(name), 6) for name in names]

    def line(label, cells):
        return "  ".join([label.ljust(label_width)] + [c.rjust(w) for c, w in zip(cells, widths)]).rstrip()

    out = [line("", names)]
    for label, values in rows:
        out.append(line(label, [f"{values[name]:.2f}" if name in values else "-" for name in names]))
    return "\n".join(out)


def write_metrics_json(metrics: dict, uri: str) -> None:
    """Write metrics as indented JSON to a local path or fsspec URI (atomically)."""
    storage.write_json(uri, _plain(metrics))


def _plain(value):
    """numpy scalars and arrays -> Python types, for JSON."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value
