"""Bulk embedding with Ray Data: sharded, exactly-once, resumable.

The input (a manifest split, or every image under a prefix/glob) is put in a fixed order
and cut into shards of ``rows_per_shard`` rows: the *shard plan*, the same for the same
input and settings. Pending shards stream through

    read + decode + resize (CPU tasks) -> the model (actor pool, a GPU each, bf16) -> driver

and the driver commits a shard once all of its rows have come back: its Parquet file is
written under a temporary name and then moved into place, and the job manifest
``_tpr_ray.json`` is rewritten to list it. Committed shards are never redone, so re-running
an interrupted or finished job only does what is missing, and every readable input row ends
up in exactly one committed shard. Images that cannot be read are recorded per shard in
``<out>/gallery-rejects/`` (beside the table, so readers of the table never pick them up)
with the reason, and counted.

The tables (``<out>/gallery`` and ``<out>/queries``), their sidecar and shard names are
described in :mod:`tpr_ray.tables`, which this module writes through.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import posixpath
import time
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from tpr_ray import storage
from tpr_ray.checkpoint import read_config, resolve_checkpoint
from tpr_ray.errors import ConfigError, DataError
from tpr_ray.gallery import gallery_rows, manifest_split, query_rows
from tpr_ray.images import decode_batch
from tpr_ray.tables import SIDECAR, SHARD_FORMAT, embedding_array, rejects_dir, shard_number, write_sidecar

log = logging.getLogger(__name__)



@dataclass
class EmbedConfig:
    checkpoint: str
    out: str
    data: str | None = None  # dataset root or manifest (then `split` applies) ...
    images: str | None = None  # ... or a prefix / glob of image files
    split: str = "test"
    batch_size: int | None = None  # None: 256 per GPU actor, 64 on CPU
    actors: int = 1
    gpus_per_actor: float | None = None  # None: 1 when the cluster has GPUs, else 0
    cpus_per_actor: float = 0.5  # fractional, so decode tasks still get CPUs on small nodes
    decode_cpus: float = 0.5
    # Logical memory reserved per decode task (a batch of decoded source images plus the
    # resized uint8 output), per the Ray Data advice to declare memory for heavy stages. It
    # also keeps decoding a stage of its own: Ray Data fuses maps whose resources are equal.
    decode_memory: int = 512 * 1024 * 1024
    rows_per_shard: int = 10_000
    block_rows: int = 256
    queries: bool = True


# --- pure pieces ---------------------------------------------------------------

def plan_shards(num_rows: int, rows_per_shard: int) -> list[tuple[int, int]]:
    """[start, stop) row ranges of each shard; the last one may be shorter."""
    if rows_per_shard < 1:
        raise ConfigError(f"rows_per_shard must be positive, got {rows_per_shard}")
    return [(start, min(start + rows_per_shard, num_rows)) for start in range(0, num_rows, rows_per_shard)]


def plan_fingerprint(keys: list[str], settings: dict) -> str:
    """Identifies a job: the ordered input and every setting that changes the output."""
    h = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    for key in keys:
        h.update(key.encode())
        h.update(b"\n")
    return h.hexdigest()[:32]


class Embedder:
    """Actor: loads the checkpoint once, then embeds batches of pixels or captions."""

    def __init__(self, checkpoint: str, kind: str):
        import torch

        from tpr_ray.checkpoint import load_method

        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.method, _ = load_method(checkpoint, map_location="cpu")
        self.method.to(self.device)
        self.kind = kind

    def __call__(self, batch: dict) -> dict:
        from tpr_ray.inference import encode_captions, encode_images

        out = {k: v for k, v in batch.items() if k != "pixels"}
        if self.kind == "queries":
            out["embedding"] = encode_captions(self.method, list(batch["caption"]), self.device)
            return out
        ok = np.array([not r for r in batch["reject_reason"]], dtype=bool)
        embedding = np.full((len(ok), self.method.embed_dim), np.nan, dtype=np.float32)
        if ok.any():
            embedding[ok] = encode_images(self.method, batch["pixels"][ok], self.device)
        out["embedding"] = embedding
        return out


# --- committing shards -------------------------------------------------------------

class ShardCommitter:
    """Driver side: gathers rows by shard and commits each shard once it is complete.

    Only row numbers, embeddings and reject reasons travel through the pipeline; the other
    columns are taken from the input table here. Rows are keyed by their global row number,
    so a row delivered twice (a retried task) is stored once. The shard file is the commit
    point: its rejects file is written first, the job manifest after.
    """

    def __init__(self, out: str, kind: str, rows: pa.Table, plan: list[tuple[int, int]], header: dict,
                 committed: dict[int, dict]):
        self.out, self.kind, self.rows, self.plan, self.header = out, kind, rows, plan, header
        self.committed = dict(committed)
        self.pending: dict[int, dict[int, dict]] = {}
        self.tick = time.perf_counter()
        self.rows_done = 0

    def add(self, batch: dict) -> None:
        reasons = batch.get("reject_reason")
        for i, (row, shard) in enumerate(zip(batch["row"], batch["shard"])):
            if int(shard) in self.committed:
                continue
            reason = reasons[i] if reasons is not None else ""
            self.pending.setdefault(int(shard), {})[int(row)] = (batch["embedding"][i], reason)
        for shard in [s for s, rows in self.pending.items() if len(rows) == self._size(s)]:
            self._commit(shard, self.pending.pop(shard))

    def _size(self, shard: int) -> int:
        start, stop = self.plan[shard]
        return stop - start

    def _commit(self, shard: int, results: dict[int, tuple]) -> None:
        order = sorted(results)
        kept = [r for r in order if not results[r][1]]
        rejected = [r for r in order if results[r][1]]
        name = SHARD_FORMAT.format(shard)
        if rejected:
            bad = self.rows.take(pa.array(rejected, pa.int64()))
            _write_parquet(storage.join(rejects_dir(self.out), name), pa.table({
                "image_id": bad.column("image_id"), "image_uri": bad.column("image_uri"),
                "reason": pa.array([str(results[r][1]) for r in rejected], pa.string())}))
        _write_parquet(storage.join(self.out, name), self._table(kept, [results[r][0] for r in kept]))
        self.committed[shard] = {"file": name, "rows": len(kept), "rejects": len(rejected)}
        self.rows_done += len(order)
        self._write_manifest(complete=False)
        rate = self.rows_done / max(time.perf_counter() - self.tick, 1e-9)
        log.info("%s: committed %s (%d rows, %d rejects); %d/%d shards, %.1f rows/s", self.kind, name, len(kept),
                 len(rejected), len(self.committed), len(self.plan), rate)

    def _table(self, row_numbers: list[int], embeddings: list[np.ndarray]) -> pa.Table:
        dim = self.header["dim"]
        data_columns = ["query_id", "image_id", "person_id", "caption"] if self.kind == "queries" \
            else ["image_id", "person_id", "image_uri"]
        source = self.rows.take(pa.array(row_numbers, pa.int64()))
        table = {c: source.column(c) for c in data_columns}
        emb = np.stack(embeddings) if embeddings else np.zeros((0, dim), np.float32)
        table["embedding"] = embedding_array(emb.reshape(-1, dim))
        for key in ("method", "model", "checkpoint"):
            table[key] = pa.array([self.header[key]] * len(row_numbers), pa.string())
        return pa.table(table)

    def _write_manifest(self, complete: bool) -> dict:
        shards = [self.committed[s] for s in sorted(self.committed)]
        info = {**self.header, "kind": self.kind, "complete": complete, "num_shards": len(self.plan),
                "rows": sum(s["rows"] for s in shards), "rejected": sum(s["rejects"] for s in shards),
                "shards": shards}
        write_sidecar(self.out, info)
        return info

    def finish(self) -> dict:
        if len(self.committed) != len(self.plan):
            missing = sorted(set(range(len(self.plan))) - set(self.committed))
            raise DataError(f"{self.kind}: {len(missing)} shard(s) never completed (first: {missing[:5]})", file=self.out)
        return self._write_manifest(complete=True)


def _write_parquet(uri: str, table: pa.Table) -> None:
    buf = io.BytesIO()
    pq.write_table(table, buf)
    storage.write_bytes_atomic(uri, buf.getvalue())


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
        with fs.open(entry, "rb") as f:
            rows = pq.ParquetFile(f).metadata.num_rows
        rejects_uri = storage.join(rejects_dir(out), name)
        rejects = 0
        if storage.exists(rejects_uri):
            fs_r, p_r = storage.filesystem(rejects_uri)
            with fs_r.open(p_r, "rb") as f:
                rejects = pq.ParquetFile(f).metadata.num_rows
        start, stop = plan[shard]
        if rows + rejects != stop - start:
            raise DataError(f"committed shard has {rows} rows + {rejects} rejects, the plan says {stop - start}",
                            file=storage.join(out, name))
        done[shard] = {"file": name, "rows": rows, "rejects": rejects}
    if done and not storage.exists(sidecar):
        raise ConfigError(f"{out} has shards but no {SIDECAR}; it was not written by this job")
    return done


# --- the driver ----------------------------------------------------------------------

def _run_table(kind: str, rows: pa.Table, cfg: EmbedConfig, checkpoint: str, identity: dict, image_size) -> dict:
    import ray
    import ray.data

    out = storage.join(cfg.out, kind)
    plan = plan_shards(rows.num_rows, cfg.rows_per_shard)
    keys = rows.column("image_uri" if kind == "gallery" else "caption").to_pylist()
    settings = {"kind": kind, "checkpoint": checkpoint, "rows_per_shard": cfg.rows_per_shard,
                "image_size": list(image_size)}
    fingerprint = plan_fingerprint(keys, settings)
    done = committed_shards(out, plan, fingerprint)
    header = {**identity, "dtype": "float32", "fingerprint": fingerprint, "settings": settings,
              "source": cfg.images or cfg.data, "split": None if cfg.images else cfg.split,
              "inputs": rows.num_rows}
    committer = ShardCommitter(out, kind, rows, plan, header, done)
    pending = [s for s in range(len(plan)) if s not in done]
    log.info("%s: %d rows in %d shards; %d already committed", kind, rows.num_rows, len(plan), len(done))
    tick = time.perf_counter()
    if pending:
        # Only what the workers need travels: the row number, its shard, and the image or caption.
        row_numbers = np.arange(rows.num_rows, dtype=np.int64)
        payload = "image_uri" if kind == "gallery" else "caption"
        work = pa.table({"row": row_numbers, "shard": row_numbers // cfg.rows_per_shard,
                         payload: rows.column(payload)})
        todo = pa.concat_tables([work.slice(plan[s][0], plan[s][1] - plan[s][0]) for s in pending])
        blocks = [todo.slice(i, cfg.block_rows) for i in range(0, todo.num_rows, cfg.block_rows)]
        ds = ray.data.from_arrow(blocks)
        if kind == "gallery":
            ds = ds.map_batches(decode_batch, fn_kwargs={"image_size": list(image_size)}, num_cpus=cfg.decode_cpus,
                                memory=cfg.decode_memory, batch_size=cfg.batch_size, batch_format="numpy")
        gpus = cfg.gpus_per_actor
        if gpus is None:
            gpus = 1 if ray.cluster_resources().get("GPU", 0) > 0 else 0
        ds = ds.map_batches(Embedder, fn_constructor_args=(checkpoint, kind),
                            compute=ray.data.ActorPoolStrategy(size=cfg.actors), num_gpus=gpus,
                            num_cpus=cfg.cpus_per_actor, batch_size=cfg.batch_size, batch_format="numpy")
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            committer.add(batch)
    info = committer.finish()
    if kind == "gallery" and info["rows"] == 0:
        raise DataError(f"every one of the {info['rejected']} images was rejected (see {rejects_dir(out)}/); "
                        f"nothing was embedded", file=cfg.images or cfg.data)
    info["seconds"] = time.perf_counter() - tick
    info["rows_this_run"] = sum(plan[s][1] - plan[s][0] for s in pending)
    return info


def embed(cfg: EmbedConfig, address: str | None = None) -> dict:
    """Embed a gallery (and, for dataset splits, its captions) into ``<out>/gallery`` (``<out>/queries``)."""
    import ray
    import ray.data

    from tpr_ray.ray_utils import init_ray, require_shared_storage

    checkpoint = resolve_checkpoint(cfg.checkpoint)
    ckpt_config = read_config(checkpoint)
    identity = {"method": ckpt_config["method"], "model": ckpt_config["backbone"]["model"],
                "checkpoint": checkpoint, "dim": ckpt_config["embed_dim"]}
    image_size = tuple(ckpt_config["backbone"]["image_size"])
    gallery = gallery_rows(cfg.data, cfg.images, cfg.split)
    jobs = [("gallery", gallery)]
    if cfg.queries and cfg.data is not None:
        jobs.append(("queries", query_rows(manifest_split(cfg.data, cfg.split))))

    init_ray(address)
    require_shared_storage(cfg.out, "--out")
    ray.data.DataContext.get_current().execution_options.preserve_order = False
    if cfg.batch_size is None:
        has_gpu = ray.cluster_resources().get("GPU", 0) > 0 and cfg.gpus_per_actor != 0
        cfg = dataclasses.replace(cfg, batch_size=256 if has_gpu else 64)
    return {kind: _run_table(kind, rows, cfg, checkpoint, identity, image_size) for kind, rows in jobs}

