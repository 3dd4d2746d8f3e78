"""Bulk embedding with Ray Data: sharded, exactly-once, resumable.

The input (a manifest split, every image under a prefix/glob, or a Parquet listing) is put in
a fixed order and cut into shards of ``rows_per_shard`` rows: the *shard plan*
(:mod:`tpr_ray.embedding.plan`), the same for the same input and settings. The driver streams the
listing once for the resume fingerprint (from the Arrow buffers) and once to write the input columns of each
pending shard to ``<table>-plan/`` (:func:`plan_job`), then lets it go: from there on it
holds shard ids, the shards in flight and one entry per committed shard, so its memory grows
with the number of shards, not rows. Pending shards stream through

    read plan file (by shard id) + decode + resize (CPU tasks) -> the model (actor pool,
    a GPU each, bf16) -> driver

with the input columns travelling alongside, and the driver commits a shard once all of its
rows have come back (see :mod:`tpr_ray.embedding.committer`). Committed shards are never redone, so re-running an interrupted or
finished job only does what is missing, and every readable input row ends up in exactly one
committed shard. Images that are not readable are recorded per shard in
``<out>/gallery-rejects/`` with the reason, and counted; the job stops once they pass
``max_reject_rate``. Images that cannot be *fetched* now (permissions, network) are retried
and then stop the job: they are never recorded as rejects (see :mod:`tpr_ray.io.images`). One
job at a time writes an output: it holds a lease on it (:mod:`tpr_ray.io.lease`).

The tables (``<out>/gallery`` and ``<out>/queries``), their sidecar and shard names are
described in :mod:`tpr_ray.tables`, which this module writes through.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import time
from dataclasses import dataclass

import numpy as np

from tpr_ray.io import storage
from tpr_ray.model.checkpoint import checkpoint_digest, validate_checkpoint
from tpr_ray.embedding.committer import (
    ShardCommitter,
    open_job,
)
from tpr_ray.data.manifest import manifest_info
from tpr_ray.errors import ConfigError, DataError
from tpr_ray.embedding.inputs import check_listing, gallery_rows, is_listing, listing_batches, manifest_split, query_rows
from tpr_ray.io.images import READ_ERROR_PATTERN, ImageReadError, decode_batch, decode_memory_bytes, fetch_batch
from tpr_ray.io.lease import Lease
from tpr_ray.embedding.resources import Ask, StallWatchdog, check_fit
from tpr_ray.embedding.plan import Fingerprint, plan_shards, read_plan, remove_plan, write_plan
from tpr_ray.tables import DATA_COLUMNS, plan_dir, rejects_dir

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
    # JPEGs decoded by the model's GPU (nvJPEG; see tpr_ray.io.gpu_decode): the decode tasks only
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
    # More places a manifest's or listing's images may be, besides the file's own folder
    # (see tpr_ray.data.uris); None: TPR_RAY_ALLOW_URI_PREFIX.
    allow_uri_prefixes: tuple[str, ...] | None = None
    # No shard committed for this long: a warning says what Ray is waiting for (0: never).
    stall_minutes: float = 10.0


class Embedder:
    """Actor: loads the checkpoint once, then embeds batches of pixels or captions."""

    def __init__(self, checkpoint: str, kind: str, image_size=None, cpu_threads: int | None = None):
        import torch

        from tpr_ray.model.checkpoint import load_method

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
        from tpr_ray.model.encode import encode_captions, encode_images

        out = {k: v for k, v in batch.items() if k not in ("pixels", "image_bytes")}
        if self.kind == "queries":
            out["embedding"] = encode_captions(self.method, list(batch["caption"]), self.device)
            return out
        ok = np.array([not r for r in batch["reject_reason"]], dtype=bool)
        if "image_bytes" in batch:  # the decode stage only fetched: decode here, on the model's device
            import torch

            from tpr_ray.io.gpu_decode import decode_on_device

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


def job_settings(kind: str, checkpoint: str, rows_per_shard: int, image_size,
                 manifest_version: str | None) -> dict:
    """Every setting that changes a job's output: a resumed job must have the same ones."""
    return {"kind": kind, "checkpoint": checkpoint, "checkpoint_digest": checkpoint_digest(checkpoint),
            "manifest_version": manifest_version, "rows_per_shard": rows_per_shard,
            "image_size": list(image_size)}


# --- the driver ----------------------------------------------------------------------

def _run_table(kind: str, rows, cfg: EmbedConfig, checkpoint: str, identity: dict, image_size,
               manifest_version: str | None, guard=None) -> dict:
    import ray
    import ray.data

    out = storage.join(cfg.out, kind)
    columns = DATA_COLUMNS[kind]
    settings = job_settings(kind, checkpoint, cfg.rows_per_shard, image_size, manifest_version)
    listing = [rows]
    del rows

    def batches():  # a table in memory, or a listing file read in batches (a callable)
        if callable(listing[0]):
            return listing[0]()
        return listing[0].select(columns).to_batches(max_chunksize=65536)

    committer, pending = plan_job(out, kind, batches, settings, cfg, identity, guard)
    listing.clear()  # from here on the listing lives in the plan files; the driver holds shard ids
    plan = committer.plan
    tick = time.perf_counter()
    if pending:
        ds = ray.data.from_items([{"shard": s} for s in pending], override_num_blocks=len(pending))
        ds = ds.map_batches(read_plan, fn_kwargs={"plan_uri": plan_dir(out), "block_rows": cfg.block_rows},
                            batch_size=1, batch_format="numpy", num_cpus=cfg.decode_cpus)
        gpus = cfg.gpus_per_actor
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
        watchdog = StallWatchdog(lambda: len(committer.committed), cfg.stall_minutes, f"embedding {kind} ({out})")
        try:
            # Arrow: the input columns pass to the shard files without a round trip through Python
            with watchdog:
                for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
                    committer.add(batch)
        except BaseException as exc:
            committer.settle()  # the shards already handed to the writer are whole: let them land
            if not isinstance(exc, Exception):
                raise
            failure = _read_failure(exc)
            if failure is None:
                raise
            raise DataError(f"could not read it now ({failure.reason}), still failing after {cfg.read_retries + 1} "
                            f"tries. The images of its "
                            f"shard were not committed (nothing was recorded as rejected); fix access to the "
                            f"storage and re-run the same command to continue", file=failure.uri) from None
    info = committer.finish()
    remove_plan(out)
    if kind == "gallery" and info["rows"] == 0:
        raise DataError(f"every one of the {info['rejected']} images was rejected (see {rejects_dir(out)}/); "
                        f"nothing was embedded", file=cfg.images or cfg.data)
    info["seconds"] = time.perf_counter() - tick
    info["rows_this_run"] = sum(plan[s][1] - plan[s][0] for s in pending)
    return info


def plan_job(out: str, kind: str, batches, settings: dict, cfg: EmbedConfig, identity: dict,
             guard=None) -> tuple[ShardCommitter, list[int]]:
    """Plan a job from its input listing without holding it: ``batches()`` yields the listing's
    record batches (the input columns) and is read twice, once for the fingerprint and the row
    count, once to write the plan files of the shards not yet committed. Returns the
    committer (the job recorded, what an interrupted run left cleaned up) and the pending shards.
    """
    fingerprint = Fingerprint(DATA_COLUMNS[kind], settings)
    for batch in batches():
        fingerprint.update(batch)
    plan = plan_shards(fingerprint.rows, cfg.rows_per_shard)
    header = {**identity, "dtype": "float32", "fingerprint": fingerprint.hexdigest(), "settings": settings,
              "source": cfg.images or cfg.data, "split": None if cfg.images else cfg.split,
              "inputs": fingerprint.rows}
    committer = open_job(out, kind, None, plan, header, cfg.max_reject_rate if kind == "gallery" else 1.0, guard)
    pending = [s for s in range(len(plan)) if s not in committer.committed]
    log.info("%s: %d rows in %d shards; %d already committed", kind, fingerprint.rows, len(plan),
             len(plan) - len(pending))
    if pending:
        if guard is not None:
            guard()
        write_plan(plan_dir(out), batches(), DATA_COLUMNS[kind], cfg.rows_per_shard, set(pending))
    return committer, pending


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

    from tpr_ray.io.cluster import init_ray, require_shared_storage

    if not 0.0 <= cfg.max_reject_rate <= 1.0:
        raise ConfigError(f"--max-reject-rate must be between 0 and 1, got {cfg.max_reject_rate}")
    checkpoint, ckpt_config = validate_checkpoint(cfg.checkpoint)  # before Ray: one line, not actor tracebacks
    identity = {"method": ckpt_config["method"], "model": ckpt_config["backbone"]["model"],
                "checkpoint": checkpoint, "dim": ckpt_config["embed_dim"]}
    image_size = tuple(ckpt_config["backbone"]["image_size"])
    # Read before Ray starts, so a wrong path is one line at once; each listing is handed to its
    # job (not kept here), which writes it to plan files and lets it go.
    if cfg.images is not None and is_listing(cfg.images):
        # its columns and where its URIs lead (its image_uri column streamed once); the rows
        # are then streamed twice more, by the job
        check_listing(cfg.images, cfg.allow_uri_prefixes)
        listings = {"gallery": lambda: listing_batches(cfg.images)}
    else:
        listings = {"gallery": gallery_rows(cfg.data, cfg.images, cfg.split, cfg.allow_uri_prefixes)}
    if cfg.queries and cfg.data is not None:
        listings["queries"] = query_rows(manifest_split(cfg.data, cfg.split, cfg.allow_uri_prefixes))

    init_ray(address)
    require_shared_storage(cfg.out, "--out")
    context = ray.data.DataContext.get_current()
    context.execution_options.preserve_order = False
    # Ray Data retries a decode block that could not be fetched (with exponential backoff);
    # matched on ImageReadError's message, so a bug in the code is not retried.
    context.retried_map_errors = [READ_ERROR_PATTERN]
    context.max_map_retries = cfg.read_retries
    if cfg.gpus_per_actor is None:
        cfg = dataclasses.replace(cfg, gpus_per_actor=1 if ray.cluster_resources().get("GPU", 0) > 0 else 0)
    if cfg.batch_size is None:
        cfg = dataclasses.replace(cfg, batch_size=256 if cfg.gpus_per_actor else 64)
    # the actors and a decode task beside them must fit, or the job would wait for ever
    check_fit(Ask(cfg.actors, cfg.cpus_per_actor, cfg.gpus_per_actor, cfg.decode_cpus,
                  cfg.decode_memory or decode_memory_bytes(cfg.batch_size, image_size)))
    version = manifest_info(listings["gallery"]).get("version") if cfg.data is not None else None
    with Lease(cfg.out, ttl_s=cfg.lease_ttl_s) as lease:
        return {kind: _run_table(kind, listings.pop(kind), cfg, checkpoint, identity, image_size, version,
                                 lease.check)
                for kind in list(listings)}

