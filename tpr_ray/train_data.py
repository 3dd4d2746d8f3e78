"""What a training worker reads: the manifest's train/val selection, caption pairs and the
validation metrics used for model selection."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from tpr_ray import storage
from tpr_ray.data import load_manifest, manifest_info, selection_split
from tpr_ray.errors import ConfigError
from tpr_ray.images import decode_image, resize_uint8
from tpr_ray.inference import encode_captions, encode_images
from tpr_ray.metrics import retrieval_metrics_from_embeddings
from tpr_ray.transforms import train_augment


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


def load_training_data(data_uri: str, holdout_fraction: float, seed: int) -> TrainingData:
    manifest = load_manifest(data_uri)
    train, val = selection_split(manifest, holdout_fraction=holdout_fraction, seed=seed)
    pids = sorted(set(train.column("person_id").to_pylist()))
    return TrainingData(train, val, {pid: i for i, pid in enumerate(pids)}, manifest_info(manifest).get("version"))


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
