"""The jobs of a cross-dataset matrix: train a (method, training set), embed a test set with
its checkpoint, evaluate a cell. Each receives its real configuration (``TrainConfig``,
``EmbedConfig``, :class:`EvalJob` with the evaluator's ``StreamingSettings``) and declares
the CPUs and GPUs its inner work asks Ray for, derived from that same configuration.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from tpr_ray.io import storage
from tpr_ray.crosseval.scheduler import Job, error_record

if TYPE_CHECKING:
    from tpr_ray.embedding.pipeline import EmbedConfig
    from tpr_ray.evaluation.streaming import StreamingSettings
    from tpr_ray.training.config import TrainConfig


@dataclass(frozen=True)
class EvalJob:
    """One cell's evaluation with the streaming evaluator."""

    embed_dir: str  # holds gallery/ and queries/
    settings: StreamingSettings
    samples: int = 6  # queries shown with their top-K in the HTML report


# --------------------------------------------------------------------------- declared resources


def train_resources(cfg: TrainConfig) -> tuple[float, float]:
    """CPUs / GPUs of the Ray Train workers (``use_gpu`` must be decided, not None)."""
    return cfg.num_workers * cfg.cpus_per_worker, float(cfg.num_workers) if cfg.use_gpu else 0.0


def embed_resources(cfg: EmbedConfig) -> tuple[float, float]:
    """CPUs / GPUs the embedding pipeline needs to make progress: its actor pool plus one decode task."""
    gpus = cfg.actors * (cfg.gpus_per_actor or 0.0)
    return cfg.actors * cfg.cpus_per_actor + cfg.decode_cpus, gpus


def eval_resources(cfg: EvalJob) -> tuple[float, float]:
    """One shard task of the streaming evaluator at a time is enough for it to progress."""
    return cfg.settings.cpus_per_task, cfg.settings.gpus_per_task


RESOURCES: dict[str, Callable[[Any], tuple[float, float]]] = {
    "train": train_resources, "embed": embed_resources, "eval": eval_resources}


def make_job(kind: str, config, done: Callable[[dict], None], label: str) -> Job:
    cpus, gpus = RESOURCES[kind](config)
    return Job(kind, config, cpus=cpus, gpus=gpus, done=done, label=label)


# --------------------------------------------------------------------------- jobs


def train_job(cfg: TrainConfig, address: str | None) -> dict:
    """Train one (method, training set); returns the checkpoint's identity."""
    from tpr_ray.training.driver import train

    tick = time.perf_counter()
    result = train(cfg, address=address)
    return {**checkpoint_identity(result.run_dir), "seconds": time.perf_counter() - tick, "reused": False}


def embed_job(cfg: EmbedConfig, address: str | None) -> dict:
    """Embed one test split with one checkpoint (resumes a partial folder)."""
    import ray.data

    from tpr_ray.embedding.pipeline import embed

    tick = time.perf_counter()
    ray.data.DataContext.get_current().enable_progress_bars = False  # parallel jobs would interleave bars
    summary = embed(cfg, address=address)
    return {"dir": cfg.out, "rows": {k: v["rows"] for k, v in summary.items()},
            "seconds": time.perf_counter() - tick, "reused": False}


def eval_job(cfg: EvalJob, address: str | None) -> dict:
    """Evaluate one cell with the streaming evaluator; returns metrics and report samples."""
    from tpr_ray.evaluation.streaming import evaluate_tables

    tick = time.perf_counter()
    gallery, queries = storage.join(cfg.embed_dir, "gallery"), storage.join(cfg.embed_dir, "queries")
    result = evaluate_tables(gallery, queries, settings=cfg.settings)
    metrics = {k: v for k, v in result.metrics.items() if k not in ("chance", "gallery", "queries")}
    return {"metrics": metrics, "chance": result.metrics["chance"], "timings": result.timings,
            "samples": query_samples(result, gallery, queries, cfg.samples),
            "seconds": time.perf_counter() - tick}


JOBS: dict[str, Callable[[Any, str | None], dict]] = {"train": train_job, "embed": embed_job, "eval": eval_job}


def run_job(kind: str, config, address: str | None = None) -> dict:
    """Run a job and return ``{"ok": True, "result": ...}`` or ``{"ok": False, "error": ...}``."""
    try:
        return {"ok": True, "result": JOBS[kind](config, address)}
    except Exception as exc:  # every failure is recorded with its cell
        return {"ok": False, "error": error_record(kind, exc)}


# --------------------------------------------------------------------------- what the jobs leave


def checkpoint_identity(run_dir: str) -> dict:
    """Best checkpoint of a run: URI, content hash of its weights, epoch, step, val metrics."""
    from tpr_ray.model.checkpoint import BEST_FILE, MODEL_FILE, read_config, resolve_checkpoint

    uri = resolve_checkpoint(run_dir)
    config = read_config(uri)
    best = storage.read_json(storage.join(run_dir, BEST_FILE))
    return {"run_dir": run_dir, "uri": uri, "sha256": _file_sha256(storage.join(uri, MODEL_FILE)),
            "method": config.get("method"), "backbone": config.get("backbone"), "epoch": config.get("epoch"),
            "global_step": config.get("global_step"), "selected_by": best.get("selected_by"),
            "val_metrics": {k: v for k, v in (best.get("metrics") or {}).items() if k.startswith("val_")}}


def _file_sha256(uri: str) -> str:
    digest = hashlib.sha256()
    fs, path = storage.filesystem(uri)
    with fs.open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def embedding_complete(embed_dir: str, checkpoint: str) -> bool:
    """Whether both tables of ``embed_dir`` are complete and were made with ``checkpoint``."""
    from tpr_ray.tables import SIDECAR

    for kind in ("gallery", "queries"):
        sidecar = storage.join(embed_dir, kind, SIDECAR)
        if not storage.exists(sidecar):
            return False
        info = storage.read_json(sidecar)
        if not info.get("complete") or info.get("checkpoint") != checkpoint:
            return False
    return True


def query_samples(result, gallery_uri: str, queries_uri: str, count: int) -> list[dict]:
    """``count`` queries spread over the query table, each with its top-K gallery items."""
    from tpr_ray.tables import list_shards

    num_queries = len(result.top_positions)
    if count <= 0 or num_queries == 0:
        return []
    chosen = np.unique(np.linspace(0, num_queries - 1, min(count, num_queries)).round().astype(int))
    query_fs = [_read_columns(s, ["query_id", "caption", "person_id", "image_id"]) for s in list_shards(queries_uri)]
    queries = {k: sum((t[k] for t in query_fs), []) for k in ("query_id", "caption", "person_id", "image_id")}
    gallery_fs = [_read_columns(s, ["image_id", "image_uri", "person_id"]) for s in list_shards(gallery_uri)]
    gallery = {k: sum((t[k] for t in gallery_fs), []) for k in ("image_id", "image_uri", "person_id")}
    uri_of = dict(zip(gallery["image_id"], gallery["image_uri"]))
    samples = []
    for q in chosen.tolist():
        hits = []
        ranked = zip(result.top_positions[q].tolist(), result.top_scores[q].tolist())
        for rank, (position, score) in enumerate(ranked, 1):
            if position < 0:
                break
            hits.append({"rank": rank, "image_id": gallery["image_id"][position],
                         "image_uri": gallery["image_uri"][position], "person_id": gallery["person_id"][position],
                         "score": round(float(score), 5),
                         "correct": gallery["person_id"][position] == queries["person_id"][q]})
        ranks = result.positive_ranks[q]
        samples.append({"query_index": q, "query_id": queries["query_id"][q], "caption": queries["caption"][q],
                        "person_id": queries["person_id"][q], "image_id": queries["image_id"][q],
                        "image_uri": uri_of.get(queries["image_id"][q]),
                        "positive_ranks": [int(r) for r in ranks[ranks > 0]], "hits": hits})
    return samples


def _read_columns(uri: str, columns: list[str]) -> dict:
    from tpr_ray.tables import read_columns

    return read_columns(uri, columns).to_pydict()
