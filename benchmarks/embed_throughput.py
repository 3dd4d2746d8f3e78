"""Embedding throughput: the model alone vs the whole pipeline from local disk and from S3.

    python benchmarks/embed_throughput.py                       # tpr-tiny and ViT-S-16, CPU
    python benchmarks/embed_throughput.py --models ViT-B-16 --images 4096 --batch-size 256   # on a GPU node

Prints images/s for (a) the model in a plain in-process loop on pre-decoded uint8 tensors,
(b) `tpr_ray.embedding.pipeline` (Ray Data: read, decode + resize, actor pool, shard commits) reading JPEGs
from local disk, and (c) the same reading from an S3 endpoint (moto's server on loopback),
with the ratios (b)/(a) and (c)/(a), all in one run on the same model and images. The pipeline
figures are whole jobs (Ray Data start-up, actor start-up, model load, planning included). The
marginal columns (b marg, b marg/a) are the rate a long job runs at, with those fixed costs
cancelled: (b) is run again on a quarter of the images, and the rate is the difference in
images over the difference in time. On CPU it also
runs (b) with the model actor left at Ray's default thread count (one OMP thread for a
fractional-CPU actor), the pipeline as it was before the actor took its node's cores: column
(b0). ``--no-s3`` skips (c).
"""

from __future__ import annotations

import argparse
import io
import os
import socket
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("RAY_AUTH_MODE", "disabled")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


PORT = free_port()
os.environ.update(AWS_ENDPOINT_URL=f"http://127.0.0.1:{PORT}", AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench",
                  AWS_DEFAULT_REGION="us-east-1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from tpr_ray.io import storage  # noqa: E402
from tpr_ray.methods.backbone import BackboneConfig  # noqa: E402
from tpr_ray.model.checkpoint import load_method, save_checkpoint  # noqa: E402
from tpr_ray.embedding.pipeline import EmbedConfig, embed  # noqa: E402
from tpr_ray.model.encode import encode_images  # noqa: E402
from tpr_ray.methods import get_method  # noqa: E402


def make_images(n: int, seed: int = 0) -> dict[str, bytes]:
    """Pedestrian-crop-sized JPEGs (a bit larger than the model input, as real crops are)."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 255, (8, 480, 160, 3), dtype=np.uint8)
    out = {}
    for i in range(n):
        buf = io.BytesIO()
        Image.fromarray(np.roll(base[i % 8], i, axis=1)).save(buf, "JPEG", quality=90)
        out[f"cam{i % 4}/{i:06d}.jpg"] = buf.getvalue()
    return out


def model_only(checkpoint: str, n: int, batch: int, device: torch.device) -> float:
    method, _ = load_method(checkpoint)
    method.to(device)
    pixels = torch.randint(0, 255, (batch, 384, 128, 3), dtype=torch.uint8)
    encode_images(method, pixels, device)  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
    tick = time.perf_counter()
    done = 0
    while done < n:
        encode_images(method, pixels, device)
        done += batch
    return done / (time.perf_counter() - tick)


def pipeline(checkpoint: str, images: str, out: str, batch: int, actors: int, ray_default_threads=False) -> float:
    import tpr_ray.embedding.pipeline as embed_module

    saved = embed_module._cpu_threads_per_actor
    if ray_default_threads:
        embed_module._cpu_threads_per_actor = lambda actors: None
    try:
        return images_per_s(checkpoint, images, out, batch, actors)[0]
    finally:
        embed_module._cpu_threads_per_actor = saved


def images_per_s(checkpoint: str, images: str, out: str, batch: int, actors: int) -> tuple[float, float]:
    """(images/s, seconds) of one whole embedding job."""
    tick = time.perf_counter()
    info = embed(EmbedConfig(checkpoint=checkpoint, images=images, out=out, batch_size=batch, actors=actors,
                             rows_per_shard=batch))["gallery"]
    seconds = time.perf_counter() - tick
    return info["rows"] / seconds, seconds


def marginal(checkpoint: str, local: str, names: list[str], out: str, batch: int, actors: int,
             seconds_all: float) -> float:
    """Images/s of the pipeline with its fixed costs cancelled: the same job on a quarter of the
    images (a listing file naming them), and the difference of the two."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    few = names[:max(batch, len(names) // 4)]
    listing = out + "-listing.parquet"  # the images of the small job, as `--images listing.parquet` takes them
    pq.write_table(pa.table({"image_uri": [os.path.join(local, name) for name in few]}), listing)
    _, seconds_few = images_per_s(checkpoint, listing, out, batch, actors)
    return (len(names) - len(few)) / (seconds_all - seconds_few)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="tpr-tiny,ViT-S-16")
    parser.add_argument("--images", type=int, default=512, help="images per measurement (tpr-tiny; x1/4 for larger models)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--actors", type=int, default=1)
    parser.add_argument("--no-s3", action="store_true", help="skip (c), the pipeline reading from S3")
    args = parser.parse_args()

    import boto3
    import ray
    from moto.server import ThreadedMotoServer

    import logging

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # moto logs every request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=PORT, verbose=False)
    server.start()
    boto3.client("s3").create_bucket(Bucket="bench")
    ray.init(include_dashboard=False, log_to_driver=False)
    import ray.data
    ray.data.DataContext.get_current().enable_progress_bars = False
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    work = tempfile.mkdtemp(prefix="tpr-bench-")
    print(f"device {device}, {os.cpu_count()} CPUs, ray {ray.__version__}, torch {torch.__version__}")
    print(f"{'model':<10} {'images':>6} {'(a) model':>10} {'(b0) local':>10} {'(b) local':>10} {'(b marg)':>10} "
          f"{'(c) s3':>10} {'b0/a':>6} {'b/a':>6} {'marg/a':>6} {'c/a':>6}")
    for model in args.models.split(","):
        n = args.images if model == "tpr-tiny" else max(args.batch_size, args.images // 4)
        files = make_images(n)
        local = os.path.join(work, model, "imgs")
        for name, data in files.items():
            os.makedirs(os.path.dirname(os.path.join(local, name)), exist_ok=True)
            with open(os.path.join(local, name), "wb") as f:
                f.write(data)
        fs, _ = storage.filesystem("s3://bench")
        fs.pipe({f"bench/{model}/{name}": data for name, data in files.items()})
        cls = get_method("baseline")
        checkpoint = os.path.join(work, model, "checkpoint")
        save_checkpoint(cls(BackboneConfig(model, None), cls.default_recipe, 10), checkpoint, {})

        a = model_only(checkpoint, n, args.batch_size, device)
        b, seconds_all = images_per_s(checkpoint, local, os.path.join(work, model, "emb-local"), args.batch_size,
                                      args.actors)
        b_steady = marginal(checkpoint, local, sorted(files), os.path.join(work, model, "emb-few"), args.batch_size,
                            args.actors, seconds_all)
        b0 = float("nan")
        if device.type == "cpu":
            b0 = pipeline(checkpoint, local, os.path.join(work, model, "emb-local0"), args.batch_size, args.actors,
                          ray_default_threads=True)
        c = float("nan")
        if not args.no_s3:
            c = pipeline(checkpoint, f"s3://bench/{model}/", f"s3://bench/emb-{model}", args.batch_size, args.actors)
        print(f"{model:<10} {n:>6} {a:>10.1f} {b0:>10.1f} {b:>10.1f} {b_steady:>10.1f} {c:>10.1f} {b0 / a:>6.2f} "
              f"{b / a:>6.2f} {b_steady / a:>6.2f} {c / a:>6.2f}", flush=True)
    ray.shutdown()
    server.stop()


if __name__ == "__main__":
    main()
