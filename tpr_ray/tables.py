"""The embedding-table format: one place that writers and readers share.

An embedding table is a folder (local path or fsspec URI) holding Parquet shards
``part-00000.parquet``, ``part-00001.parquet``, ... and a sidecar ``_tpr_ray.json``. Its
rows, in shard-name order, are the gallery's order, which breaks ties in the ranking (see
:mod:`tpr_ray.evaluation.metrics`). Rejected images of shard ``part-N`` go to ``<table>-rejects/part-N``; while the job runs, the
input columns of each pending shard are in ``<table>-plan/part-N`` (removed at the end).

Sidecar fields (written by :mod:`tpr_ray.embedding.pipeline` when the job starts and when it is complete):
``kind`` (``gallery``/``queries``), ``complete``, ``num_shards`` (planned), ``dim``, ``dtype``, ``method``, ``model``,
``checkpoint``, ``fingerprint``, ``settings``, ``source``, ``split``, ``inputs``; once
complete also ``shards`` (``file``, ``rows``, ``rejects``, ``bytes``, ``footer`` each: ``bytes`` the
file's size and ``footer`` a hash of its Parquet footer, which holds the row count and the
statistics of the id and provenance columns), ``rows``, ``rejected``.
While a job runs, the shard files in the folder are the record of what is committed; once it is
complete, the sidecar's ``shards`` list is (:func:`list_shards` refuses a shard missing, extra or
replaced). A gallery's ``image_id`` values are unique (checked per shard when it is committed,
and over the whole table by the readers that hold it).

Shard columns::

    gallery: image_id string, person_id int64 (null for a bare gallery), image_uri string,
             embedding fixed_size_list<float32>[dim] (L2-normalised),
             method string, model string, checkpoint string
    queries: query_id int64, image_id string, person_id int64, caption string,
             embedding fixed_size_list<float32>[dim] (L2-normalised),
             method string, model string, checkpoint string
    rejects: image_id string, image_uri string, reason string

Names starting with ``_`` or ``.`` are never shards: metadata, and the ``_tmp.`` files of
interrupted atomic writes (:data:`tpr_ray.io.storage.TEMP_PREFIX`).
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from tpr_ray.io import storage
from tpr_ray.errors import ConfigError, DataError

SIDECAR = "_tpr_ray.json"
SHARD_PREFIX = "part-"
SHARD_SUFFIX = ".parquet"
SHARD_FORMAT = SHARD_PREFIX + "{:05d}" + SHARD_SUFFIX
REJECTS_SUFFIX = "-rejects"
PLAN_SUFFIX = "-plan"
TEMP_PREFIX = storage.TEMP_PREFIX
# Columns that name where the embeddings came from; gallery and queries must agree on them.
PROVENANCE = ("method", "model", "checkpoint")
REQUIRED_COLUMNS = {
    "gallery": ("image_id", "person_id", "embedding"),
    "queries": ("query_id", "person_id", "embedding"),
}
KINDS = tuple(REQUIRED_COLUMNS)
# The input columns each table carries (the embedding and provenance columns are added), and
# their types; a gallery's inputs (a manifest split, a folder, a listing) come as GALLERY_INPUT.
DATA_COLUMNS = {"gallery": ["image_id", "person_id", "image_uri"],
                "queries": ["query_id", "image_id", "person_id", "caption"]}
COLUMN_TYPES = {"image_id": pa.string(), "person_id": pa.int64(), "image_uri": pa.string(),
                "query_id": pa.int64(), "caption": pa.string()}
GALLERY_INPUT = pa.schema([(c, COLUMN_TYPES[c]) for c in DATA_COLUMNS["gallery"]])


class TableKindError(ConfigError):
    """A gallery table was given where queries were expected, or the other way round."""


# --------------------------------------------------------------------------- names


def shard_name(shard: int) -> str:
    return SHARD_FORMAT.format(shard)


def shard_number(name: str) -> int | None:
    """The number of a shard file written by the embedding job (``part-00012.parquet`` -> 12), else None."""
    if not (name.startswith(SHARD_PREFIX) and name.endswith(SHARD_SUFFIX)):
        return None
    digits = name[len(SHARD_PREFIX):-len(SHARD_SUFFIX)]
    return int(digits) if digits.isdigit() else None


def is_data_file(name: str) -> bool:
    """Whether a file name in a table folder is a shard a reader should read."""
    return name.endswith(SHARD_SUFFIX) and not name.startswith((".", "_"))


def sidecar_uri(table_uri: str) -> str:
    return storage.join(table_uri, SIDECAR)


def rejects_dir(table_uri: str) -> str:
    return table_uri.rstrip("/") + REJECTS_SUFFIX


def plan_dir(table_uri: str) -> str:
    """Where an embedding job keeps its shard plan (the input columns of each pending shard)
    while it runs; removed once the table is complete."""
    return table_uri.rstrip("/") + PLAN_SUFFIX


def table_dir(uri: str, kind: str) -> str:
    """``uri/kind`` when ``uri`` is the output of `tpr-ray embed` (holding ``kind/``), else ``uri``."""
    if storage.exists(sidecar_uri(storage.join(uri, kind))):
        return storage.join(uri, kind)
    return uri


# --------------------------------------------------------------------------- sidecar and shards


def read_sidecar(table_uri: str) -> dict:
    """The sidecar's fields, or ``{}`` for a table written without one (by other tools); one
    that is not a JSON object is a :class:`DataError` naming it."""
    uri = sidecar_uri(table_uri)
    if not storage.exists(uri):
        return {}
    try:
        info = json.loads(storage.read_bytes(uri))
    except UnicodeDecodeError:
        raise DataError("sidecar is not UTF-8 JSON; re-run the embedding job that wrote the table", file=uri) from None
    except json.JSONDecodeError as err:
        raise DataError(f"sidecar is not valid JSON ({err.msg} at line {err.lineno}, column {err.colno}); re-run "
                        "the embedding job that wrote the table", file=uri) from None
    if not isinstance(info, dict):
        raise DataError(f"sidecar holds a JSON {type(info).__name__}, not an object; re-run the embedding job "
                        "that wrote the table", file=uri)
    return info


def write_sidecar(table_uri: str, info: dict) -> None:
    storage.write_json(sidecar_uri(table_uri), info)


def list_shards(table_uri: str, info: dict | None = None) -> list[str]:
    """The shard URIs of an embedding table, in name order (the gallery's order).

    When the sidecar (``info``; read here when None) lists the shards of a complete job, the
    folder must hold exactly those, unchanged: a shard missing, one not in the list (another
    job's, or left by hand) and one whose size or Parquet footer differs from what was
    committed are each a :class:`DataError` naming the file (see :func:`check_shard_list`).
    """
    fs, path = storage.filesystem(table_uri)
    if not fs.isdir(path):
        raise DataError("embedding directory not found; pass the folder written by `tpr-ray embed`", file=table_uri)
    sizes = {posixpath.basename(e["name"]): e.get("size") for e in fs.ls(path, detail=True)
             if is_data_file(posixpath.basename(e["name"]))}
    names = sorted(sizes)
    if not names:
        raise DataError("no *.parquet shards in this directory", file=table_uri)
    check_shard_list(read_sidecar(table_uri) if info is None else info, table_uri, sizes)
    return [storage.join(table_uri, name) for name in names]


def shard_record(data: bytes | memoryview) -> dict:
    """What the sidecar records of a shard file, from its bytes: ``bytes`` and ``footer``."""
    data = memoryview(data)
    return {"bytes": len(data), "footer": _footer_digest(bytes(data[-8:]), lambda n: bytes(data[-8 - n:-8]))}


def read_shard_record(uri: str) -> dict | None:
    """``rows``, ``bytes`` and ``footer`` of a shard file as it is now, reading only its
    footer; None when it is not readable Parquet."""
    fs, path = storage.filesystem(uri)
    with fs.open(path, "rb") as f:
        size = f.size
        if size < 12:
            return None
        f.seek(size - 8)
        tail = f.read(8)

        def footer(length: int) -> bytes:
            f.seek(size - 8 - length)
            return f.read(length)

        digest = _footer_digest(tail, footer, size)
        if digest is None:
            return None
        f.seek(0)
        try:
            rows = pq.ParquetFile(f).metadata.num_rows
        except Exception as err:
            if is_unreadable_parquet(err):
                return None
            raise
    return {"rows": rows, "bytes": size, "footer": digest}


def is_unreadable_parquet(error: BaseException) -> bool:
    """Whether pyarrow refused a file's bytes as Parquet (bad magic, footer or thrift data),
    rather than a fetch failing: pyarrow raises ArrowInvalid for some, OSError for others,
    and a failed fetch is an OSError too, told apart by pyarrow's wording."""
    if isinstance(error, pa.ArrowInvalid):
        return True
    text = str(error)
    return isinstance(error, OSError) and ("Parquet" in text or "thrift" in text or "Thrift" in text)


def _footer_digest(tail: bytes, read_footer, size: int | None = None) -> str | None:
    if len(tail) != 8 or tail[4:] != b"PAR1":
        return None
    length = int.from_bytes(tail[:4], "little")
    if size is not None and length + 12 > size:
        return None
    return hashlib.sha256(read_footer(length)).hexdigest()[:32]


def check_shard_list(info: dict, table_uri: str, sizes: dict[str, int | None]) -> None:
    """The shard files (``sizes``: name -> size in bytes) are the ones the sidecar's ``shards``
    list records: none missing, none extra, none replaced (other size, or other footer when
    the sidecar recorded one). Tables without that list (an incomplete job, another tool's
    table, an older version's) pass. Footers are read only where the sidecar records them."""
    listed = info.get("shards")
    if not isinstance(listed, list) or not info.get("complete", True):
        return
    # entries are {"file", "rows", "bytes", "footer", ...}; a bare name (another writer's table) is checked by name
    recorded = {}
    for number, entry in enumerate(listed):
        name = entry.get("file") if isinstance(entry, dict) else entry
        if not isinstance(name, str):
            raise DataError(f"entry {number} of the sidecar's shard list names no file ({entry!r:.80}); re-run the "
                            "embedding job into a new --out", file=sidecar_uri(table_uri), field="shards")
        recorded[name] = entry if isinstance(entry, dict) else {}
    missing = sorted(set(recorded) - set(sizes))
    if missing:
        raise DataError(f"shard {missing[0]} is in the sidecar's list but not in the folder "
                        f"({len(missing)} missing); re-run the embedding job into a new --out",
                        file=storage.join(table_uri, missing[0]))
    extra = sorted(set(sizes) - set(recorded))
    if extra:
        raise DataError(f"shard not in the sidecar's list of this table's {len(recorded)} shards (another job's, or "
                        f"copied in?); remove it, or re-run the embedding job into a new --out",
                        file=storage.join(table_uri, extra[0]))
    for name in sorted(recorded):
        entry, uri = recorded[name], storage.join(table_uri, name)
        if "bytes" in entry and sizes[name] is not None and sizes[name] != entry["bytes"]:
            raise DataError(f"shard was replaced after it was committed: {sizes[name]} bytes, the sidecar recorded "
                            f"{entry['bytes']}; re-run the embedding job into a new --out", file=uri)
        if "footer" in entry:
            now = read_shard_record(uri)
            if now is None:
                raise DataError("not a readable Parquet file; re-run the embedding job into a new --out", file=uri)
            if now["footer"] != entry["footer"] or now["rows"] != entry.get("rows", now["rows"]):
                raise DataError("shard was replaced after it was committed: its Parquet footer (row count, id and "
                                "provenance statistics) differs from the one the sidecar recorded; re-run the "
                                "embedding job into a new --out", file=uri)


def _read_parquet(uri: str, read):
    """``read(file)`` on a shard; a file that is not readable Parquet is a :class:`DataError`
    naming it (a fetch that fails is not: it says nothing about the file)."""
    fs, path = storage.filesystem(uri)
    with fs.open(path, "rb") as f:
        try:
            return read(f)
        except Exception as err:
            if not is_unreadable_parquet(err):
                raise
            reason = str(err).strip().splitlines()[0][:160] if str(err).strip() else type(err).__name__
            raise DataError(f"not a readable Parquet file ({reason}); re-run the embedding job that wrote it",
                            file=uri) from None


def check_kind(info: dict, expected: str, hint: str = "check the order of the gallery and queries arguments") -> None:
    """Raise :class:`TableKindError` unless the table (``info`` with ``kind`` and ``uri``) is ``expected``."""
    kind = info.get("kind")
    if kind is not None and kind != expected:
        raise TableKindError(f"{info.get('uri')} holds a {kind} table, expected {expected}; {hint}")


def check_complete(info: dict, table_uri: str, allow_incomplete: bool = False) -> None:
    """Refuse a table whose embedding job has not finished (``complete: false``) unless allowed.

    The message names the job, how many of its planned shards are committed, and the
    command that finishes it (re-running the embedding job resumes where it stopped). A
    table without a sidecar (written by another tool) carries no such claim and passes.
    """
    if info.get("complete", True) or allow_incomplete:
        return
    planned = info.get("num_shards", "?")
    fs, path = storage.filesystem(table_uri)
    done = sum(1 for p in fs.ls(path, detail=False) if shard_number(posixpath.basename(p)) is not None)
    raise DataError(f"incomplete {info.get('kind', 'embedding')} table: its embedding job stopped after "
                    f"{done} of {planned} shards; "
                    f"finish it with `{resume_command(info, table_uri)}` "
                    "(it resumes where it stopped), or pass --allow-incomplete (allow_incomplete=True) to use "
                    "the shards done", file=sidecar_uri(table_uri), field="complete")


def resume_command(info: dict, table_uri: str) -> str:
    """The `tpr-ray embed` command line that wrote (and so finishes) a table, from its sidecar."""
    table_uri = table_uri.rstrip("/")
    parent, name = posixpath.split(table_uri) if "://" in table_uri else os.path.split(table_uri)
    out = parent if name in KINDS else table_uri
    parts = ["tpr-ray embed", f"--checkpoint {info.get('checkpoint') or 'CHECKPOINT'}"]
    source = info.get("source") or "SOURCE"
    parts.append(f"--data {source} --split {info['split']}" if info.get("split") else f"--images {source}")
    parts.append(f"--out {out}")
    rows_per_shard = (info.get("settings") or {}).get("rows_per_shard")
    if rows_per_shard is not None:
        parts.append(f"--rows-per-shard {rows_per_shard}")
    return " ".join(parts)


def shard_row_counts(shard_uris: list[str]) -> list[int]:
    """The rows of each shard, from its Parquet footer (no data read)."""
    counts = []
    for uri in shard_uris:
        counts.append(_read_parquet(uri, lambda f: pq.ParquetFile(f).metadata.num_rows))
    return counts


def check_row_count(info: dict, shard_uris: list[str]) -> int:
    """The rows of a table's shards, from their Parquet footers; must match the sidecar's ``rows``."""
    total = sum(shard_row_counts(shard_uris))
    if "rows" in info and info["rows"] != total:
        raise DataError(f"sidecar says {info['rows']} rows but the shards hold {total}; "
                        "a shard is missing or extra, re-run the embedding job", file=sidecar_uri(info["uri"]),
                        field="rows")
    return total


def read_columns(shard_uri: str, columns: list[str], kind: str = "gallery") -> pa.Table:
    """Some columns of one shard; a missing one is a :class:`DataError` naming the file."""
    def read(f):
        schema = pq.read_schema(f)
        missing = [c for c in columns if c not in schema.names]
        if missing:
            raise DataError(f"missing column in a {kind} embedding table (has {schema.names})", file=shard_uri,
                            field=missing[0])
        f.seek(0)
        return pq.read_table(f, columns=columns)

    return _read_parquet(shard_uri, read)


def read_embeddings(uri: str, *, allow_incomplete: bool = False) -> tuple[pa.Table, dict]:
    """Read every shard under ``uri`` in name order, plus its sidecar.

    Returns the concatenated table, with ``embedding`` as ``fixed_size_list<float32>[dim]``
    (``list``/``large_list`` columns are converted), and an info dict: the sidecar's fields
    (``kind``, ``method``, ``model``, ``checkpoint``, ...) plus ``uri``, ``files``, ``rows``
    and ``dim``. Raises :class:`DataError` naming the file, row and column for a missing
    column, null, ragged or non-finite embeddings, or shards of different dims, and for a
    table whose embedding job has not finished unless ``allow_incomplete`` (see
    :func:`check_complete`).
    """
    info = read_sidecar(uri)
    shard_uris = list_shards(uri, info)
    names = [posixpath.basename(s) for s in shard_uris]
    check_complete(info, uri, allow_incomplete)
    kind = info.get("kind")
    if kind is not None and kind not in REQUIRED_COLUMNS:
        raise DataError(f"kind must be 'gallery' or 'queries', got {kind!r}", file=sidecar_uri(uri), field="kind")

    tables, dim = [], None
    for file_uri in shard_uris:
        table = _read_parquet(file_uri, pq.read_table)
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
                        "a shard is missing or extra, re-run the embedding job", file=sidecar_uri(uri), field="rows")
    if "dim" in info and info["dim"] != dim:
        raise DataError(f"sidecar says dim {info['dim']} but the shards hold {dim}", file=sidecar_uri(uri),
                        field="dim")
    if kind == "gallery":
        check_unique_ids(table.column("image_id"), names, [t.num_rows for t in tables], uri)
    info.update(kind=kind, uri=uri, files=names, rows=table.num_rows, dim=dim)
    return table, info


def check_unique_ids(ids: pa.ChunkedArray | pa.Array, shard_names: list[str], shard_rows: list[int],
                     table_uri: str) -> None:
    """A gallery's ``image_id`` values are unique: a :class:`DataError` naming one repeated id
    and the shards of its first two rows (ids answer a search; two images under one id make a
    hit ambiguous, and usually mean shards of two jobs mixed in one folder)."""
    if pc.count_distinct(ids, mode="all").as_py() == len(ids):
        return
    counts = pc.value_counts(ids)
    repeated = pc.filter(counts, pc.greater(counts.field("counts"), 1))[0]["values"]
    rows = np.flatnonzero(pc.equal(ids, repeated).to_numpy(zero_copy_only=False) if repeated.is_valid
                          else pc.is_null(ids).to_numpy(zero_copy_only=False))[:2]
    ends = np.cumsum(shard_rows)
    where = []
    for row in rows.tolist():
        shard = int(np.searchsorted(ends, row, side="right"))
        where.append(f"{shard_names[shard]} row {row - (int(ends[shard - 1]) if shard else 0)}")
    raise DataError(f"image_id {repeated.as_py()!r} appears more than once in the gallery ({' and '.join(where)}); "
                    "each image needs its own id: re-run the embedding job into a new --out, with unique ids in "
                    "its input", file=table_uri, field="image_id")


def read_table(uri: str, *, allow_incomplete: bool = False) -> pa.Table:
    """An embedding table (gallery or queries) as one Arrow table, checked as :func:`read_embeddings` does."""
    return read_embeddings(uri, allow_incomplete=allow_incomplete)[0]


# --------------------------------------------------------------------------- columns


def embedding_array(embeddings: np.ndarray) -> pa.FixedSizeListArray:
    """``[N, dim]`` floats as the ``embedding`` column the writer stores."""
    embeddings = np.ascontiguousarray(embeddings, dtype=np.float32)
    return pa.FixedSizeListArray.from_arrays(pa.array(embeddings.reshape(-1)), embeddings.shape[1])


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


def person_ids(table: pa.Table, info: dict, why: str = "") -> np.ndarray:
    """The ``person_id`` column as numpy; a null is a :class:`DataError` naming the row."""
    column = table.column("person_id")
    if column.null_count:
        row = int(np.flatnonzero(column.is_null().to_numpy(zero_copy_only=False))[0])
        raise DataError("person_id is null" + why, file=info["uri"], entry=row, field="person_id")
    return column.to_numpy()


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


def provenance_of_shards(shard_uris: list[str], info: dict) -> dict:
    """:func:`provenance` of a table given as shards, reading only the columns the sidecar does not answer."""
    wanted = [c for c in PROVENANCE if info.get(c) is None]
    present = _read_parquet(shard_uris[0], lambda f: pq.read_schema(f).names)
    columns = [c for c in wanted if c in present]
    table = pa.concat_tables([read_columns(s, columns) for s in shard_uris]) if columns else pa.table({})
    return provenance(table, info)


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


def write_parquet(uri: str, table: pa.Table) -> dict:
    """Write a table atomically. Dictionary encoding only where values repeat (the provenance
    columns): tried on unique ids and float embeddings it costs most of a commit's time
    (8x the rest of the write, measured) for nothing. The embedding column is stored without
    compression or min/max statistics: model features do not compress, nothing filters on
    them, and both cost encoding time (about 10 % of a shard's write, measured). Returns
    what the sidecar records of the file (:func:`shard_record`)."""
    buf = pa.BufferOutputStream()
    names = table.column_names
    pq.write_table(table, buf, use_dictionary=[c for c in PROVENANCE if c in names],
                   compression={c: "none" if c == "embedding" else "snappy" for c in names},
                   write_statistics=[c for c in names if c != "embedding"])
    data = memoryview(buf.getvalue())  # the encoded bytes, not a copy of them
    storage.write_bytes_atomic(uri, data)
    return shard_record(data)
