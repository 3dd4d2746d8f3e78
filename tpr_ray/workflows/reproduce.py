"""`tpr-ray reproduce`: one method's paper recipe on one dataset, next to the paper's numbers.

train (the method's default recipe: the paper's) -> embed the test split -> evaluate, then
a table of R@1/R@5/R@10/mAP against the published ones (``methods/published.py``) with the
difference. Re-running with the same ``out`` continues: training resumes from its latest
checkpoint and the embedding job from its committed shards.

``smoke=True`` checks the whole chain in a minute on CPU: a small synthetic dataset (unless
``data`` is given), the tiny random-weight model and a few optimizer steps. Its numbers mean
nothing; the published ones are shown against the synthetic data's style.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field

from tpr_ray.io import storage
from tpr_ray.data import detect_format, load_manifest, manifest_info, synthesize
from tpr_ray.errors import ConfigError
from tpr_ray.methods import get_method
from tpr_ray.methods.published import METRICS, published

SMOKE_IDS = 16
SMOKE_OVERRIDES = {"epochs": 1, "batch_size": 8, "warmup_epochs": 0, "lr": 1e-4}
SMOKE_STEPS = 3
RESULT_FILE = "reproduce.json"


@dataclass
class ReproduceConfig:
    method: str
    data: str | None
    out: str
    smoke: bool = False
    model: str = "ViT-B-16"
    pretrained: str | None = "openai"
    overrides: dict = field(default_factory=dict)
    workers: int = 1
    use_gpu: bool | None = None
    loader_workers: int = 2
    seed: int = 0


def dataset_of(data: str) -> str:
    """The format key ("cuhk", "icfg", "rstp") of a dataset folder or manifest."""
    if data.endswith(".parquet"):
        name = manifest_info(load_manifest(data)).get("dataset")
        if name is None:
            raise ConfigError(f"manifest {data} does not record its dataset; pass the dataset folder instead")
        return name
    return detect_format(data)


def _smoke_overrides(method: str) -> dict:
    recipe = get_method(method).default_recipe.to_dict()
    extra = {k: v for k, v in (("stage1_epochs", 1), ("stage1_warmup_epochs", 0)) if k in recipe}
    return {**SMOKE_OVERRIDES, **extra}


def comparison(metrics: dict, method: str, dataset: str) -> dict:
    """{source, rows: [{metric, ours, published, difference}]}; missing published values stay None."""
    source, paper = published(method, dataset)
    rows = []
    for name in METRICS:
        ours, theirs = float(metrics[name]), paper.get(name)
        rows.append({"metric": name, "ours": ours, "published": theirs,
                     "difference": None if theirs is None else ours - theirs})
    return {"source": source, "rows": rows}


def format_comparison(table: dict, method: str, dataset: str) -> str:
    def cell(value):
        return "-" if value is None else f"{value:.2f}"

    lines = [f"{method} on {dataset} (test, text-to-image, %); published: {table['source']}",
             f"{'metric':<7} {'ours':>7} {'paper':>7} {'diff':>7}"]
    for row in table["rows"]:
        diff = row["difference"]
        lines.append(f"{row['metric']:<7} {cell(row['ours']):>7} {cell(row['published']):>7} "
                     f"{'-' if diff is None else f'{diff:+.2f}':>7}")
    return "\n".join(lines)


def reproduce(cfg: ReproduceConfig, address: str | None = None, echo=print) -> dict:
    from tpr_ray.embedding.pipeline import EmbedConfig, embed
    from tpr_ray.evaluation.evaluate import evaluate
    from tpr_ray.training.config import TrainConfig
    from tpr_ray.training.driver import train

    tick = time.perf_counter()
    get_method(cfg.method)  # an unknown method fails before anything starts
    out = cfg.out if storage.is_remote(cfg.out) else os.path.abspath(cfg.out)
    data, model, pretrained, overrides, max_steps = cfg.data, cfg.model, cfg.pretrained, dict(cfg.overrides), None
    if cfg.smoke:
        if data is None:
            data = os.path.join(out, "smoke-data", "CUHK-PEDES")
            if not storage.exists(storage.join(data, "reid_raw.json")):
                synthesize("cuhk", SMOKE_IDS, cfg.seed, data)
        model, pretrained, max_steps = "tpr-tiny", None, SMOKE_STEPS
        overrides = {**_smoke_overrides(cfg.method), **overrides}
    if data is None:
        raise ConfigError("reproduce needs --data (a CUHK-PEDES, ICFG-PEDES or RSTPReid folder), or --smoke")
    dataset = dataset_of(data)

    runs = storage.join(out, "runs")
    run_dir = storage.join(runs, cfg.method)
    resume = storage.exists(run_dir)
    echo(f"[reproduce] {cfg.method} on {dataset}: {'resuming' if resume else 'training'} {run_dir}")
    result = train(TrainConfig(method=cfg.method, data=data, out=runs, name=cfg.method, model=model,
                               pretrained=pretrained, overrides=overrides, num_workers=cfg.workers,
                               use_gpu=cfg.use_gpu, loader_workers=cfg.loader_workers, max_steps=max_steps,
                               seed=cfg.seed, resume=resume), address=address)
    embeddings = storage.join(out, "embeddings", cfg.method)
    echo(f"[reproduce] embedding the test split with {result.best_checkpoint}")
    embed(EmbedConfig(checkpoint=result.run_dir, data=data, out=embeddings, split="test"), address=address)
    metrics = evaluate(storage.join(embeddings, "gallery"), storage.join(embeddings, "queries"))
    table = comparison(metrics, cfg.method, dataset)
    report = {"method": cfg.method, "dataset": dataset, "data": data, "smoke": cfg.smoke, "run": result.run_dir,
              "checkpoint": result.best_checkpoint, "recipe": get_method(cfg.method).default_recipe.override(
                  **overrides).to_dict(), "metrics": {k: metrics[k] for k in METRICS}, "comparison": table,
              "seconds": time.perf_counter() - tick}
    storage.write_json(storage.join(out, RESULT_FILE), json.loads(json.dumps(report, default=str)))
    echo(format_comparison(table, cfg.method, dataset))
    echo(f"[reproduce] {time.perf_counter() - tick:.0f}s; results in {storage.join(out, RESULT_FILE)}")
    return report
