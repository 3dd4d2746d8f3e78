"""Evaluate embedding tables: read gallery and query shards, score them, report metrics.

An embedding directory (local path or fsspec URI) holds Parquet shards ``part-00000.parquet``,
... and a sidecar ``_tpr_ray.json`` describing them. The gallery's order, which breaks ties
in the ranking (see :mod:`tpr_ray.metrics`), is the rows of its shards in file-name order.
"""

from __future__ import annotations

import math
import posixpath
from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from tpr_ray import storage
from tpr_ray.errors import ConfigError, DataError
from tpr_ray.metrics import DEFAULT_KS, check_ks, queries_without_positives, retrieval_metrics_from_embeddings

SIDECAR = "_tpr_ray.json"
# Columns that name where the embeddings came from; both tables must agree on them.
PROVENANCE = ("method", "model", "checkpoint")
REQUIRED_COLUMNS = {
    "gallery": ("image_id", "person_id", "embedding"),
    "queries": ("query_id", "person_id", "embedding"),
}


# --------------------------------------------------------------------------- reading


def read_embeddings(uri: str) -> tuple[pa.Table, dict]:
    """Read every ``*.parquet`` shard under ``uri`` in name order, plus its sidecar.

    Returns the concatenated table, with ``embedding`` as ``fixed_size_list<float32>[dim]``
    (``list``/``large_list`` columns are converted), and an info dict: the sidecar's fields
    (``kind``, ``method``, ``model``, ``checkpoint``, ...) plus ``uri``, ``files``, ``rows``
    and ``dim``. Raises :class:`DataError` naming the file, row and column for a missing
    column, null, ragged or non-finite embeddings, or shards of different dims.
    """
    fs, path = storage.filesystem(uri)
    if not fs.isdir(path):
        raise DataError("embedding directory not found; pass the folder written by `tpr-ray embed`", file=uri)
    # Hidden and underscore names are temporary or metadata files, not shards.
    shard_paths = sorted((p for p in fs.ls(path, detail=False)
                          if p.endswith(".parquet") and not posixpath.basename(p).startswith((".", "_"))),
                         key=posixpath.basename)
    names = [posixpath.basename(p) for p in shard_paths]
    if not names:
        raise DataError("no *.parquet shards in this directory", file=uri)

    sidecar_uri = storage.join(uri, SIDECAR)
    info = dict(storage.read_json(sidecar_uri)) if storage.exists(sidecar_uri) else {}
    kind = info.get("kind")
    if kind is not None and kind not in REQUIRED_COLUMNS:
        raise DataError(f"kind must be 'gallery' or 'queries', got {kind!r}", file=sidecar_uri, field="kind")

    tables, dim = [], None
    for name, shard_path in zip(names, shard_paths):
        file_uri = storage.join(uri, name)
        with fs.open(shard_path, "rb") as f:
            table = pq.read_table(f)
        if kind is None:
            kind = "queries" if "query_id" in table.column_names else "gallery"
        for column in REQUIRED_COLUMNS[kind]:
            if column not in table.column_names:
                raise DataError(f"missing column in a {kind} embedding table (has {table.column_names})",
                                file=file_uri, field=column)
        table = table.set_column(table.column_names.index("embedding"), "embedding",
                                 fixed_size_embeddings(table.column("embedding"), file_uri))
        shard_dim = table.schema.field("embedding").type.list_size
        if dim is not None and shard_dim != dim:
            raise DataError(f"embedding dim {shard_dim} differs from {dim} in the earlier shards",
                            file=file_uri, field="embedding")
        dim = shard_dim
        tables.append(table)

    table = pa.concat_tables(tables, promote_options="default")
    if "rows" in info and info["rows"] != table.num_rows:
        raise DataError(f"sidecar says {info['rows']} rows but the shards hold {table.num_rows}; "
                        "a shard is missing or extra, re-run the embedding job", file=sidecar_uri, field="rows")
    if "dim" in info and info["dim"] != dim:
        raise DataError(f"sidecar says dim {info['dim']} but the shards hold {dim}", file=sidecar_uri, field="dim")
    info.update(kind=kind, uri=uri, files=names, rows=table.num_rows, dim=dim)
    return table, info


def fixed_size_embeddings(column: pa.ChunkedArray, file_uri: str) -> pa.FixedSizeListArray:
    """Check an embedding column and return it as ``fixed_size_list<float32>[dim]``."""
    array = column.combine_chunks()
    kind = array.type
    if not (pa.types.is_fixed_size_list(kind) or pa.types.is_list(kind) or pa.types.is_large_list(kind)):
        raise DataError(f"expected a list of floats, got {kind}", file=file_uri, field="embedding")
    if not pa.types.is_floating(kind.value_type):
        raise DataError(f"expected float values, got {kind.value_type}", file=file_uri, field="embedding")
    if array.null_count:
        row = int(np.flatnonzero(array.is_null().to_numpy(zero_copy_only=False))[0])
        raise DataError("embedding is null", file=file_uri, entry=row, field="embedding")

    if pa.types.is_fixed_size_list(kind):
        dim = kind.list_size
    else:
        lengths = pc.list_value_length(array).to_numpy(zero_copy_only=False)
        dim = int(lengths[0]) if len(lengths) else 0
        ragged = np.flatnonzero(lengths != dim)
        if len(ragged):
            row = int(ragged[0])
            raise DataError(f"embedding has {lengths[row]} values but row 0 has {dim}; "
                            "all embeddings in a table must have one dim", file=file_uri, entry=row, field="embedding")
    values = array.flatten()  # respects slicing offsets, unlike .values
    if values.null_count:
        position = int(np.flatnonzero(values.is_null().to_numpy(zero_copy_only=False))[0])
        raise DataError("embedding holds a null value", file=file_uri, entry=position // max(dim, 1),
                        field="embedding")
    values = values.to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
    not_finite = np.flatnonzero(~np.isfinite(values))
    if len(not_finite):
        raise DataError("embedding holds NaN or inf; the model or its inputs went wrong for this row",
                        file=file_uri, entry=int(not_finite[0]) // dim, field="embedding")
    return pa.FixedSizeListArray.from_arrays(pa.array(values, type=pa.float32()), dim)


def embedding_matrix(table: pa.Table) -> np.ndarray:
    """The ``embedding`` column of a table from :func:`read_embeddings` as ``[N, dim]`` float32."""
    array = table.column("embedding").combine_chunks()
    dim = array.type.list_size
    return array.flatten().to_numpy(zero_copy_only=False).reshape(-1, dim)


def person_ids(table: pa.Table, info: dict) -> np.ndarray:
    column = table.column("person_id")
    if column.null_count:
        row = int(np.flatnonzero(column.is_null().to_numpy(zero_copy_only=False))[0])
        raise DataError("person_id is null", file=info["uri"], entry=row, field="person_id")
    return column.to_numpy()


def check_same_model(gallery_from: dict, queries_from: dict, allow_mismatch: bool = False) -> dict:
    """The provenance fields on which gallery and queries differ; an error unless allowed.

    A field that is a list (one table mixing several models) counts as a mismatch too.
    """
    mismatch = {field: {"gallery": gallery_from[field], "queries": queries_from[field]}
                for field in PROVENANCE
                if gallery_from[field] != queries_from[field] or isinstance(gallery_from[field], list)
                or isinstance(queries_from[field], list)}
    if mismatch and not allow_mismatch:
        lines = "; ".join(f"{f}: gallery {v['gallery']!r}, queries {v['queries']!r}" for f, v in mismatch.items())
        raise ConfigError(f"gallery and queries were not embedded by one model ({lines}); "
                          "re-embed one side, or pass allow_mismatch=True (--allow-mismatch) on purpose")
    return mismatch


def provenance(table: pa.Table, info: dict) -> dict:
    """``method``/``model``/``checkpoint`` of a table: from the sidecar, else its columns.

    A column holding several distinct values is reported as a sorted list.
    """
    found = {}
    for field in PROVENANCE:
        if info.get(field) is not None:
            found[field] = info[field]
        elif field in table.column_names:
            values = sorted(str(v) for v in pc.unique(table.column(field)).to_pylist() if v is not None)
            found[field] = values[0] if len(values) == 1 else (values or None)
        else:
            found[field] = None
    return found


# --------------------------------------------------------------------------- evaluating


def evaluate_embeddings(gallery_uri: str, queries_uri: str, ks: Sequence[int] = DEFAULT_KS, *,
                        allow_mismatch: bool = False, skip_queries_without_positives: bool = False,
                        chunk_size: int = 1024) -> dict:
    """Text-to-image metrics of a query table against a gallery table.

    Returns the keys of :func:`tpr_ray.metrics.retrieval_metrics` plus ``method``,
    ``model``, ``checkpoint``, ``dim``, ``gallery``/``queries`` (the URIs), ``ks`` and
    ``chance`` (see :func:`chance_level`). Raises :class:`ConfigError` when the two tables
    come from different methods, models or checkpoints (or one table mixes several), unless
    ``allow_mismatch``; the differences are then listed under ``mismatch``.
    """
    ks = check_ks(ks)
    gallery, gallery_info = read_embeddings(gallery_uri)
    queries, queries_info = read_embeddings(queries_uri)
    for info, expected in ((gallery_info, "gallery"), (queries_info, "queries")):
        if info["kind"] != expected:
            raise ConfigError(f"{info['uri']} holds a {info['kind']} table, expected {expected}; "
                              "check the order of the gallery and queries arguments")
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
