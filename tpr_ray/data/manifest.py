"""The canonical manifest: one Parquet table, one row per image, whatever the source format.

Every job downstream (training, embedding, evaluation) reads this table instead of the
three dataset JSON formats, so format quirks are handled once, in `formats.py`.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Sequence

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from tpr_ray.io import storage
from tpr_ray.data.uris import allowed_prefixes, check_image_uris, env_prefixes
from tpr_ray.errors import ConfigError, DataError

SPLITS = ("train", "val", "test")
METADATA_KEY = b"tpr_ray"

MANIFEST_SCHEMA = pa.schema(
    [
        ("image_id", pa.string()),
        ("person_id", pa.int64()),
        ("split", pa.string()),
        ("image_uri", pa.string()),
        ("captions", pa.list_(pa.string())),
        ("dataset", pa.string()),
    ]
)


def build_manifest(columns: dict, info: dict) -> pa.Table:
    """A manifest table from column lists, with `info` stored as the schema metadata JSON."""
    table = pa.table(columns, schema=MANIFEST_SCHEMA)
    return with_info(table, info)


def with_info(table: pa.Table, info: dict) -> pa.Table:
    """`table` with its `tpr_ray` metadata replaced by `info` (other metadata keys are kept)."""
    metadata = dict(table.schema.metadata or {})
    metadata[METADATA_KEY] = json.dumps(info, sort_keys=True).encode()
    return table.replace_schema_metadata(metadata)


def manifest_info(table: pa.Table) -> dict:
    """The manifest's `tpr_ray` metadata ({dataset, source, version, rejected}); {} when absent."""
    raw = (table.schema.metadata or {}).get(METADATA_KEY)
    return json.loads(raw) if raw else {}


def file_version(data: bytes) -> str:
    """Short content hash of an annotation file: two manifests agree iff their sources did."""
    return hashlib.sha256(data).hexdigest()[:16]


# ---------------------------------------------------------------------------------------
# Reading and writing


def write_manifest(table: pa.Table, uri: str) -> None:
    """Validate `table` against MANIFEST_SCHEMA and write it as Parquet to a path or URI.

    The write is atomic (temporary name, then move) so a crashed job never leaves a
    half-written manifest behind for the next job to trip over.
    """
    table = conform(table, source="<table to write>")
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    storage.write_bytes_atomic(uri, buffer.getvalue())


def read_manifest(uri: str, *, allow_uri_prefixes: Sequence[str] | None = None) -> pa.Table:
    """Read a manifest Parquet file and check that it is one (columns, types, values), and
    that its image URIs stay where its dataset is (see :mod:`tpr_ray.data.uris`).

    ``allow_uri_prefixes``: more places its images may be; None reads ``TPR_RAY_ALLOW_URI_PREFIX``.
    """
    try:
        table = pq.read_table(io.BytesIO(storage.read_bytes(uri)))
    except FileNotFoundError:
        raise DataError("manifest not found", file=uri) from None
    except pa.ArrowInvalid as err:
        raise DataError(f"not a readable Parquet file ({err})", file=uri) from None
    table = conform(table, source=uri)
    extra = env_prefixes() if allow_uri_prefixes is None else allow_uri_prefixes
    check_image_uris(table.column("image_uri").to_pylist(), allowed_prefixes(manifest_info(table), extra), uri)
    return table


def conform(table: pa.Table, *, source: str) -> pa.Table:
    """Check columns, types and values; return the table with the canonical columns first.

    Equivalent Arrow types (large_string, int32, large_list) are cast, since other tools
    write them; anything else (a string person_id, say) is an error naming the column.
    """
    columns = {}
    for field in MANIFEST_SCHEMA:
        if field.name not in table.column_names:
            raise DataError(
                f"missing column; a manifest needs {MANIFEST_SCHEMA.names}", file=source, field=field.name
            )
        column = table.column(field.name)
        if not _same_kind(column.type, field.type):
            raise DataError(f"column has type {column.type}, expected {field.type}", file=source, field=field.name)
        if column.null_count:
            raise DataError(f"{column.null_count} null values; every row needs one", file=source, field=field.name)
        columns[field.name] = column.cast(field.type)
    extras = [name for name in table.column_names if name not in columns]
    for name in extras:
        columns[name] = table.column(name)
    result = pa.table(columns).replace_schema_metadata(table.schema.metadata)
    _check_values(result, source)
    return result


def _same_kind(actual: pa.DataType, expected: pa.DataType) -> bool:
    if pa.types.is_string(expected):
        return pa.types.is_string(actual) or pa.types.is_large_string(actual)
    if pa.types.is_integer(expected):
        return pa.types.is_integer(actual)
    if pa.types.is_list(expected):
        is_list = pa.types.is_list(actual) or pa.types.is_large_list(actual)
        return is_list and _same_kind(actual.value_type, expected.value_type)
    return actual == expected


def _check_values(table: pa.Table, source: str) -> None:
    bad_split = pc.invert(pc.is_in(table.column("split"), pa.array(SPLITS)))
    if pc.any(bad_split).as_py():
        row = pc.index(bad_split, True).as_py()
        value = table.column("split")[row].as_py()
        raise DataError(f"split {value!r} is not one of {SPLITS}", file=source, entry=row, field="split")
    if pc.count_distinct(table.column("image_id")).as_py() != table.num_rows:
        counts = pc.value_counts(table.column("image_id"))
        duplicate = next(item["values"] for item in counts.to_pylist() if item["counts"] > 1)
        raise DataError(f"image_id {duplicate!r} appears more than once", file=source, field="image_id")


# ---------------------------------------------------------------------------------------
# Summaries and splits


def split_stats(table: pa.Table) -> dict:
    """{split: {"ids", "images", "captions"}} for the splits present, in train/val/test order."""
    stats = {}
    for split in SPLITS:
        rows = table.filter(pc.equal(table.column("split"), split))
        if rows.num_rows == 0:
            continue
        stats[split] = {
            "ids": pc.count_distinct(rows.column("person_id")).as_py(),
            "images": rows.num_rows,
            "captions": pc.sum(pc.list_value_length(rows.column("captions"))).as_py(),
        }
    return stats


def selection_split(table: pa.Table, holdout_fraction: float = 0.05, seed: int = 0) -> tuple[pa.Table, pa.Table]:
    """(train, val) for model selection; the test rows are never looked at.

    Uses the manifest's own val rows when it has any. Otherwise (ICFG-PEDES) it holds out
    whole identities from train so no person is on both sides. Identities are ranked by a
    hash of (seed, person_id), which keeps the choice stable across runs, machines and
    library versions, and keeps an identity held out when others are added or removed.
    """
    if not 0.0 < holdout_fraction < 1.0:
        raise ConfigError(f"holdout_fraction must be between 0 and 1, got {holdout_fraction}")
    split = table.column("split")
    train = table.filter(pc.equal(split, "train"))
    val = table.filter(pc.equal(split, "val"))
    if val.num_rows:
        return train, val
    ids = pc.unique(train.column("person_id")).to_pylist()
    if len(ids) < 2:
        raise DataError(
            f"cannot hold out identities for validation: train has {len(ids)} identity and there is no val split",
            file=manifest_info(table).get("source"),
        )
    n_held = min(len(ids) - 1, max(1, round(holdout_fraction * len(ids))))
    held = sorted(ids, key=lambda pid: _rank(seed, pid))[:n_held]
    is_held = pc.is_in(train.column("person_id"), pa.array(held, pa.int64()))
    return train.filter(pc.invert(is_held)), train.filter(is_held)


def _rank(seed: int, person_id: int) -> bytes:
    return hashlib.sha256(f"{seed}:{person_id}".encode()).digest()
