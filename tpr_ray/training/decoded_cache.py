"""A decoded cache of a manifest split: the resized uint8 crops, written once, read every epoch.

Training without it fetches, decodes and resizes every image in every epoch, in DataLoader
workers: a few hundred images/s per core, short of what one GPU consumes. The cache is built
by one Ray Data job that reuses the embedding decode stage (`images.decode_batch`), so an
image is decoded here exactly as it is for embedding. Layout, under a folder named after
its key::

    <root>/<split>-<H>x<W>-<digest>/part-00000.parquet ...   row int64, image_id string,
                                                              reject_reason string ("" if read),
                                                              pixels fixed_size_binary[H*W*3]
    <root>/<split>-<H>x<W>-<digest>/_COMPLETE.json           written last

The digest covers the manifest version, the split's ordered (image_id, image_uri) rows and the
image size: another manifest, split or size is another cache, never a stale one. Each shard
is written atomically by the task that decoded it; the marker is written by the driver only
after every planned row was found in exactly one shard, so a cache without it (an
interrupted build) is never read, and building again redoes only the missing shards.
Unreadable images stay in their shard with the reason, are counted in the marker and logged;
training leaves their captions out and says how many.

Why this is not the embedding job's committer (`tpr_ray.embedding.committer`), though both
write shards exactly once under the table's shard names (`tpr_ray.tables`): there, rows reach
the driver in the model actors' batches, in any order and possibly twice (a retried task), so
the driver gathers each shard and commits it. Here a shard is one map task's whole input
block and its crops (about 144 KiB each) must not travel through the driver: the task writes
its own shard atomically, and the driver only verifies that every row is in exactly one shard
before writing the marker.

`CachedPairs` holds the split's crops in each worker's memory (CUHK-PEDES: about 6 GB at
384x128). Datasets that do not fit a node stream from the same shards instead:
`stream_pairs` reads them with ``ray.data.read_parquet`` and expands each image to one row
per caption, for ``TorchTrainer(datasets={"train": ...})``; in the loop, `stream_batches`
over ``ray.train.get_dataset_shard("train")`` yields the same batches as `CachedPairs`
(Ray Train splits a dataset equally, so every worker runs the same number of steps).
Shuffling is then within a buffer and by block order, not over the whole split
(``tpr-ray train --decoded-cache DIR --decoded-stream``).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import posixpath

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from tpr_ray.io import storage
from tpr_ray.errors import ConfigError, DataError
from tpr_ray.io.images import READ_ERROR_PATTERN, decode_batch, decode_memory_bytes
from tpr_ray.tables import shard_name, shard_number

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
READ_RETRIES = 3  # Ray Data retries of a shard whose images could not be fetched (as the embedding job)
MARKER = "_COMPLETE.json"
DEFAULT_FOLDER = "tpr-ray-decoded"


# --- naming ----------------------------------------------------------------------------

def cache_key(rows: pa.Table, version: str | None, split: str, image_size) -> str:
    """``<split>-<H>x<W>-<digest>``: a new manifest version, row list or size is a new cache."""
    h, w = image_size
    digest = hashlib.sha256(json.dumps({"format": FORMAT_VERSION, "version": version, "split": split,
                                        "image_size": [h, w]}, sort_keys=True).encode())
    for image_id, uri in zip(rows.column("image_id").to_pylist(), rows.column("image_uri").to_pylist()):
        digest.update(f"{image_id}\t{uri}\n".encode())
    return f"{split}-{h}x{w}-{digest.hexdigest()[:16]}"


def resolve_root(data: str, root: str | None) -> str:
    """The folder holding caches: ``root`` (absolute when local), or beside the manifest for None/"auto"."""
    if root in (None, "auto"):
        return default_root(data)
    return root if storage.is_remote(root) else os.path.abspath(root)


def default_root(data: str) -> str:
    """Beside the manifest: in a dataset folder, or next to a ``.parquet`` manifest."""
    data = data.rstrip("/")
    if data.endswith(".parquet"):
        parent = posixpath.dirname(data) if "://" in data else os.path.dirname(os.path.abspath(data))
        return storage.join(parent, DEFAULT_FOLDER)
    return storage.join(data, DEFAULT_FOLDER)


# --- writing -------------------------------------------------------------------------

def _pixels_array(pixels: np.ndarray) -> pa.Array:
    # One fixed-size binary value per crop: a list<uint8> column would cost Parquet a
    # repetition level per byte and read ~100x slower.
    width = int(np.prod(pixels.shape[1:]))
    data = pa.py_buffer(np.ascontiguousarray(pixels).tobytes())
    return pa.Array.from_buffers(pa.binary(width), len(pixels), [None, data])


def write_shard(batch: dict, image_size, out: str) -> dict:
    """Decode one shard's rows and write its file; returns (row, shard, reason) per row.

    Runs as the map stage of the build job; the batch is one whole shard (one input block).
    """
    shards = {int(s) for s in batch["shard"]}
    if len(shards) != 1:
        raise RuntimeError(f"a write batch must hold exactly one shard, got {sorted(shards)}")
    decoded = decode_batch(batch, image_size)
    table = pa.table({"row": pa.array(batch["row"], pa.int64()),
                      "image_id": pa.array(list(batch["image_id"]), pa.string()),
                      "reject_reason": pa.array(list(decoded["reject_reason"]), pa.string()),
                      "pixels": _pixels_array(decoded["pixels"])})
    buf = io.BytesIO()
    # Crops barely compress and are read every epoch: store them plain.
    pq.write_table(table, buf, compression="none", use_dictionary=["image_id", "reject_reason"])
    storage.write_bytes_atomic(storage.join(out, shard_name(shards.pop())), buf.getvalue())
    return {"row": np.asarray(batch["row"]), "reject_reason": decoded["reject_reason"]}


def _written_shards(out: str) -> set[int]:
    fs, path = storage.filesystem(out)
    if not fs.exists(path):
        return set()
    storage.remove_temporaries(out)  # only a build writes here: a temporary is from an interrupted one
    names = [posixpath.basename(p) for p in fs.ls(path, detail=False)]
    return {number for number in map(shard_number, names) if number is not None}


def _work_blocks(rows: pa.Table, rows_per_shard: int, skip: set[int]) -> list[pa.Table]:
    n = rows.num_rows
    row_numbers = np.arange(n, dtype=np.int64)
    work = pa.table({"row": row_numbers, "shard": row_numbers // rows_per_shard,
                     "image_id": rows.column("image_id"), "image_uri": rows.column("image_uri")})
    starts = range(0, n, rows_per_shard)
    return [work.slice(start, rows_per_shard) for k, start in enumerate(starts) if k not in skip]


def _verify_and_mark(out: str, rows: pa.Table, header: dict) -> dict:
    """Check that every row is in exactly one shard; collect rejects; write the marker last."""
    fs, path = storage.filesystem(out)
    seen = np.zeros(rows.num_rows, dtype=np.int64)
    rejects, shards = [], []
    uris = rows.column("image_uri").to_pylist()
    for name in sorted(posixpath.basename(p) for p in fs.ls(path, detail=False)):
        if shard_number(name) is None:
            continue
        part_fs, part_path = storage.filesystem(storage.join(out, name))
        with part_fs.open(part_path, "rb") as f:  # three small columns; the pixels are not read
            part = pq.read_table(f, columns=["row", "image_id", "reject_reason"])
        numbers = part.column("row").to_numpy()
        if numbers.size and (numbers.min() < 0 or numbers.max() >= rows.num_rows):
            raise DataError("row number outside the split; the cache folder holds another build",
                            file=storage.join(out, name))
        np.add.at(seen, numbers, 1)
        for row, image_id, reason in zip(numbers.tolist(), part.column("image_id").to_pylist(),
                                         part.column("reject_reason").to_pylist()):
            if reason:
                rejects.append({"image_id": image_id, "image_uri": uris[row], "reason": reason})
        shards.append(name)
    if not (seen == 1).all():
        missing, twice = np.flatnonzero(seen == 0), np.flatnonzero(seen > 1)
        raise DataError(f"incomplete or inconsistent build: {missing.size} rows missing, {twice.size} written twice "
                        f"(first: {(missing.tolist() + twice.tolist())[:5]})", file=out)
    info = {**header, "rows": rows.num_rows, "rejected": len(rejects), "rejects": rejects, "shards": shards}
    storage.write_json(storage.join(out, MARKER), info)
    return info


def build(rows: pa.Table, out: str, image_size, *, header: dict | None = None, rows_per_shard: int = 512,
          executor: str = "ray", decode_cpus: float = 1.0) -> dict:
    """Write the decoded cache of ``rows`` (image_id, image_uri) into ``out``; returns the marker.

    ``executor="ray"`` runs the shards as one Ray Data job on the connected cluster; ``"local"``
    writes them one after another in this process (tests, benchmarks, a single machine).
    A finished cache is returned as it is; an interrupted one is completed.
    """
    if storage.exists(storage.join(out, MARKER)):
        return read_marker(out)
    image_size = [int(v) for v in image_size]
    header = {"format": FORMAT_VERSION, "image_size": image_size, **(header or {})}
    blocks = _work_blocks(rows, rows_per_shard, _written_shards(out))
    log.info("decoded cache %s: %d rows, %d shard(s) to write", out, rows.num_rows, len(blocks))
    if executor == "local":
        for block in blocks:
            write_shard(block.to_pydict() | {"row": block.column("row").to_numpy()}, image_size, out)
    elif executor == "ray" and blocks:
        import ray.data

        # A fetch that keeps failing raises images.ImageReadError: Ray Data retries the shard
        # (matched on its message, so a bug is not retried), then the build stops; it is
        # never recorded as a reject.
        context = ray.data.DataContext.get_current()
        context.retried_map_errors = [READ_ERROR_PATTERN]
        context.max_map_retries = READ_RETRIES
        ds = ray.data.from_arrow(blocks).map_batches(
            write_shard, fn_kwargs={"image_size": image_size, "out": out}, batch_size=None,
            batch_format="numpy", num_cpus=decode_cpus, memory=decode_memory_bytes(rows_per_shard, image_size))
        for _ in ds.iter_batches(batch_size=None):  # the rows come back as numbers and reasons only
            pass
    elif executor not in ("ray", "local"):
        raise ValueError(f"executor must be 'ray' or 'local', got {executor!r}")
    info = _verify_and_mark(out, rows, header)
    if info["rejected"]:
        first = info["rejects"][0]
        log.warning("decoded cache %s: %d image(s) could not be read and are left out of training "
                    "(first: %s: %s); all are listed in %s", out, info["rejected"], first["image_uri"],
                    first["reason"], storage.join(out, MARKER))
    return info


def ensure(data: str, split: str, image_size, root: str | None = None, *, executor: str = "ray",
           rows_per_shard: int = 512) -> str:
    """The cache folder of ``split`` of the dataset/manifest ``data``, built when missing.

    ``root`` is the folder that holds caches (local or s3://); None or ``"auto"`` puts it
    beside the manifest (:func:`default_root`).
    """
    from tpr_ray.data import manifest_info
    from tpr_ray.embedding.inputs import manifest_split

    rows = manifest_split(data, split)
    version = manifest_info(rows).get("version")
    out = storage.join(resolve_root(data, root), cache_key(rows, version, split, image_size))
    build(rows, out, image_size, header={"split": split, "manifest_version": version, "source": data},
          rows_per_shard=rows_per_shard, executor=executor)
    return out


# --- reading ---------------------------------------------------------------------------

def read_marker(out: str) -> dict:
    marker = storage.join(out, MARKER)
    if not storage.exists(marker):
        raise DataError(f"not a finished decoded cache (no {MARKER}: the build was interrupted or this is another "
                        f"folder); build it again", file=out)
    return storage.read_json(marker)


def load(out: str) -> tuple[list[str], np.ndarray, dict]:
    """(image_ids, pixels N x H x W x 3 uint8, marker) of a finished cache, in split row order.

    Rejected images are in the list with zero pixels; the marker names them.
    """
    info = read_marker(out)
    h, w = info["image_size"]
    pixels = np.empty((info["rows"], h, w, 3), dtype=np.uint8)
    image_ids: list[str | None] = [None] * info["rows"]
    for name in info["shards"]:
        table = pq.read_table(io.BytesIO(storage.read_bytes(storage.join(out, name))))
        numbers = table.column("row").to_numpy()
        for row, image_id in zip(numbers.tolist(), table.column("image_id").to_pylist()):
            image_ids[row] = image_id
        start = 0
        for chunk in table.column("pixels").chunks:
            n, width = len(chunk), chunk.type.byte_width
            data = np.frombuffer(chunk.buffers()[1], np.uint8)[chunk.offset * width:(chunk.offset + n) * width]
            pixels[numbers[start:start + n]] = data.reshape(n, h, w, 3)
            start += n
    return image_ids, pixels, info


# --- training input --------------------------------------------------------------------

class CachedPairs:
    """Training batches from a decoded cache, sampled exactly as `train.CaptionPairs` is.

    The same (image, caption) pair list and the same ``DistributedSampler`` (seed, rank,
    epoch, drop_last) give the same pairs in the same order; the images come as uint8 from
    memory and are augmented and normalised per batch on ``device`` (`BatchAugment`). It is
    its own sampler (``set_epoch``) and loader (``len``, iteration); each batch holds
    ``images`` (normalised, on the device), ``caption``, ``person_id`` and ``label``.
    ``loaded``: what `load` returned for ``cache``, when the caller holds it already.
    """

    def __init__(self, cache: str, table: pa.Table, labels: dict[int, int], batch_size: int, world: int, rank: int,
                 seed: int, device, augment: bool, loaded: tuple | None = None):
        import torch
        from torch.utils.data import DistributedSampler

        from tpr_ray.training.augment import BatchAugment

        image_ids, self.pixels, info = loaded if loaded is not None else load(cache)
        where = {image_id: i for i, image_id in enumerate(image_ids)}
        rejected = {r["image_id"] for r in info["rejects"]}
        missing = [i for i in table.column("image_id").to_pylist() if i not in where]
        if missing:
            raise DataError(f"{len(missing)} training image(s) are not in the decoded cache (first: {missing[0]!r}); "
                            f"it was built from another manifest", file=cache)
        self.items, left_out = [], 0
        for image_id, pid, caps in zip(table.column("image_id").to_pylist(), table.column("person_id").to_pylist(),
                                       table.column("captions").to_pylist()):
            if image_id in rejected:
                left_out += len(caps)
                continue
            self.items += [(where[image_id], cap, pid, labels[pid]) for cap in caps]
        if left_out and rank == 0:
            log.warning("%d caption(s) of %d unreadable image(s) are left out (listed in %s)", left_out,
                        len(rejected), storage.join(cache, MARKER))
        if len(self.items) < batch_size * world:
            raise ConfigError(f"{len(self.items)} training pairs cannot fill one global batch of {batch_size} x "
                              f"{world} workers; lower --batch-size")
        self.batch_size = batch_size
        self.sampler = DistributedSampler(range(len(self.items)), num_replicas=world, rank=rank, shuffle=True,
                                          seed=seed, drop_last=True)
        self.augment = BatchAugment(device, seed=seed * 1009 + rank, augment=augment)
        self.pin = torch.device(device).type == "cuda"

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.sampler) // self.batch_size

    def __iter__(self):
        import torch

        order = list(self.sampler)
        for start in range(0, len(self) * self.batch_size, self.batch_size):
            picked = [self.items[i] for i in order[start:start + self.batch_size]]
            images = torch.from_numpy(self.pixels[[p[0] for p in picked]])
            yield {"images": self.augment(images.pin_memory() if self.pin else images),
                   "caption": [p[1] for p in picked],
                   "person_id": torch.tensor([p[2] for p in picked]),
                   "label": torch.tensor([p[3] for p in picked])}


# --- streaming, for splits larger than a node's memory ----------------------------------

def _expand_pairs(batch: pa.Table, pairs: dict, size) -> dict:
    """Ray Data stage: one output row per caption of each readable cached image."""
    h, w = size
    chunk = batch.column("pixels").combine_chunks()
    data = np.frombuffer(chunk.buffers()[1], np.uint8)[chunk.offset * h * w * 3:]
    take, captions, pids, labels = [], [], [], []
    for i, (image_id, reason) in enumerate(zip(batch.column("image_id").to_pylist(),
                                               batch.column("reject_reason").to_pylist())):
        if reason or image_id not in pairs:
            continue
        caps, pid, label = pairs[image_id]
        take += [i] * len(caps)
        captions += caps
        pids += [pid] * len(caps)
        labels += [label] * len(caps)
    images = data[:len(chunk) * h * w * 3].reshape(len(chunk), h, w, 3)[take]
    return {"image": images, "caption": np.array(captions, dtype=object),
            "person_id": np.array(pids, np.int64), "label": np.array(labels, np.int64)}


def stream_pairs(cache: str, table: pa.Table, labels: dict[int, int]):
    """The (image, caption) pairs of ``table`` as a Ray Dataset read shard by shard from the cache.

    For ``TorchTrainer(datasets={"train": ...})``: Ray Train splits it into equal parts per
    worker, so every worker runs the same number of steps (see `stream_batches`).
    """
    import ray.data

    info = read_marker(cache)
    pairs = {image_id: (caps, pid, labels[pid]) for image_id, pid, caps in zip(
        table.column("image_id").to_pylist(), table.column("person_id").to_pylist(),
        table.column("captions").to_pylist())}
    files = [storage.join(cache, name) for name in info["shards"]]
    ds = ray.data.read_parquet(files, columns=["image_id", "reject_reason", "pixels"])
    return ds.map_batches(_expand_pairs, fn_kwargs={"pairs": pairs, "size": info["image_size"]},
                          batch_format="pyarrow").randomize_block_order()


def stream_batches(shard, batch_size: int, augment, shuffle_buffer: int = 2048):
    """Batches from a Ray Data shard (``ray.train.get_dataset_shard``), shaped as `CachedPairs` yields them."""
    import torch

    for batch in shard.iter_batches(batch_size=batch_size, batch_format="numpy", drop_last=True,
                                    local_shuffle_buffer_size=shuffle_buffer):
        # Ray hands out read-only arrays; torch wants writable memory, so each batch is copied once.
        yield {"images": augment(torch.from_numpy(np.array(batch["image"]))),
               "caption": [str(c) for c in batch["caption"]],
               "person_id": torch.tensor(batch["person_id"]), "label": torch.tensor(batch["label"])}


class StreamedPairs:
    """Worker side of streaming: `stream_batches` with the loader interface of `CachedPairs`."""

    def __init__(self, shard, cache: str, table: pa.Table, batch_size: int, world: int, device, augment: bool,
                 seed: int = 0):
        from tpr_ray.training.augment import BatchAugment

        rejected = {r["image_id"] for r in read_marker(cache)["rejects"]}
        pairs = sum(len(caps) for image_id, caps in zip(table.column("image_id").to_pylist(),
                                                        table.column("captions").to_pylist())
                    if image_id not in rejected)
        # Ray Train gives each worker pairs // world rows (an equal split), so all run len(self) steps.
        self.steps = pairs // world // batch_size
        if self.steps == 0:
            raise ConfigError(f"{pairs} training pairs cannot fill one global batch of {batch_size} x "
                              f"{world} workers; lower --batch-size")
        self.shard, self.batch_size = shard, batch_size
        self.augment = BatchAugment(device, seed=seed, augment=augment)

    def set_epoch(self, epoch: int) -> None:
        pass  # each pass over a Ray Dataset is read in a new random block order

    def __len__(self) -> int:
        return self.steps

    def __iter__(self):
        for step, batch in enumerate(stream_batches(self.shard, self.batch_size, self.augment)):
            if step == self.steps:
                return
            yield batch
