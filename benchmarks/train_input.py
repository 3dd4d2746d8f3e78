"""Training input pipeline, samples/s per core: today's (fetch + decode + resize + per-image
augmentation in the loader) against the decoded cache (uint8 batches + batched augmentation).

    PYTHONPATH=. python benchmarks/train_input.py [--ids 100] [--batches 20] [--size 384x128]

Both run in this process on one thread (torch.set_num_threads(1), no loader workers), so each
figure is per core. The cache is filled here with the same decode function the Ray Data job
uses; its one-time decode rate is printed too.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import torch
from torch.utils.data import DataLoader

from tpr_ray import storage
from tpr_ray.data import synthesize
from tpr_ray.images import decode_image, resize_uint8
from tpr_ray.train_data import CachedPairs, CaptionPairs, load_training_data
from tpr_ray.transforms import batch_augment, normalize


def rate(loader, batches: int, finish) -> float:
    it = iter(loader)
    finish(next(it))  # warm-up batch, not timed
    tick, seen = time.perf_counter(), 0
    for _ in range(batches):
        batch = next(it)
        seen += len(finish(batch))
    return seen / (time.perf_counter() - tick)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ids", type=int, default=100)
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--size", default="384x128")
    parser.add_argument("--data", help="an existing dataset folder instead of synthetic CUHK-PEDES style")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    torch.set_num_threads(1)
    size = tuple(int(v) for v in args.size.split("x"))
    data_dir = args.data or synthesize("cuhk", args.ids, 0, os.path.join(tempfile.mkdtemp(), "CUHK-PEDES"))
    data = load_training_data(data_dir, 0.05, 0)
    generator = torch.Generator().manual_seed(0)

    def loader(dataset):
        sampler = torch.utils.data.RandomSampler(dataset, replacement=True, num_samples=10**9, generator=generator)
        return DataLoader(dataset, batch_size=args.batch_size, sampler=sampler, num_workers=0)

    today = rate(loader(CaptionPairs(data.train, data.labels, size, augment=True)), args.batches,
                 lambda b: normalize(b["image"]))

    uris = sorted(set(data.train.column("image_uri").to_pylist()))
    tick = time.perf_counter()
    pixels = {u: resize_uint8(decode_image(storage.read_bytes(u), size), size) for u in uris}
    decode_rate = len(uris) / (time.perf_counter() - tick)
    cached = rate(loader(CachedPairs(data.train, data.labels, pixels)), args.batches,
                  lambda b: batch_augment(b["pixels"], generator=generator))
    # With a GPU the augmentation runs there: the CPU only samples and collates uint8 batches.
    loader_only = rate(loader(CachedPairs(data.train, data.labels, pixels)), args.batches, lambda b: b["pixels"])

    result = {"image_size": list(size), "batch_size": args.batch_size, "train_images": len(uris),
              "today_samples_per_s_per_core": today, "cached_samples_per_s_per_core": cached,
              "speedup": cached / today,
              "cached_loader_only_samples_per_s_per_core": loader_only, "one_time_decode_images_per_s_per_core": decode_rate,
              "torch": torch.__version__, "cpu": os.cpu_count()}
    print(f"input pipeline at {size[0]}x{size[1]}, batch {args.batch_size}, one core:")
    print(f"  today (decode + per-image augment): {today:8.1f} samples/s")
    print(f"  decoded cache + batched augment:   {cached:8.1f} samples/s  ({cached / today:.1f}x)")
    print(f"  decoded cache, augment elsewhere:  {loader_only:8.1f} samples/s  (CPU side when the GPU augments)")
    print(f"  one-time decode into the cache:    {decode_rate:8.1f} images/s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
