"""The shard plan of an embedding job: the input in a fixed order, cut into shards.

The same input and settings always give the same plan, identified by its :class:`Fingerprint`
(computed from the listing's Arrow buffers as it streams past). The input columns of each
shard still to do are written to ``<table>-plan/part-N.parquet`` (:func:`write_plan`), for the
workers to read by shard id (:func:`read_plan`): the driver hands out shard ids, not rows.
This module needs no torch, so the tasks that read the plan stay light.
"""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from tpr_ray.io import storage
from tpr_ray.errors import ConfigError, DataError
from tpr_ray.tables import plan_dir, shard_name, write_parquet


def plan_shards(num_rows: int, rows_per_shard: int) -> list[tuple[int, int]]:
    """[start, stop) row ranges of each shard; the last one may be shorter."""
    if rows_per_shard < 1:
        raise ConfigError(f"rows_per_shard must be positive, got {rows_per_shard}")
    return [(start, min(start + rows_per_shard, num_rows)) for start in range(0, num_rows, rows_per_shard)]


class Fingerprint:
    """Identifies a job: every input column that ends up in the table, in order, and every
    setting that changes the output. Fed the listing batch by batch (:meth:`update`), so it
    never needs the whole listing in memory; how the listing is cut into batches or chunks,
    and Arrow's offset width, do not change it.

    Computed from the Arrow buffers, per column: its name, type, row count and validity, then
    for strings every value's length followed (in a separate stream) by all their bytes, so
    that no two inputs can join into the same stream; for numbers their values.
    """

    def __init__(self, names: list[str], settings: dict):
        self.names, self.settings, self.rows = list(names), settings, 0
        self.kinds: dict[str, str] = {}
        self.streams = {name: [hashlib.sha256() for _ in range(3)] for name in self.names}  # validity, lengths, data

    def update(self, batch: pa.Table | pa.RecordBatch) -> Fingerprint:
        for name in self.names:
            column = batch.column(name)
            for array in column.chunks if isinstance(column, pa.ChunkedArray) else [column]:
                self._update_array(name, array)
        self.rows += batch.num_rows
        return self

    def _update_array(self, name: str, array: pa.Array) -> None:
        validity, lengths, data = self.streams[name]
        kind = array.type
        wide = pa.types.is_large_string(kind) or pa.types.is_large_binary(kind)
        texts = wide or pa.types.is_string(kind) or pa.types.is_binary(kind)
        if texts:  # the offsets' width is Arrow's choice, not the data's
            kind = "string" if pa.types.is_string(kind) or pa.types.is_large_string(kind) else "binary"
        if self.kinds.setdefault(name, str(kind)) != str(kind):
            raise DataError(f"the listing's column changes type from {self.kinds[name]} to {kind}", field=name)
        if not len(array):
            return
        validity.update(array.is_valid().to_numpy(zero_copy_only=False).tobytes())
        if texts:
            offsets_buffer, data_buffer = array.buffers()[1:3]
            offsets = np.frombuffer(offsets_buffer, np.int64 if wide else np.int32)
            offsets = offsets[array.offset:array.offset + len(array) + 1].astype(np.int64)
            lengths.update(np.diff(offsets).tobytes())  # the same lengths whatever the offset width
            if data_buffer is not None:
                data.update(memoryview(data_buffer)[offsets[0]:offsets[-1]])
        else:
            data.update(pc.fill_null(array, 0).to_numpy(zero_copy_only=False).tobytes())

    def hexdigest(self) -> str:
        h = hashlib.sha256(json.dumps(self.settings, sort_keys=True).encode())
        for name in self.names:
            h.update(f"\n{name}:{self.kinds.get(name)}:{self.rows}\n".encode())
            for stream in self.streams[name]:
                h.update(stream.digest())
        return h.hexdigest()[:32]


def plan_fingerprint(columns: pa.Table, settings: dict) -> str:
    """The :class:`Fingerprint` of a listing held in memory."""
    return Fingerprint(columns.column_names, settings).update(columns).hexdigest()


def shard_tables(batches, rows_per_shard: int):
    """Cut a stream of record batches into the shard plan's pieces: (shard, table) in order,
    holding at most one shard's rows at a time."""
    buffer, buffered, shard = [], 0, 0
    for batch in batches:
        while batch.num_rows:
            take = min(rows_per_shard - buffered, batch.num_rows)
            buffer.append(batch.slice(0, take))
            buffered += take
            batch = batch.slice(take)
            if buffered == rows_per_shard:
                yield shard, pa.Table.from_batches(buffer)
                shard, buffer, buffered = shard + 1, [], 0
    if buffered:
        yield shard, pa.Table.from_batches(buffer)


def write_plan(plan_uri: str, batches, columns: list[str], rows_per_shard: int, pending: set[int]) -> None:
    """Write the input columns of every pending shard to ``plan_uri/part-N.parquet`` (with each
    row's number and shard), for the workers to read: the driver passes shard ids, not rows."""
    for shard, table in shard_tables(batches, rows_per_shard):
        if shard not in pending:
            continue
        first = shard * rows_per_shard
        table = table.select(columns)
        table = table.append_column("row", pa.array(np.arange(first, first + table.num_rows, dtype=np.int64)))
        table = table.append_column("shard", pa.repeat(pa.scalar(shard, pa.int64()), table.num_rows))
        write_parquet(storage.join(plan_uri, shard_name(shard)), table)


def read_plan(batch: dict, plan_uri: str, block_rows: int):
    """Worker side: the rows of the planned shards named in ``batch["shard"]``, in blocks."""
    import pyarrow.parquet as pq

    for shard in batch["shard"]:
        fs, path = storage.filesystem(storage.join(plan_uri, shard_name(int(shard))))
        with fs.open(path, "rb") as f:
            table = pq.read_table(f)
        for start in range(0, table.num_rows, block_rows):
            yield table.slice(start, block_rows)


def remove_plan(out: str) -> None:
    """Drop a complete job's plan files (they are only needed to finish it)."""
    fs, path = storage.filesystem(plan_dir(out))
    if fs.exists(path):
        fs.rm(path, recursive=True)
