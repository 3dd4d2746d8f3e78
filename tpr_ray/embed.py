"""Bulk embedding with Ray Data: sharded, exactly-once, resumable.

The input (a manifest split, or every image under a prefix/glob) is put in a fixed order
and cut into shards of ``rows_per_shard`` rows: the *shard plan*, the same for the same
input and settings. Pending shards stream through

    read + decode + resize (CPU tasks) -> the model (actor pool, a GPU each, bf16) -> driver

and the driver commits a shard once all of its rows have come back (see
:mod:`tpr_ray.commit`). Committed shards are never redone, so re-running an interrupted or
finished job only does what is missing, and every readable input row ends up in exactly one
committed shard. Images that are not readable are recorded per shard in
``<out>/gallery-rejects/`` with the reason, and counted; the job stops once they pass
``max_reject_rate``. Images that cannot be *fetched* now (permissions, network) are retried
and then stop the job: they are never recorded as rejects (see :mod:`tpr_ray.images`). One
job at a time writes an output: it holds a lease on it (:mod:`tpr_ray.lease`).

The tables (``<out>/gallery`` and ``<out>/queries``), their sidecar and shard names are
described in :mod:`tpr_ray.tables`, which this module writes through.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import re
import time
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from tpr_ray import storage
from tpr_ray.checkpoint import checkpoint_digest, read_config, resolve_checkpoint
from tpr_ray.commit import DATA_COLUMNS, ShardCommitter, committed_shards, open_job  # noqa: F401 - re-exported
from tpr_ray.data.manifest import manifest_info
from tpr_ray.errors import ConfigError, DataError
from tpr_ray.gallery import gallery_rows, manifest_split, query_rows
from tpr_ray.images import READ_ERROR_PATTERN, ImageReadError, decode_batch, decode_memory_bytes, fetch_batch
from tpr_ray.lease import Lease
from tpr_ray.tables import SIDECAR, rejects_dir  # noqa: F401 - SIDECAR re-exported

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
    # Logical memory reserved per decode task, per the Ray Data advice to declare memory for
    # heavy stages. None: sized from the pixel limit (an image at the limit being decoded plus
    # the batch's output; see images.decode_memory_bytes). It also keeps decoding a stage of
    # its own: Ray Data fuses maps whose resources are equal.
    decode_memory: int | None = None
    # JPEGs decoded by the model's GPU (nvJPEG; see tpr_ray.gpu_decode): the decode tasks only
    # fetch. None: when the actors have a GPU.
    decode_on_gpu: bool | None = None
    rows_per_shard: int = 10_000
    block_rows: int = 256
    queries: bool = True
    # The job stops once more than this fraction of its inputs are rejected as unreadable:
    # many rejects mean a wrong --images, a broken export or a decoder problem, not bad crops.
    max_reject_rate: float = 0.01
    # Ray retries of a decode task whose fetches kept failing (each after in-task backoff).
    read_retries: int = 3
    # The lease on `out` (one writer at a time) is renewed every quarter of this; a job that
    # died on another machine blocks the output for at most this long.
    lease_ttl_s: float = 60.0


# --- pure pieces ---------------------------------------------------------------

def plan_shards(num_rows: int, rows_per_shard: int) -> list[tuple[int, int]]:
    """[start, stop) row ranges of each shard; the last one may be shorter."""
    if rows_per_shard < 1:
        raise ConfigError(f"rows_per_shard must be positive, got {rows_per_shard}")
    return [(start, min(start + rows_per_shard, num_rows)) for start in range(0, num_rows, rows_per_shard)]


def plan_fingerprint(columns: pa.Table, settings: dict) -> str:
    """Identifies a job: every input column that ends up in the table, in order, and every
    setting that changes the output.

    Computed from the Arrow buffers: each column's name, type and validity, then for strings
    every value's length followed by all their bytes (so that no two inputs can join into the
    same stream), for numbers their values.
    """
    h = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    for name in columns.column_names:
        array = columns.column(name).combine_chunks()
        kind = array.type
        wide = pa.types.is_large_string(kind) or pa.types.is_large_binary(kind)
        texts = wide or pa.types.is_string(kind) or pa.types.is_binary(kind)
        if texts:  # the offsets' width is Arrow's choice, not the data's
            kind = "string" if pa.types.is_string(kind) or pa.types.is_large_string(kind) else "binary"
        h.update(f"\n{name}:{kind}:{len(array)}\n".encode())
        h.update(np.packbits(array.is_valid().to_numpy(zero_copy_only=False)).tobytes())
        if texts and len(array):
            offsets_buffer, data_buffer = array.buffers()[1:3]
            offsets = np.frombuffer(offsets_buffer, np.int64 if wide else np.int32)
            offsets = offsets[array.offset:array.offset + len(array) + 1].astype(np.int64)
            h.update(np.diff(offsets).tobytes())  # the same lengths whatever the offset width
            if data_buffer is not None:
                h.update(memoryview(data_buffer)[offsets[0]:offsets[-1]])
        elif not texts:
            h.update(pc.fill_null(array, 0).to_numpy(zero_copy_only=False).tobytes())
    return h.hexdigest()[:32]


class Embedder:
    """Actor: loads the checkpoint once, then embeds batches of pixels or captions."""

    def __init__(self, checkpoint: str, kind: str, image_size=None, cpu_threads: int | None = None):
        import torch

        from tpr_ray.checkpoint import load_method

        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if self.device.type == "cpu" and cpu_threads:
            # Ray caps an actor's OMP threads at its CPU share (1 for a fractional one); on a
            # CPU-only node the model is the job's heavy part and gets the node's cores.
            torch.set_num_threads(cpu_threads)
        self.method, _ = load_method(checkpoint, map_location="cpu")
        self.method.to(self.device)
        self.kind = kind
        self.image_size = image_size

    def __call__(self, batch: dict) -> dict:
        from tpr_ray.inference import encode_captions, encode_images

        out = {k: v for k, v in batch.items() if k not in ("pixels", "image_bytes")}
        if self.kind == "queries":
            out["embedding"] = encode_captions(self.method, list(batch["caption"]), self.device)
            return out
        ok = np.array([not r for r in batch["reject_reason"]], dtype=bool)
        if "image_bytes" in batch:  # the decode stage only fetched: decode here, on the model's device
            import torch

            from tpr_ray.gpu_decode import decode_on_device

            reasons = np.array(batch["reject_reason"], dtype=object)
            pixels, reasons[ok] = decode_on_device(list(batch["image_bytes"][ok]), self.image_size, self.device)
            decoded = np.array([not r for r in reasons[ok]], dtype=bool)
            pixels, ok = pixels[torch.from_numpy(decoded).to(pixels.device)], np.array([not r for r in reasons], dtype=bool)
            out["reject_reason"] = reasons
        else:
            pixels = batch["pixels"][ok]
        embedding = np.full((len(ok), self.method.embed_dim), np.nan, dtype=np.float32)
        if ok.any():
            embedding[ok] = encode_images(self.method, pixels, self.device)
        out["embedding"] = embedding
        return out


def job_fingerprint(kind: str, rows: pa.Table, checkpoint: str, rows_per_shard: int, image_size,
                    manifest_version: str | None) -> tuple[str, dict]:
    """(fingerprint, settings) of a job: a resumed job must have the same inputs, model and plan."""
    settings = {"kind": kind, "checkpoint": checkpoint, "checkpoint_digest": checkpoint_digest(checkpoint),
                "manifest_version": manifest_version, "rows_per_shard": rows_per_shard,
                "image_size": list(image_size)}
    return plan_fingerprint(rows.select(DATA_COLUMNS[kind]), settings), settings


# --- the driver ----------------------------------------------------------------------

def _run_table(kind: str, rows: pa.Table, cfg: EmbedConfig, checkpoint: str, identity: dict, image_size,
               manifest_version: str | None, guard=None) -> dict:
    import ray
    import ray.data

    out = storage.join(cfg.out, kind)
    plan = plan_shards(rows.num_rows, cfg.rows_per_shard)
    fingerprint, settings = job_fingerprint(kind, rows, checkpoint, cfg.rows_per_shard, image_size,
                                            manifest_version)
    header = {**identity, "dtype": "float32", "fingerprint": fingerprint, "settings": settings,
              "source": cfg.images or cfg.data, "split": None if cfg.images else cfg.split,
              "inputs": rows.num_rows}
    committer = open_job(out, kind, rows, plan, header, cfg.max_reject_rate if kind == "gallery" else 1.0, guard)
    done = dict(committer.committed)
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
        gpus = cfg.gpus_per_actor
        if gpus is None:
            gpus = 1 if ray.cluster_resources().get("GPU", 0) > 0 else 0
        on_gpu = cfg.decode_on_gpu if cfg.decode_on_gpu is not None else gpus > 0
        if kind == "gallery":
            memory = cfg.decode_memory or decode_memory_bytes(cfg.batch_size, image_size)
            ds = ds.map_batches(fetch_batch if on_gpu else decode_batch, fn_kwargs={"image_size": list(image_size)},
                                num_cpus=cfg.decode_cpus, memory=memory, batch_size=cfg.batch_size,
                                batch_format="numpy")
        ds = ds.map_batches(Embedder, fn_constructor_args=(checkpoint, kind, tuple(image_size),
                                                           None if gpus else _cpu_threads_per_actor(cfg.actors)),
                            compute=ray.data.ActorPoolStrategy(size=cfg.actors), num_gpus=gpus,
                            num_cpus=cfg.cpus_per_actor, batch_size=cfg.batch_size, batch_format="numpy")
        try:
            for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
                committer.add(batch)
        except Exception as exc:
            failure = _read_failure(exc)
            if failure is None:
                raise
            raise DataError(f"could not read it now ({failure.reason}), still failing after {cfg.read_retries + 1} "
                            f"tries. The images of its "
                            f"shard were not committed (nothing was recorded as rejected); fix access to the "
                            f"storage and re-run the same command to continue", file=failure.uri) from None
    info = committer.finish()
    if kind == "gallery" and info["rows"] == 0:
        raise DataError(f"every one of the {info['rejected']} images was rejected (see {rejects_dir(out)}/); "
                        f"nothing was embedded", file=cfg.images or cfg.data)
    info["seconds"] = time.perf_counter() - tick
    info["rows_this_run"] = sum(plan[s][1] - plan[s][0] for s in pending)
    return info


def _cpu_threads_per_actor(actors: int) -> int:
    """Torch threads for each CPU-only model actor: the smallest node's CPUs shared by the actors
    that land on one node (decode tasks take what the model leaves between batches)."""
    import math

    import ray

    nodes = [n["Resources"].get("CPU", 0) for n in ray.nodes() if n.get("Alive") and n["Resources"].get("CPU")]
    if not nodes:
        return 1
    return max(1, int(min(nodes) // math.ceil(actors / len(nodes))))


def _read_failure(exc: BaseException) -> ImageReadError | None:
    """The ImageReadError behind an error that Ray Data raised at the driver, if any.

    Ray Data wraps a task's error in a UserCodeException whose cause does not survive the trip
    to the driver; only its traceback text does, so the error is recognised by its message.
    """
    todo, seen = [exc], set()
    while todo:
        exc = todo.pop()
        if exc is None or id(exc) in seen:
            continue
        seen.add(id(exc))
        if isinstance(exc, ImageReadError):
            return exc
        found = re.search(rf"ImageReadError: {READ_ERROR_PATTERN} (.+?): ([^\n]*)", str(exc))
        if found:
            return ImageReadError(*found.groups())
        todo += [getattr(exc, "cause", None), exc.__cause__, exc.__context__]
    return None


def embed(cfg: EmbedConfig, address: str | None = None) -> dict:
    """Embed a gallery (and, for dataset splits, its captions) into ``<out>/gallery`` (``<out>/queries``)."""
    import ray
    import ray.data

    from tpr_ray.ray_utils import init_ray, require_shared_storage

    if not 0.0 <= cfg.max_reject_rate <= 1.0:
        raise ConfigError(f"--max-reject-rate must be between 0 and 1, got {cfg.max_reject_rate}")
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
    context = ray.data.DataContext.get_current()
    context.execution_options.preserve_order = False
    # Ray Data retries a decode block that could not be fetched (with exponential backoff);
    # matched on ImageReadError's message, so a bug in the code is not retried.
    context.retried_map_errors = [READ_ERROR_PATTERN]
    context.max_map_retries = cfg.read_retries
    if cfg.batch_size is None:
        has_gpu = ray.cluster_resources().get("GPU", 0) > 0 and cfg.gpus_per_actor != 0
        cfg = dataclasses.replace(cfg, batch_size=256 if has_gpu else 64)
    version = manifest_info(gallery).get("version") if cfg.data is not None else None
    with Lease(cfg.out, ttl_s=cfg.lease_ttl_s) as lease:
        return {kind: _run_table(kind, rows, cfg, checkpoint, identity, image_size, version, lease.check)
                for kind, rows in jobs}

