"""Training input on CPU: today's per-sample pipeline against the decoded cache, in one run.

    python benchmarks/train_input.py [--ids 60] [--batch 32] [--batches 15] [--steps 200]

Both pipelines run in this process on one thread (``torch.set_num_threads(1)``, no DataLoader
workers), so each rate is samples/s per core:

- today: fetch + PIL decode + resize + per-sample flip/pad-crop/erasing (`CaptionPairs`), then
  batch normalisation, as the DataLoader workers and the loop do it;
- cache: a uint8 gather from the decoded cache in memory + `BatchAugment` on the batch (on a
  GPU the augmentation runs there; here it is CPU time, the worst case). The one-off build
  (decode + resize + write) is reported separately as images/s per core.

Then the same tiny model (tpr-tiny baseline, the same initial weights and the same sampling
order) trains ``--steps`` steps from each pipeline, plus a control run of today's pipeline
with another augmentation seed: the spread between the two runs of today's pipeline is the
noise that the difference between the pipelines is judged against. Prints window means and
standard deviations of the three loss curves and writes everything as JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, DistributedSampler

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tpr_ray.training import decoded_cache
from tpr_ray.methods.backbone import BackboneConfig
from tpr_ray.data import load_manifest, synthesize, write_manifest
from tpr_ray.embedding.inputs import manifest_split
from tpr_ray.methods import get_method
from tpr_ray.training.inputs import CaptionPairs
from tpr_ray.training.optim import build_optimizer
from tpr_ray.model.transforms import normalize

SIZE = (384, 128)
RECIPE = {"lr": 1e-3, "weight_decay": 1e-4, "warmup_epochs": 0}


def todays_batches(rows, labels, batch, seed, epoch=0):
    dataset = CaptionPairs(rows, labels, SIZE, augment=True)
    sampler = DistributedSampler(dataset, num_replicas=1, rank=0, shuffle=True, seed=seed, drop_last=True)
    sampler.set_epoch(epoch)
    for b in DataLoader(dataset, batch_size=batch, sampler=sampler, drop_last=True, num_workers=0):
        yield {**b, "images": normalize(b["image"])}


def cached_batches(cache, rows, labels, batch, seed, epoch=0, augment_here=True):
    pairs = decoded_cache.CachedPairs(cache, rows, labels, batch, 1, 0, seed, "cpu", augment=True)
    if not augment_here:  # what the CPU still does when a GPU augments: the uint8 gather only
        pairs.augment = lambda images: images
    pairs.set_epoch(epoch)
    yield from pairs


def rate(make_batches, n, batch):
    """samples/s over ``n`` batches after the first (set-up), walking through epochs as needed."""
    it = (b for epoch in range(10**6) for b in make_batches(epoch))
    next(it)
    tick = time.perf_counter()
    for _ in range(n):
        next(it)
    return n * batch / (time.perf_counter() - tick)


def train_curve(make_batches, rows, labels, batch, steps, seed, augment_seed):
    cls = get_method("baseline")
    recipe = cls.default_recipe.override(batch_size=batch, **RECIPE)
    torch.manual_seed(seed)
    method = cls(BackboneConfig("tpr-tiny", None, SIZE), recipe, num_classes=len(labels))
    (stage,) = method.stages()
    method.set_stage(stage)
    optimizer = build_optimizer(method, stage)
    torch.manual_seed(augment_seed)  # today's per-sample augmentation draws from the global generator
    method.train()
    losses, epoch = [], 0
    while len(losses) < steps:
        for b in make_batches(epoch):
            out = method({"images": b["images"], "tokens": method.tokenize(b["caption"]),
                          "person_ids": b["person_id"], "labels": b["label"]})
            optimizer.zero_grad(set_to_none=True)
            out["loss"].backward()
            optimizer.step()
            losses.append(float(out["loss"].detach()))
            if len(losses) == steps:
                break
        epoch += 1
    return losses


def windows(curve, size):
    return [(float(np.mean(curve[s:s + size])), float(np.std(curve[s:s + size], ddof=1)))
            for s in range(0, len(curve) - size + 1, size)]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ids", type=int, default=60)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--batches", type=int, default=20, help="batches timed per pipeline")
    parser.add_argument("--steps", type=int, default=150, help="training steps per loss curve")
    parser.add_argument("--window", type=int, default=25)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default="train_input.json")
    args = parser.parse_args()
    torch.set_num_threads(1)

    with tempfile.TemporaryDirectory() as tmp:
        data = synthesize("cuhk", args.ids, args.seed, f"{tmp}/CUHK-PEDES")
        manifest = f"{tmp}/manifest.parquet"
        write_manifest(load_manifest(data), manifest)
        rows = manifest_split(manifest, "train")
        labels = {pid: i for i, pid in enumerate(sorted(set(rows.column("person_id").to_pylist())))}
        n_pairs = sum(len(c) for c in rows.column("captions").to_pylist())
        print(f"synthetic cuhk: {rows.num_rows} train images, {n_pairs} pairs, {len(labels)} ids, "
              f"{SIZE[0]}x{SIZE[1]}, batch {args.batch}, 1 thread")

        tick = time.perf_counter()
        cache = decoded_cache.ensure(manifest, "train", SIZE, f"{tmp}/cache", executor="local")
        build_rate = rows.num_rows / (time.perf_counter() - tick)
        tick = time.perf_counter()
        decoded_cache.load(cache)
        load_rate = rows.num_rows / (time.perf_counter() - tick)

        today = rate(lambda e: todays_batches(rows, labels, args.batch, args.seed, e), args.batches, args.batch)
        cached = rate(lambda e: cached_batches(cache, rows, labels, args.batch, args.seed, e), args.batches,
                      args.batch)
        gather = rate(lambda e: cached_batches(cache, rows, labels, args.batch, args.seed, e, augment_here=False),
                      args.batches, args.batch)
        print(f"input samples/s per core: today {today:.1f}; from the cache with CPU augmentation {cached:.1f} "
              f"({cached / today:.1f}x), uint8 gather only (augmentation on a GPU) {gather:.0f} "
              f"({gather / today:.0f}x); cache build {build_rate:.1f} images/s per core (once), "
              f"load {load_rate:.0f} images/s")

        def today_run(aug_seed):
            return train_curve(lambda e: todays_batches(rows, labels, args.batch, args.seed, e), rows, labels,
                               args.batch, args.steps, args.seed, aug_seed)

        curves = {}
        if args.steps:
            tick = time.perf_counter()
            curves = {
                "today": today_run(1),
                "cache": train_curve(lambda e: cached_batches(cache, rows, labels, args.batch, args.seed, e), rows,
                                     labels, args.batch, args.steps, args.seed, 1),
                "today_other_aug_seed": today_run(2),
            }
            print(f"loss curves: {args.steps} steps x 3 runs in {time.perf_counter() - tick:.0f} s")

    result = {"samples_per_s_per_core": {"today": today, "cache_cpu_augment": cached, "cache_gather_only": gather},
              "speedup": {"cache_cpu_augment": cached / today, "cache_gather_only": gather / today},
              "cache_build_images_per_s_per_core": build_rate, "cache_load_images_per_s": load_rate,
              "settings": vars(args)}
    if curves:
        result.update(compare_curves(curves, args.window))
    with open(args.json, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {args.json}")


def compare_curves(curves: dict, window: int) -> dict:
    stats = {k: windows(v, window) for k, v in curves.items()}
    print(f"\nloss, mean (std) over windows of {window} steps")
    print(f"{'steps':>9}  {'today':>15}  {'cache':>15}  {'today, aug 2':>15}  {'cache-today':>11}  {'today2-today':>12}")
    for w in range(len(stats["today"])):
        (a, sa), (b, sb), (c, sc) = stats["today"][w], stats["cache"][w], stats["today_other_aug_seed"][w]
        print(f"{w * window:>4}-{(w + 1) * window - 1:<4}  {a:8.4f} ({sa:.3f})  {b:8.4f} ({sb:.3f})  "
              f"{c:8.4f} ({sc:.3f})  {b - a:+11.4f}  {c - a:+12.4f}")
    steps = len(curves["today"])
    tail = {k: float(np.mean(v[steps // 2:])) for k, v in curves.items()}
    d_cache = float(np.mean(np.abs(np.asarray(curves["cache"]) - curves["today"])))
    d_noise = float(np.mean(np.abs(np.asarray(curves["today_other_aug_seed"]) - curves["today"])))
    print(f"second half mean loss: today {tail['today']:.4f}, cache {tail['cache']:.4f}, "
          f"today with other augmentation seed {tail['today_other_aug_seed']:.4f}")
    print(f"mean |step loss difference|: cache vs today {d_cache:.4f}; today vs today (other seed) {d_noise:.4f}")
    return {"window": window, "windows": stats, "curves": curves, "second_half_mean": tail,
            "mean_abs_step_diff": {"cache_vs_today": d_cache, "today_vs_today_other_seed": d_noise}}


if __name__ == "__main__":
    main()
