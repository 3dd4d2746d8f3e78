"""Decode throughput of the embedding job's CPU stage, per core.

    python benchmarks/decode.py                 # crops and large photos, one process = one core
    python benchmarks/decode.py --crops 2000 --photos 40

Runs `tpr_ray.io.images.decode_pixels` (what `decode_batch` does per image, minus the fetch) into
a batch array on in-memory JPEGs: pedestrian crops of 100x250 to 300x800 pixels (the size range
of CUHK-PEDES) and large photos (4000x3000), at the model input 384x128. Rates are per
CPU-second of this single-threaded process, i.e. images/s per core. In the same run:

- ``before``: the decode stage as it was before the copies were removed (EXIF transpose and RGB
  conversion each copying, then a copy out and another into the batch), for a before/after;
- the large photos decoded without the JPEG draft reduction, to show what the draft buys;
- torchvision's JPEG decoder + torch's antialiased bicubic resize on the CPU (what
  `tpr_ray.io.gpu_decode` runs on the GPU), and the bytes that cross the object store per image
  when the GPU decodes (the JPEG) instead of the CPU (the 384x128x3 pixels).
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
from PIL import Image, ImageOps  # noqa: E402

from tpr_ray.io.images import decode_pixels  # noqa: E402

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


def previous_path(data: bytes, size, draft: bool, out: np.ndarray) -> None:
    """The decode stage before this change, step for step (kept here for the before/after)."""
    img = Image.open(io.BytesIO(data))
    if draft and img.format == "JPEG":
        img.draft("RGB", (size[1], size[0]))
    img.load()
    img = ImageOps.exif_transpose(img)
    img = img.convert("RGB")
    if img.size != (size[1], size[0]):
        img = img.resize((size[1], size[0]), Image.BICUBIC)
    out[...] = np.array(img, dtype=np.uint8)


def current_path(data: bytes, size, draft: bool, out: np.ndarray) -> None:
    if draft:
        decode_pixels(data, size, out)
    else:  # the draft only applies with a target size: decode whole, then resize
        from tpr_ray.io.images import decode_image, resize_uint8

        resize_uint8(decode_image(data), size, out)


def torch_path(data: bytes, size, draft: bool, out: np.ndarray) -> None:
    import torch
    from torchvision.io import ImageReadMode, decode_jpeg

    from tpr_ray.io.gpu_decode import resize_on_device

    chw = decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
    out[...] = resize_on_device(chw, size).numpy()


def rate(images: list[bytes], draft: bool = True, path=current_path, repeat: int = 1) -> float:
    """Images per CPU-second of this (single-threaded) process: per core, and robust to other
    load on the machine, which wall time is not."""
    out = np.zeros((*TARGET, 3), np.uint8)
    tick = time.process_time()
    for _ in range(repeat):
        for data in images:
            path(data, TARGET, draft, out)
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
    import torch

    torch.set_num_threads(1)  # per core, like the Pillow paths
    for path in (current_path, previous_path, torch_path):
        rate(crops[:50], path=path)  # warm-up (imports, allocator)
    results = {
        "crops_before_images_per_s_per_core": rate(crops, path=previous_path),
        "crops_images_per_s_per_core": rate(crops),
        "crops_torchvision_decode_images_per_s_per_core": rate(crops, path=torch_path),
        "crops_mean_jpeg_kib": sum(map(len, crops)) / len(crops) / 1024,
        "pixels_kib_per_image": TARGET[0] * TARGET[1] * 3 / 1024,
        "photos_4000x3000_before_images_per_s_per_core": rate(photos, path=previous_path),
        "photos_4000x3000_images_per_s_per_core": rate(photos),
        "photos_without_draft_images_per_s_per_core": rate(photos, False),
    }
    for key, value in results.items():
        print(f"{key:50s} {value:10.1f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
