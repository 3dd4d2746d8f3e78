"""Decode throughput of the embedding job's CPU stage, per core.

    python benchmarks/decode.py                 # crops and large photos, one process = one core
    python benchmarks/decode.py --crops 2000 --photos 40

Runs `tpr_ray.images.decode_image` + `resize_uint8` (what `decode_batch` does per image, minus
the fetch) on in-memory JPEGs: pedestrian crops of 100x250 to 300x800 pixels (the size range
of CUHK-PEDES) and large photos (4000x3000), at the model input 384x128. Rates are per
CPU-second of this single-threaded process, i.e. images/s per core. Also times the same crops decoded without the
JPEG draft reduction, to show what it buys on large inputs.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from tpr_ray.images import decode_image, resize_uint8  # noqa: E402

TARGET = (384, 128)


def textured(rng, width: int, height: int) -> Image.Image:
    """Smooth colour fields plus noise: JPEG sizes close to real photos (pure noise is far larger)."""
    small = rng.integers(0, 255, (max(height // 16, 2), max(width // 16, 2), 3), dtype=np.uint8)
    img = Image.fromarray(small).resize((width, height), Image.BILINEAR)
    noise = rng.normal(0, 12, (height, width, 3))
    return Image.fromarray(np.clip(np.asarray(img, dtype=np.float32) + noise, 0, 255).astype(np.uint8))


def jpegs(n: int, sizes, seed: int) -> list[bytes]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        width, height = sizes(rng)
        buf = io.BytesIO()
        textured(rng, width, height).save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def rate(images: list[bytes], draft: bool, repeat: int = 1) -> float:
    """Images per CPU-second of this (single-threaded) process: per core, and robust to other
    load on the machine, which wall time is not."""
    tick = time.process_time()
    for _ in range(repeat):
        for data in images:
            resize_uint8(decode_image(data, TARGET if draft else None), TARGET)
    return repeat * len(images) / (time.process_time() - tick)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--crops", type=int, default=1000)
    parser.add_argument("--photos", type=int, default=20)
    parser.add_argument("--json", help="Also write the results here.")
    args = parser.parse_args()

    def crop_size(rng):
        width = int(rng.integers(100, 301))
        return width, int(min(800, max(250, width * rng.uniform(2.0, 3.0))))

    crops = jpegs(args.crops, crop_size, 0)
    photos = jpegs(args.photos, lambda rng: (4000, 3000), 1)
    rate(crops[:50], True)  # warm-up (imports, allocator)
    results = {
        "crops_images_per_s_per_core": rate(crops, True),
        "crops_mean_kib": sum(map(len, crops)) / len(crops) / 1024,
        "photos_4000x3000_images_per_s_per_core": rate(photos, True),
        "photos_without_draft_images_per_s_per_core": rate(photos, False),
    }
    for key, value in results.items():
        print(f"{key:45s} {value:10.1f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
