"""Embedding galleries and queries with Ray Data.

The pipeline is: manifest rows -> CPU decode + resize (tasks) -> the model in an
actor pool (one GPU per actor when the cluster has GPUs, bf16) -> Parquet shards.
Shards are written by this driver in input order under temporary names and then
moved into place, and a sidecar ``_tpr_ray.json`` lists them with the model identity.

Table schemas (one directory each, ``<out>/gallery`` and ``<out>/queries``):

gallery: image_id string, person_id int64, image_uri string,
         embedding fixed_size_list<float32>[dim] (L2-normalised),
         method string, model string, checkpoint string
queries: query_id int64, image_id string, person_id int64, caption string,
         embedding fixed_size_list<float32>[dim] (L2-normalised),
         method string, model string, checkpoint string
"""

from __future__ import annotations

import io
import time
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from tpr_ray import storage
from tpr_ray.checkpoint import load_method, read_config, resolve_checkpoint
from tpr_ray.data import load_manifest
from tpr_ray.errors import ConfigError, DataError
from tpr_ray.transforms import decode_image, resize_uint8

SIDECAR = "_tpr_ray.json"
SPLITS = ("train", "val", "test", "all")


@dataclass
class EmbedConfig:
    checkpoint: str
    data: str
    out: str
    split: str = "test"
    batch_size: int = 64
    actors: int = 1
    gpus_per_actor: float | None = None  # None: 1 when the cluster has GPUs, else 0
    cpus_per_actor: float = 0.5  # fractional, so decode tasks still get CPUs on small nodes
    rows_per_shard: int = 100_000
    block_rows: int = 256
    queries: bool = True


def decode_resize(batch: dict, image_size) -> dict:
    """CPU stage: read each image's bytes, decode to RGB and resize to the model's input."""
    pixels = []
    for image_id, uri in zip(batch["image_id"], batch["image_uri"]):
        try:
            pixels.append(resize_uint8(decode_image(storage.read_bytes(uri)), tuple(image_size)))
        except Exception as exc:
            raise DataError(f"cannot read image {uri}: {exc}", entry=image_id, field="image_uri") from exc
    return {**batch, "pixels": np.stack(pixels)}


class Embedder:
    """Actor: loads the checkpoint once, then embeds batches of pixels or captions."""

    def __init__(self, checkpoint: str, kind: str):
        import torch

        from tpr_ray.inference import encode_captions, encode_images

        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.method, _ = load_method(checkpoint, map_location="cpu")
        self.method.to(self.device)
        self.encode = (lambda b: encode_images(self.method, b["pixels"], self.device)) if kind == "gallery" \
            else (lambda b: encode_captions(self.method, list(b["caption"]), self.device))

    def __call__(self, batch: dict) -> dict:
        out = {k: v for k, v in batch.items() if k != "pixels"}
        out["embedding"] = self.encode(batch)
        return out


def _embedding_array(embeddings: np.ndarray) -> pa.FixedSizeListArray:
    embeddings = np.ascontiguousarray(embeddings, dtype=np.float32)
    return pa.FixedSizeListArray.from_arrays(pa.array(embeddings.reshape(-1)), embeddings.shape[1])


class ShardWriter:
    """Accumulates rows and commits fixed-size Parquet shards atomically, in order."""

    def __init__(self, out: str, kind: str, identity: dict, rows_per_shard: int):
        self.out, self.kind, self.identity, self.rows_per_shard = out, kind, identity, rows_per_shard
        self.pending: list[pa.Table] = []
        self.pending_rows = 0
        self.shards: list[dict] = []
        storage.makedirs(out)

    def add(self, batch: dict) -> None:
        n = len(batch["embedding"])
        columns = {k: batch[k] for k in batch if k != "embedding"}
        table = pa.table({**{k: pa.array(list(v) if v.dtype == object else v) for k, v in columns.items()},
                          "embedding": _embedding_array(batch["embedding"]),
                          **{k: pa.array([self.identity[k]] * n, pa.string()) for k in ("method", "model", "checkpoint")}})
        self.pending.append(table)
        self.pending_rows += n
        while self.pending_rows >= self.rows_per_shard:
            self._commit(self.rows_per_shard)

    def close(self) -> dict:
        if self.pending_rows:
            self._commit(self.pending_rows)
        info = {"kind": self.kind, **self.identity, "rows": sum(s["rows"] for s in self.shards),
                "shards": self.shards, "dtype": "float32"}
        storage.write_json(storage.join(self.out, SIDECAR), info)
        return info

    def _commit(self, rows: int) -> None:
        table = pa.concat_tables(self.pending).combine_chunks()
        shard, rest = table.slice(0, rows), table.slice(rows)
        self.pending, self.pending_rows = ([rest] if rest.num_rows else []), rest.num_rows
        name = f"part-{len(self.shards):05d}.parquet"
        buf = io.BytesIO()
        pq.write_table(shard, buf)
        storage.write_bytes_atomic(storage.join(self.out, name), buf.getvalue())
        self.shards.append({"file": name, "rows": shard.num_rows})


def _rows_for_split(manifest: pa.Table, split: str) -> pa.Table:
    if split not in SPLITS:
        raise ConfigError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    if split == "all":
        return manifest
    mask = pa.compute.equal(manifest.column("split"), split)
    table = manifest.filter(mask)
    if table.num_rows == 0:
        raise DataError(f"no rows in split {split!r}", field="split")
    return table


def query_rows(images: pa.Table) -> pa.Table:
    """One row per caption, numbered in manifest order."""
    image_ids, pids, captions = [], [], []
    for image_id, pid, caps in zip(images.column("image_id").to_pylist(), images.column("person_id").to_pylist(),
                                   images.column("captions").to_pylist()):
        image_ids += [image_id] * len(caps)
        pids += [pid] * len(caps)
        captions += caps
    return pa.table({"query_id": pa.array(np.arange(len(captions), dtype=np.int64)),
                     "image_id": pa.array(image_ids, pa.string()),
                     "person_id": pa.array(pids, pa.int64()),
                     "caption": pa.array(captions, pa.string())})


def _blocks(table: pa.Table, block_rows: int) -> list[pa.Table]:
    return [table.slice(i, block_rows) for i in range(0, table.num_rows, block_rows)]


def embed(cfg: EmbedConfig, address: str | None = None) -> dict:
    """Embed a manifest split's images (and captions) into ``<out>/gallery`` (and ``<out>/queries``)."""
    import ray
    import ray.data

    from tpr_ray.ray_utils import init_ray

    checkpoint = resolve_checkpoint(cfg.checkpoint)
    ckpt_config = read_config(checkpoint)
    identity = {"method": ckpt_config["method"], "model": ckpt_config["backbone"]["model"],
                "checkpoint": checkpoint, "dim": ckpt_config["embed_dim"]}
    images = _rows_for_split(load_manifest(cfg.data), cfg.split)

    init_ray(address)
    ray.data.DataContext.get_current().execution_options.preserve_order = True
    gpus = cfg.gpus_per_actor
    if gpus is None:
        gpus = 1 if ray.cluster_resources().get("GPU", 0) > 0 else 0
    actor_args = dict(compute=ray.data.ActorPoolStrategy(size=cfg.actors), num_gpus=gpus,
                      num_cpus=cfg.cpus_per_actor, batch_size=cfg.batch_size, batch_format="numpy")

    summary = {}
    jobs = [("gallery", images.select(["image_id", "person_id", "image_uri"]))]
    if cfg.queries:
        jobs.append(("queries", query_rows(images)))
    for kind, rows in jobs:
        tick = time.perf_counter()
        ds = ray.data.from_arrow(_blocks(rows, cfg.block_rows))
        if kind == "gallery":
            ds = ds.map_batches(decode_resize, fn_kwargs={"image_size": ckpt_config["backbone"]["image_size"]},
                                num_cpus=0.5,
                                batch_size=cfg.batch_size, batch_format="numpy")
        ds = ds.map_batches(Embedder, fn_constructor_args=(checkpoint, kind), **actor_args)
        writer = ShardWriter(storage.join(cfg.out, kind), kind, {**identity, "split": cfg.split, "data": cfg.data},
                             cfg.rows_per_shard)
        for batch in ds.iter_batches(batch_size=cfg.batch_size, batch_format="numpy"):
            writer.add(batch)
        info = writer.close()
        if info["rows"] != rows.num_rows:
            raise DataError(f"{kind}: wrote {info['rows']} rows for {rows.num_rows} inputs", file=cfg.out)
        info["seconds"] = time.perf_counter() - tick
        summary[kind] = info
    return summary
