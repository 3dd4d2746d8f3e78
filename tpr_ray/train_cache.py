"""Decoded training images: the resized uint8 crops of a dataset's train/val images, written once
by a Ray Data job that reuses the embedding job's decode stage, then read by every epoch of every
run instead of fetching and decoding JPEGs in DataLoader workers.

A cache folder is keyed by the manifest version and the image size
(``decoded-<version>-<H>x<W>``); it holds Parquet files (``image_uri``, ``pixels`` as raw HxWx3
bytes) and, written last, ``_decoded.json``: a folder without it is an interrupted build and is
rebuilt. Training augments the uint8 batches on its device (``transforms.batch_augment``).
Datasets of this project's size fit in memory (CUHK-PEDES: about 6 GB at 384x128);
streaming the cache through ``ray.train.get_dataset_shard`` for larger ones is not done yet.
"""

from __future__ import annotations

import logging
import os
import posixpath

import numpy as np

from tpr_ray import storage
from tpr_ray.errors import DataError

SIDECAR = "_decoded.json"
log = logging.getLogger(__name__)


def cache_dir(root: str, version: str, image_size) -> str:
    h, w = image_size
    return storage.join(root, f"decoded-{version}-{h}x{w}")


def default_root(data_uri: str) -> str:
    """Next to the manifest: the dataset folder itself, or the folder holding a .parquet manifest."""
    data_uri = data_uri.rstrip("/")
    if data_uri.endswith(".parquet"):
        data_uri = posixpath.dirname(data_uri) if "://" in data_uri else os.path.dirname(data_uri)
    return storage.join(data_uri, "_tpr_ray_cache")


def is_complete(target: str) -> bool:
    return storage.exists(storage.join(target, SIDECAR))


def _pixels_to_bytes(batch: dict) -> dict:
    ok = np.array([not r for r in batch["reject_reason"]])
    return {"image_uri": batch["image_uri"][ok],
            "pixels": np.array([p.tobytes() for p in batch["pixels"][ok]], dtype=object)}


def build_cache(uris: list[str], image_size, target: str, *, batch_size: int = 64, decode_cpus: float = 1.0) -> dict:
    """Decode and resize ``uris`` into ``target`` with Ray Data (a running Ray cluster is used)."""
    import pyarrow as pa
    import ray.data

    from tpr_ray.images import decode_batch

    fs, path = storage.filesystem(target)
    if fs.exists(path):
        fs.rm(path, recursive=True)  # an interrupted build: its files are not trusted
    ds = ray.data.from_arrow(pa.table({"image_uri": pa.array(sorted(set(uris)), pa.string())}))
    ds = ds.map_batches(decode_batch, fn_kwargs={"image_size": tuple(image_size)}, batch_size=batch_size,
                        batch_format="numpy", num_cpus=decode_cpus)
    ds = ds.map_batches(_pixels_to_bytes, batch_format="numpy", batch_size=batch_size)
    ds.write_parquet(target)
    count = sum(int(n) for n in storage_rows(target))
    if count != len(set(uris)):
        raise DataError(f"the decoded cache holds {count} of {len(set(uris))} images: some could not be decoded "
                        f"(run training with --bad-images fail to list them)", file=target)
    info = {"images": count, "image_size": list(image_size)}
    storage.write_json(storage.join(target, SIDECAR), info)
    return info


def storage_rows(target: str) -> list[int]:
    import pyarrow.parquet as pq

    fs, path = storage.filesystem(target)
    return [pq.ParquetFile(fs.open(f)).metadata.num_rows for f in sorted(fs.glob(f"{path}/*.parquet"))]


def load_cache(target: str, image_size) -> dict[str, np.ndarray]:
    """{image_uri: HxWx3 uint8} of a complete cache."""
    import pyarrow.parquet as pq

    if not is_complete(target):
        raise DataError("the decoded image cache is incomplete (no sidecar); it is rebuilt by the driver", file=target)
    fs, path = storage.filesystem(target)
    h, w = image_size
    out = {}
    for f in sorted(fs.glob(f"{path}/*.parquet")):
        table = pq.read_table(fs.open(f))
        for uri, data in zip(table.column("image_uri").to_pylist(), table.column("pixels").to_pylist()):
            out[uri] = np.frombuffer(data, dtype=np.uint8).reshape(h, w, 3)
    return out
