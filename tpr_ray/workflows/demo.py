"""`tpr-ray demo`: the whole pipeline on synthetic data with a tiny CLIP, on CPU.

Synthesize a CUHK-PEDES-format dataset, train the baseline from random init with
Ray Train, embed the test split with Ray Data, evaluate, compare with chance, and index the
gallery so that `tpr-ray search` works on it right away.
The tiny model starts from scratch, so training applies its from-scratch recipe rule
(`train_run.FROM_SCRATCH_RECIPE`); the demo only picks a small batch and a short schedule.
"""

from __future__ import annotations

import os
import shutil
import time

from tpr_ray.io import storage
from tpr_ray.data import load_manifest, split_stats, synthesize
from tpr_ray.embedding.pipeline import EmbedConfig, embed
from tpr_ray.evaluation.evaluate import evaluate
from tpr_ray.evaluation.in_memory import format_metrics_table, write_metrics_json
from tpr_ray.index.faiss_index import build_index
from tpr_ray.training.config import TrainConfig
from tpr_ray.training.driver import train

DEMO_OVERRIDES = {"batch_size": 32}


def run_demo(out: str, n_ids: int = 200, epochs: int = 20, seed: int = 0, echo=print) -> dict:
    tick = time.perf_counter()
    # Ray Train polls its workers every 2 s by default; on a short run that wait is a good part of
    # the fixed cost of a fit (measured: about half). Only for the demo's own local cluster.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
    out = os.path.abspath(out)
    data_dir = os.path.join(out, "data", "cuhk")
    if not os.path.exists(os.path.join(data_dir, "reid_raw.json")):
        # The annotation file is written last: without it, a folder is from an interrupted run.
        shutil.rmtree(data_dir, ignore_errors=True)
        synthesize("cuhk", n_ids, seed, data_dir)
    stats = split_stats(load_manifest(data_dir))
    echo(f"[demo] synthetic CUHK-PEDES-format data in {data_dir}: "
         + "; ".join(f"{s} {v['ids']} ids / {v['images']} images / {v['captions']} captions" for s, v in stats.items()))

    runs = os.path.join(out, "runs")
    if os.path.exists(os.path.join(runs, "demo")):
        shutil.rmtree(os.path.join(runs, "demo"))  # the demo always trains afresh
    result = train(TrainConfig(
        method="baseline", data=data_dir, out=runs, name="demo", model="tpr-tiny", pretrained=None,
        overrides={**DEMO_OVERRIDES, "epochs": epochs}, num_workers=1, loader_workers=1, log_every=50, seed=seed,
    ))
    echo(f"[demo] trained in {time.perf_counter() - tick:.0f}s so far; best checkpoint {result.best_checkpoint}")

    emb_dir = os.path.join(out, "embeddings")
    if os.path.exists(emb_dir):
        shutil.rmtree(emb_dir)
    embed(EmbedConfig(checkpoint=result.run_dir, data=data_dir, out=emb_dir, split="test", batch_size=64))
    metrics = evaluate(storage.join(emb_dir, "gallery"), storage.join(emb_dir, "queries"))
    write_metrics_json(metrics, os.path.join(out, "metrics.json"))
    echo(f"[demo] test split, text-to-image ({metrics['num_queries']} queries, {metrics['num_gallery']} images):")
    echo(format_metrics_table(metrics, chance=metrics["chance"]))
    index_dir = os.path.join(out, "index")
    if os.path.exists(index_dir):
        shutil.rmtree(index_dir)
    build_index(storage.join(emb_dir, "gallery"), index_dir)
    echo(f"[demo] R1 {metrics['R1']:.2f} vs chance {metrics['chance']['R1']:.2f} "
         f"({metrics['R1'] / max(metrics['chance']['R1'], 1e-9):.1f}x); total {time.perf_counter() - tick:.0f}s")
    caption = _a_test_caption(data_dir)
    for line in look_further(out, caption):
        echo(line)
    return metrics


def _a_test_caption(data_dir: str) -> str:
    table = load_manifest(data_dir)
    for split, captions in zip(table.column("split").to_pylist(), table.column("captions").to_pylist()):
        if split == "test" and captions:
            return captions[0]
    return "a person in a red jacket"


def look_further(out: str, caption: str) -> list[str]:
    """The commands that show more of what the demo made."""
    return [
        "[demo] look further:",
        f'  tpr-ray search --index {out}/index --top 5 "{caption}"',
        f"  tpr-ray eval --embeddings {out}/embeddings --k 1,5,10,20",
        f"  tpr-ray crosseval --out {out}/crosseval      # 3 synthetic styles; HTML report in {out}/crosseval/report/",
        f"  logs of Ray, Ray Train and Ray Data: {out}/tpr-ray-demo.log",
    ]
