"""Committing an embedding job's shards exactly once, and finding them again on resume.

The driver gathers each shard's results as they come back from the pipeline and commits a
shard once all of its rows are in: its rejects file first (if any), then its Parquet file
(the commit point). The sidecar is written before the first shard (``complete: false``) and
once more when every shard is in (``complete: true``, with the list of shards). Every file is written atomically
(:func:`tpr_ray.io.storage.write_bytes_atomic`). On resume, :func:`committed_shards` cleans up
what an interrupted run left (temporary files, rejects of a shard that was never committed,
a committed shard that came back unreadable after a power loss) and lists the rest.
"""

from __future__ import annotations

import collections
import logging
import os
import posixpath
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from tpr_ray.io import storage
from tpr_ray.errors import ConfigError, DataError
from tpr_ray.tables import (
    COLUMN_TYPES,
    DATA_COLUMNS,
    PROVENANCE,
    SHARD_FORMAT,
    SIDECAR,
    embedding_array,
    rejects_dir,
    shard_number,
    write_parquet,
    write_sidecar,
)

log = logging.getLogger(__name__)



class _Pending:
    """One shard's results as they arrive, as the batches' slices; a row delivered twice (a
    retried task) counts once, and its last copy is the one kept."""

    def __init__(self, size: int):
        self.seen = np.zeros(size, dtype=bool)
        self.count = 0
        self.parts: list[tuple[np.ndarray, np.ndarray, np.ndarray | None, dict | None]] = []

    def put(self, positions: np.ndarray, embeddings: np.ndarray, reasons: np.ndarray | None,
            columns: dict | None) -> None:
        """``columns``: the input columns of these rows, Arrow arrays of the table's types."""
        low, high = int(positions.min()), int(positions.max()) + 1  # count what is new in the span they touch
        before = np.count_nonzero(self.seen[low:high])
        self.seen[positions] = True
        self.count += np.count_nonzero(self.seen[low:high]) - before
        self.parts.append((positions, embeddings, reasons, columns))

    def complete(self) -> bool:
        return self.count == len(self.seen)

    def gather(self) -> tuple[np.ndarray, np.ndarray, pa.Table | None]:
        """(embeddings, reasons, columns) in shard order, one row per position."""
        positions = np.concatenate([p[0] for p in self.parts])
        in_order = len(positions) == len(self.seen) and (positions == np.arange(len(positions))).all()
        last = None
        if not in_order:  # a retry or a reordering: pick each position's last copy
            last = np.empty(len(self.seen), dtype=np.int64)
            last[positions] = np.arange(len(positions))
        embeddings = np.concatenate([p[1] for p in self.parts])
        reasons = np.full(len(positions), "", dtype=object)
        offset = 0
        for part_positions, _, part_reasons, _ in self.parts:
            if part_reasons is not None:
                reasons[offset:offset + len(part_positions)] = part_reasons
            offset += len(part_positions)
        columns = None
        if self.parts[0][3] is not None:
            names = list(self.parts[0][3])
            columns = pa.table({c: pa.chunked_array([chunk for p in self.parts for chunk in _chunks(p[3][c])],
                                                    COLUMN_TYPES[c]) for c in names})
        if last is None:
            return embeddings, reasons, columns
        return embeddings[last], reasons[last], None if columns is None else columns.take(pa.array(last))


class ShardCommitter:
    """Driver side: gathers rows by shard and commits each shard once it is complete.

    The pipeline's batches carry the row number, the shard, the embedding, the reject reason
    and the shard's input columns (the workers read them from the shard plan), so the driver
    holds no listing: only the shards in flight and one small entry per committed shard. For
    callers that hold the inputs, ``rows`` (the whole input table) supplies the columns of
    batches that do not carry them. Rows are keyed by their global row number, so a row
    delivered twice (a retried task) is stored once. The shard file is the commit point: its
    rejects file is written first. The sidecar is written when the job starts and when it is
    complete, never per shard (that would be quadratic in the shards): which shards are done
    is what the folder holds (:func:`committed_shards`).
    """

    def __init__(self, out: str, kind: str, rows: pa.Table | None, plan: list[tuple[int, int]], header: dict,
                 committed: dict[int, dict], max_reject_rate: float = 1.0, guard=None):
        self.out, self.kind, self.rows, self.plan, self.header = out, kind, rows, plan, header
        self.guard = guard or (lambda: None)
        self.committed = dict(committed)
        self.pending: dict[int, _Pending] = {}
        self.tick = time.perf_counter()
        self.rows_done = 0
        self.started = False
        self._writer: ThreadPoolExecutor | None = None
        self._writes: collections.deque = collections.deque()
        self._failed = False
        self.num_inputs = plan[-1][1] if plan else 0
        self.rejected = sum(s["rejects"] for s in self.committed.values())
        # A budget on the whole job's inputs, not on the rows seen so far: crossing it means the
        # final rate is over the limit whatever the rest holds, so stopping early is never wrong.
        self.max_reject_rate = max_reject_rate
        self.max_rejects = int(max_reject_rate * self.num_inputs)
        self.check_reject_budget()

    def start(self) -> None:
        """Write the job's sidecar (``complete: false``) before the first shard, so that a kill
        right after the first shard file leaves an output the next run recognises as its own."""
        if not storage.exists(storage.join(self.out, SIDECAR)):
            self._write_manifest(complete=False)
        self.started = True

    # Writes run on threads of their own, overlapping the next shards' gathering and each other
    # (Parquet encoding, fsync and upload release the GIL): up to WRITERS at once, one per
    # driver core, and at most one more shard waiting for a thread. Each shard's write is a
    # whole commit of its own, so the order in which they land does not matter.
    WRITERS = max(1, min(8, os.cpu_count() or 1))

    def _submit(self, write) -> None:
        if self._writer is None:
            self._writer = ThreadPoolExecutor(self.WRITERS, thread_name_prefix="shard-writer")
        while len(self._writes) > self.WRITERS:
            self._writes.popleft().result()
        self._writes.append(self._writer.submit(self._write_unless_failed, write))

    def _write_unless_failed(self, write) -> None:
        if self._failed:  # as after a kill: nothing is written after a write that failed
            return
        try:
            write()
        except BaseException:
            self._failed = True
            raise

    def drain(self) -> None:
        """Wait for every shard handed to the writer; a failed write raises here."""
        while self._writes:
            self._writes.popleft().result()

    def settle(self) -> None:
        """Let the writes in flight end (they are whole commits) when the job stops for another reason."""
        while self._writes:
            try:
                self._writes.popleft().result()
            except BaseException as exc:  # noqa: BLE001 - the error that stopped the job is the one to report
                log.debug("%s: a shard write failed while the job was stopping: %r", self.out, exc)

    def check_reject_budget(self) -> None:
        if self.rejected > self.max_rejects:
            self.settle()
            raise DataError(f"{self.kind}: {self.rejected} of {self.num_inputs} inputs were rejected as unreadable, "
                            f"over --max-reject-rate {self.max_reject_rate:g}; the job stopped. See the reasons in "
                            f"{rejects_dir(self.out)}/; if they are expected, re-run with a higher --max-reject-rate "
                            f"to continue", file=self.out)

    def add(self, batch: dict) -> None:
        """Take one batch of results: ``row``, ``shard``, ``embedding``, optional ``reject_reason``,
        and the table's input columns (unless ``rows`` was given)."""
        try:
            self._add(batch)
        except BaseException:
            self.settle()
            raise

    def _add(self, batch) -> None:
        if isinstance(batch, pa.Table):  # Arrow from the pipeline: the input columns stay Arrow
            batch = {name: batch.column(name) for name in batch.column_names}
        rows = _numpy(batch["row"]).astype(np.int64, copy=False)
        shards = _numpy(batch["shard"]).astype(np.int64, copy=False)
        embeddings = _numpy(batch["embedding"]).astype(np.float32, copy=False)
        reasons = batch.get("reject_reason")
        reasons = None if reasons is None else _numpy(reasons).astype(object, copy=False)
        carried = all(c in batch for c in DATA_COLUMNS[self.kind])
        if not carried and self.rows is None:
            missing = [c for c in DATA_COLUMNS[self.kind] if c not in batch]
            raise ValueError(f"a result batch lacks the input columns {missing}")
        if not len(shards):
            return
        if (shards == shards[0]).all():
            picks = [slice(0, len(shards))]  # the usual batch: rows of one shard
        else:  # one index array per shard, whatever the batch mixes
            order = np.argsort(shards, kind="stable")
            picks = np.split(order, np.flatnonzero(np.diff(shards[order])) + 1)
        for pick in picks:
            shard = int(shards[pick.start if isinstance(pick, slice) else pick[0]])
            if shard in self.committed:
                continue
            columns = None
            if carried:
                columns = {c: _column(batch[c], pick, COLUMN_TYPES[c]) for c in DATA_COLUMNS[self.kind]}
            pending = self.pending.get(shard)
            if pending is None:
                pending = self.pending[shard] = _Pending(self._size(shard))
            pending.put(rows[pick] - self.plan[shard][0], embeddings[pick],
                        None if reasons is None else reasons[pick], columns)
            if pending.complete():
                self._commit(shard, self.pending.pop(shard))

    def _size(self, shard: int) -> int:
        start, stop = self.plan[shard]
        return stop - start

    def _commit(self, shard: int, results: _Pending) -> None:
        start = self.plan[shard][0]
        embeddings, reasons, columns = results.gather()
        if columns is None:
            columns = self.rows.slice(start, len(reasons)).select(DATA_COLUMNS[self.kind])
        ok = reasons == ""
        kept, rejected = np.flatnonzero(ok), np.flatnonzero(~ok)
        name = SHARD_FORMAT.format(shard)
        self._check_finite(name, columns, kept, embeddings[kept])
        self.guard()
        if not self.started:
            self.start()
        rejects = None
        if len(rejected):
            bad = columns.take(pa.array(rejected))
            rejects = pa.table({"image_id": bad.column("image_id"), "image_uri": bad.column("image_uri"),
                                "reason": pa.array([str(r) for r in reasons[rejected]], pa.string())})
        kept_columns = columns if not len(rejected) else columns.take(pa.array(kept))
        table = self._table(kept_columns, embeddings[kept])

        def write():  # the rejects first: the shard file is the commit point
            if rejects is not None:
                write_parquet(storage.join(rejects_dir(self.out), name), rejects)
            write_parquet(storage.join(self.out, name), table)

        self._submit(write)
        self.committed[shard] = {"file": name, "rows": len(kept), "rejects": len(rejected)}
        self.rows_done += len(ok)
        self.rejected += len(rejected)
        rate = self.rows_done / max(time.perf_counter() - self.tick, 1e-9)
        log.info("%s: committed %s (%d rows, %d rejects); %d/%d shards, %.1f rows/s", self.kind, name, len(kept),
                 len(rejected), len(self.committed), len(self.plan), rate)
        self.check_reject_budget()

    def _check_finite(self, name: str, columns: pa.Table, kept: np.ndarray, embeddings: np.ndarray) -> None:
        """NaN or inf features (bf16 overflow, a broken checkpoint) stop the job before the commit:
        they are the model's fault, not the input's, and a committed shard is never redone."""
        bad = kept[~np.isfinite(embeddings).all(axis=1)]
        if len(bad):
            key = "query_id" if self.kind == "queries" else "image_id"
            ids = columns.column(key).take(pa.array(bad[:5])).to_pylist()
            raise DataError(f"{self.kind}: the model gave non-finite embeddings for {len(bad)} row(s) of shard {name} "
                            f"(first {key}s: {ids}); nothing of that shard was committed. Check the checkpoint "
                            f"(and bf16 overflow on GPU)", file=self.header["checkpoint"])

    def _table(self, columns: pa.Table, embeddings: np.ndarray) -> pa.Table:
        table = {c: columns.column(c) for c in DATA_COLUMNS[self.kind]}
        table["embedding"] = embedding_array(embeddings.reshape(-1, self.header["dim"]))
        for key in PROVENANCE:
            table[key] = pa.repeat(pa.scalar(self.header[key], pa.string()), columns.num_rows)
        return pa.table(table)

    def _write_manifest(self, complete: bool) -> dict:
        info = {**self.header, "kind": self.kind, "complete": complete, "num_shards": len(self.plan)}
        if complete:  # the shard list once, at the end; while running, the folder is the record
            shards = [self.committed[s] for s in sorted(self.committed)]
            info.update(rows=sum(s["rows"] for s in shards), rejected=sum(s["rejects"] for s in shards),
                        shards=shards)
        write_sidecar(self.out, info)
        return info

    def finish(self) -> dict:
        if len(self.committed) != len(self.plan):
            missing = sorted(set(range(len(self.plan))) - set(self.committed))
            raise DataError(f"{self.kind}: {len(missing)} shard(s) never completed (first: {missing[:5]})", file=self.out)
        self.drain()
        if self._writer is not None:
            self._writer.shutdown()
        self.guard()
        return self._write_manifest(complete=True)


def _chunks(values: pa.Array | pa.ChunkedArray) -> list[pa.Array]:
    return values.chunks if isinstance(values, pa.ChunkedArray) else [values]


def _numpy(values) -> np.ndarray:
    """A result column as numpy, whether Ray handed it over as numpy or as Arrow (where an
    embedding is a tensor extension array)."""
    if isinstance(values, pa.ChunkedArray):
        if values.num_chunks == 1:
            return _numpy(values.chunk(0))
        return np.concatenate([_numpy(c) for c in values.chunks]) if values.num_chunks else np.array([])
    if isinstance(values, pa.Array):
        if isinstance(values, pa.ExtensionArray):
            return values.to_numpy()
        if pa.types.is_list(values.type) or pa.types.is_fixed_size_list(values.type):  # [n, dim]
            return values.flatten().to_numpy(zero_copy_only=False).reshape(len(values), -1)
        return values.to_numpy(zero_copy_only=False)
    return np.asarray(values)


def _column(values, pick: slice | np.ndarray, kind: pa.DataType) -> pa.Array | pa.ChunkedArray:
    """Rows ``pick`` (a slice, or sorted row indices) of one carried input column (numpy or
    Arrow), as Arrow of the table's type.

    Ray Data hands an int64 column with nulls to numpy as float64 with NaN; ``from_pandas``
    turns the NaN back into nulls.
    """
    if isinstance(pick, np.ndarray) and len(pick) and pick[-1] - pick[0] + 1 == len(pick):
        pick = slice(int(pick[0]), int(pick[-1]) + 1)  # contiguous: a zero-copy slice
    if isinstance(values, (pa.Array, pa.ChunkedArray)):
        if isinstance(pick, slice):
            values = values.slice(pick.start, pick.stop - pick.start)
        else:
            values = values.take(pa.array(pick))
        if values.type == kind:
            return values
        if pa.types.is_floating(values.type) and not pa.types.is_floating(kind):
            values = pc.if_else(pc.is_nan(values), pa.scalar(None, values.type), values)
        return values.cast(kind)
    return pa.array(values[pick], type=kind, from_pandas=True)


def committed_shards(out: str, plan: list[tuple[int, int]], fingerprint: str) -> dict[int, dict]:
    """Shards already committed by an earlier run of the same job (found by listing ``out``)."""
    sidecar = storage.join(out, SIDECAR)
    if storage.exists(sidecar):
        previous = storage.read_json(sidecar)
        if previous.get("fingerprint") != fingerprint:
            raise ConfigError(f"{out} holds the output of a different embedding job (other input, checkpoint or "
                              f"settings); choose another --out or delete it")
    fs, path = storage.filesystem(out)
    if not fs.exists(path):
        return {}
    # Only this job's driver writes here, so any temporary file is from an interrupted run.
    removed = storage.remove_temporaries(out) + storage.remove_temporaries(rejects_dir(out))
    if removed:
        log.info("%s: removed %d temporary file(s) left by an interrupted run", out, removed)
    done = {}
    for entry in fs.ls(path, detail=False):
        name = posixpath.basename(entry)
        shard = shard_number(name)
        if shard is None:
            continue
        if shard >= len(plan):
            raise DataError("shard number beyond the job's plan", file=storage.join(out, name))
        rows = _parquet_rows(storage.join(out, name))
        rejects_uri = storage.join(rejects_dir(out), name)
        rejects = _parquet_rows(rejects_uri) if storage.exists(rejects_uri) else 0
        if rows is None or rejects is None:
            # What a power loss can leave of a local write that was not yet on disk; the
            # shard's inputs are all still there, so it is simply done again.
            log.warning("%s: committed shard %s (or its rejects) is unreadable; removing it to redo it", out, name)
            for uri in (storage.join(out, name), rejects_uri):
                if storage.exists(uri):
                    storage.remove(uri)
            continue
        start, stop = plan[shard]
        if rows + rejects != stop - start:
            raise DataError(f"committed shard has {rows} rows + {rejects} rejects, the plan says {stop - start}",
                            file=storage.join(out, name))
        done[shard] = {"file": name, "rows": rows, "rejects": rejects}
    _remove_orphan_rejects(out, done)
    if done and not storage.exists(sidecar):
        raise ConfigError(f"{out} has shards but no {SIDECAR}; it was not written by this job")
    return done


def _parquet_rows(uri: str) -> int | None:
    """Rows of a Parquet file from its footer; None when it is not readable Parquet (a fetch
    that fails is an error, not "unreadable": it says nothing about the file)."""
    fs, path = storage.filesystem(uri)
    with fs.open(path, "rb") as f:
        try:
            return pq.ParquetFile(f).metadata.num_rows
        except pa.ArrowInvalid:
            return None


def _remove_orphan_rejects(out: str, done: dict[int, dict]) -> None:
    """A shard's rejects file is written just before its shard file (the commit point): one
    without its shard is left by a run killed in between, and is not this run's to count."""
    fs, path = storage.filesystem(rejects_dir(out))
    if not fs.exists(path):
        return
    committed = {entry["file"] for entry in done.values()}
    for entry in fs.ls(path, detail=False):
        name = posixpath.basename(entry)
        if shard_number(name) is not None and name not in committed:
            log.info("%s: removing the rejects of uncommitted shard %s", out, name)
            storage.remove(storage.join(rejects_dir(out), name))


def open_job(out: str, kind: str, rows: pa.Table | None, plan: list[tuple[int, int]], header: dict,
             max_reject_rate: float = 1.0, guard=None) -> ShardCommitter:
    """Clean up after an interrupted run, find what is committed, and record the job (sidecar
    with ``complete: false``) before any shard is written. ``guard`` (the lease's check) is
    called before every write."""
    if guard is not None:
        guard()
    done = committed_shards(out, plan, header["fingerprint"])
    committer = ShardCommitter(out, kind, rows, plan, header, done, max_reject_rate=max_reject_rate, guard=guard)
    committer.start()
    return committer
