"""What a training worker reads: the manifest's train/val selection, caption pairs and the
validation metrics used for model selection."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from tpr_ray.io import storage
from tpr_ray.data import load_manifest, manifest_info, selection_split
from tpr_ray.errors import ConfigError, DataError
from tpr_ray.io.images import ImageReadError, UnreadableImage, decode_image, load_pixels, resize_uint8
from tpr_ray.model.encode import encode_captions, encode_images
from tpr_ray.evaluation.metrics import retrieval_metrics_from_embeddings
from tpr_ray.model.transforms import train_augment


@dataclass
class TrainingData:
    """The rows a run trains and selects on, and the class index of each training identity."""

    train: object  # pyarrow.Table
    val: object
    labels: dict[int, int]
    version: str | None = None  # the manifest's content hash, recorded in checkpoints

    @property
    def num_classes(self) -> int:
        return len(self.labels)


def load_training_data(data_uri: str, holdout_fraction: float, seed: int, exclude: list[str] = ()) -> TrainingData:
    """The train/val selection of a dataset, without the images in ``exclude`` (found unreadable)."""
    manifest = load_manifest(data_uri)
    if exclude:
        manifest = manifest.filter(pc.invert(pc.is_in(manifest.column("image_uri"), pa.array(list(exclude), pa.string()))))
    train, val = selection_split(manifest, holdout_fraction=holdout_fraction, seed=seed)
    pids = sorted(set(train.column("person_id").to_pylist()))
    return TrainingData(train, val, {pid: i for i, pid in enumerate(pids)}, manifest_info(manifest).get("version"))


BAD_IMAGE_CHOICES = ("fail", "skip", "off")


def find_unreadable_images(uris: list[str], image_size, threads: int | None = None) -> list[tuple[str, str]]:
    """(uri, reason) of every image that cannot be decoded, checked in parallel before training.

    What counts as unreadable is what the embedding job rejects (`images.load_pixels`); an image
    that could not be fetched now raises DataError instead of being listed."""
    def check(uri):
        try:
            load_pixels(uri, tuple(image_size))
            return None
        except UnreadableImage as exc:
            return uri, exc.reason[:200]
        except ImageReadError as exc:
            raise DataError(f"could not read the image ({exc.reason}); this is not a bad image but a fault "
                            f"of access (permissions, network): fix it and run again", file=uri) from exc

    threads = threads or min(32, 4 * (os.cpu_count() or 1))
    with ThreadPoolExecutor(threads) as pool:
        return [bad for bad in pool.map(check, uris) if bad is not None]


def check_images(data_uri: str, image_size, policy: str, holdout_fraction: float, seed: int) -> list[str]:
    """Decode every train/val image once, before any worker starts. ``policy`` "fail" stops with
    the list of unreadable images, "skip" returns them (training leaves them out), "off" checks nothing."""
    if policy not in BAD_IMAGE_CHOICES:
        raise ConfigError(f"unknown bad-images policy {policy!r}; use {', '.join(BAD_IMAGE_CHOICES)}")
    if policy == "off":
        return []
    train, val = selection_split(load_manifest(data_uri), holdout_fraction=holdout_fraction, seed=seed)
    uris = sorted(set(train.column("image_uri").to_pylist()) | set(val.column("image_uri").to_pylist()))
    bad = find_unreadable_images(uris, image_size)
    if bad and policy == "fail":
        listed = "; ".join(f"{uri} ({reason})" for uri, reason in bad[:10])
        more = f" and {len(bad) - 10} more" if len(bad) > 10 else ""
        raise DataError(f"{len(bad)} of {len(uris)} training images cannot be decoded: {listed}{more}. "
                        f"Fix or remove them, or pass --bad-images skip to train without them", file=data_uri)
    return [uri for uri, _ in bad]


class CaptionPairs(Dataset):
    """One item per (image, caption) pair, as in IRRA: an epoch visits every caption once."""

    def __init__(self, table, labels: dict[int, int], image_size: tuple[int, int], augment: bool):
        self.uris = table.column("image_uri").to_pylist()
        self.pids = table.column("person_id").to_pylist()
        self.items = [(row, cap) for row, caps in enumerate(table.column("captions").to_pylist()) for cap in caps]
        self.labels = labels
        self.image_size = tuple(image_size)
        self.augment = train_augment(self.image_size) if augment else None

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        row, caption = self.items[index]
        image = resize_uint8(decode_image(storage.read_bytes(self.uris[row])), self.image_size)
        x = torch.from_numpy(image).permute(2, 0, 1).float().div_(255.0)
        if self.augment is not None:
            x = self.augment(x)
        pid = self.pids[row]
        return {"image": x, "caption": caption, "person_id": pid, "label": self.labels[pid]}


def pair_loader(data: TrainingData, image_size, augment: bool, batch_size: int, *, rank: int, world: int,
                seed: int, loader_workers: int, pin_memory: bool) -> tuple[DataLoader, DistributedSampler]:
    """This worker's share of every epoch's caption pairs (the global batch is batch_size x world)."""
    dataset = CaptionPairs(data.train, data.labels, image_size, augment=augment)
    if len(dataset) < batch_size * world:
        raise ConfigError(f"{len(dataset)} training pairs cannot fill one global batch of "
                          f"{batch_size} x {world} workers; lower --batch-size")
    sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=seed, drop_last=True)
    loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=True,
                        num_workers=loader_workers, pin_memory=pin_memory, persistent_workers=loader_workers > 0)
    return loader, sampler


def stage_loader(data: TrainingData, recipe, cfg, *, rank: int, world: int, device, cached: tuple | None) -> tuple:
    """(loader, sampler) of a stage: today's per-sample DataLoader, or batches from the decoded
    cache (``cfg.decoded_cache``; in memory, or streamed by Ray Data with ``cfg.decoded_stream``)
    that arrive augmented and normalised on ``device``. ``cached``: the loaded cache, one copy per
    worker for all stages."""
    if cfg.decoded_cache and cfg.decoded_stream:
        import ray.train

        from tpr_ray.training.decoded_cache import StreamedPairs

        pairs = StreamedPairs(ray.train.get_dataset_shard("train"), cfg.decoded_cache, data.train, recipe.batch_size,
                              world, device, recipe.augment, seed=cfg.seed * 1009 + rank)
        return pairs, pairs
    if cfg.decoded_cache:
        from tpr_ray.training.decoded_cache import CachedPairs

        pairs = CachedPairs(cfg.decoded_cache, data.train, data.labels, recipe.batch_size, world, rank, cfg.seed,
                            device, recipe.augment, loaded=cached)
        return pairs, pairs
    return pair_loader(data, cfg.image_size, recipe.augment, recipe.batch_size, rank=rank, world=world,
                       seed=cfg.seed, loader_workers=cfg.loader_workers, pin_memory=torch.device(device).type == "cuda")


def evaluate_split(method, table, image_size, device, batch_size: int = 64) -> dict:
    """Text-to-image metrics of ``method`` on a manifest split (used for model selection)."""
    method.eval()
    uris = table.column("image_uri").to_pylist()
    gallery = []
    for start in range(0, len(uris), batch_size):
        images = np.stack([resize_uint8(decode_image(storage.read_bytes(u)), image_size) for u in uris[start:start + batch_size]])
        gallery.append(encode_images(method, images, device))
    captions, query_pids = [], []
    for pid, caps in zip(table.column("person_id").to_pylist(), table.column("captions").to_pylist()):
        captions += caps
        query_pids += [pid] * len(caps)
    queries = [encode_captions(method, captions[s:s + batch_size], device) for s in range(0, len(captions), batch_size)]
    method.train()
    return retrieval_metrics_from_embeddings(
        np.concatenate(queries), np.concatenate(gallery),
        np.asarray(query_pids), np.asarray(table.column("person_id").to_pylist()),
    )
