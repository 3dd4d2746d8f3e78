"""What a cross-dataset matrix has to do: resolve its datasets and recipes, build each
training run's ``TrainConfig``, and key every run and cell by a hash of its configuration.

Keys make re-runs cheap: a cell whose result file says ``ok`` is skipped, a run directory
with a ``best.json`` is a checkpoint to reuse, a complete embedding folder is reused.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from tpr_ray.io import storage
from tpr_ray.methods.backbone import DEFAULT_IMAGE_SIZE
from tpr_ray.crosseval.scheduler import error_record
from tpr_ray.data import registry as datasets_registry
from tpr_ray.data.registry import SYNTHETIC_STYLES, Dataset, child_path, safe_name
from tpr_ray.errors import ConfigError, DataError

if TYPE_CHECKING:
    from tpr_ray.training.config import TrainConfig

# A random-init tiny CLIP on synthetic data needs a from-scratch learning rate and a few epochs.
TINY_MODEL = "tpr-tiny"
SYNTHETIC_EPOCHS = 6
# The tiny synthetic setup; lr, warm-up and weight decay come from training's rule for a random backbone.
SYNTHETIC_BASE = {"batch_size": 32, "epochs": SYNTHETIC_EPOCHS}
TEST_SPLIT = "test"
# Bump when a change to the evaluation changes the numbers: every cell is then recomputed.
EVAL_VERSION = 1


@dataclass
class CrossEvalConfig:
    """One cross-evaluation matrix and how to run it."""

    out: str
    methods: Sequence[str] = ("baseline",)
    train: Sequence[str] = SYNTHETIC_STYLES
    test: Sequence[str] = SYNTHETIC_STYLES
    registry: str | None = None
    model: str | None = None  # None: tpr-tiny when every training set is synthetic, else ViT-B-16
    pretrained: str | None = "default"  # "default": none for tpr-tiny, else openai; None = random init
    image_size: tuple[int, int] = DEFAULT_IMAGE_SIZE
    overrides: dict = field(default_factory=dict)  # recipe overrides for every method
    max_steps: int | None = None
    num_workers: int = 1
    cpus_per_worker: float = 1.0
    use_gpu: bool | None = None
    loader_workers: int = 1
    seed: int = 0
    synthetic_ids: int = 200
    embed_batch_size: int = 64
    rows_per_shard: int = 10_000
    ks: Sequence[int] = (1, 5, 10)
    top_k: int = 10
    block_size: int = 1024
    samples: int = 6  # queries per cell shown with their top-K in the HTML report
    max_parallel: int | None = None  # jobs at a time; default: as many as the declared resources allow
    mlflow: str | None = None  # MLflow tracking URI: one MLflow run per training cell (default: MLFLOW_TRACKING_URI)
    allow_uri_prefixes: Sequence[str] = ()  # more places manifests' images may be (see tpr_ray.data.uris)
    use_ray: bool = True  # False: run the jobs one by one in this process (tests, debugging)


def config_key(obj) -> str:
    """sha256 of a JSON-able configuration (sorted keys): the identity of a result."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def backbone_choice(cfg: CrossEvalConfig, datasets: Sequence[Dataset]) -> tuple[str, str | None, dict]:
    """(model, pretrained, base recipe overrides) for these training sets: the tiny
    from-scratch setup when they are all synthetic, else ViT-B-16 with OpenAI weights."""
    all_synthetic = bool(datasets) and all(d.synthetic for d in datasets)
    model = cfg.model or (TINY_MODEL if all_synthetic else "ViT-B-16")
    pretrained = cfg.pretrained
    if pretrained == "default":
        pretrained = None if model == TINY_MODEL else "openai"
    if isinstance(pretrained, str) and pretrained.lower() == "none":
        pretrained = None
    from tpr_ray.training.driver import from_scratch_overrides

    base = dict(SYNTHETIC_BASE) if model == TINY_MODEL and pretrained is None else {}
    base, _ = from_scratch_overrides(pretrained, None, base)
    return model, pretrained, base


def check_method_names(methods: Sequence[str]) -> None:
    """Method names become run, embedding, cell and heatmap file names: plain names only."""
    for method in methods:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_-]*", method):
            raise ConfigError(f"method name {method!r} is not a plain name (letters, digits, '_', '-'); "
                              "see `tpr-ray crosseval --help` for the methods")


def train_identity(cfg: TrainConfig) -> dict:
    """The fields of a training configuration that change its checkpoint (besides recipe and data)."""
    return {"method": cfg.method, "model": cfg.model, "pretrained": cfg.pretrained,
            "image_size": list(cfg.image_size), "max_steps": cfg.max_steps, "seed": cfg.seed,
            "num_workers": cfg.num_workers}


@dataclass
class TrainPlan:
    method: str
    train: dict  # dataset_version() of the training set
    key: str
    config: TrainConfig  # use_gpu and resume are decided when the job is submitted
    checkpoint: dict | None = None  # filled when trained or reused
    cells: list = field(default_factory=list)

    @property
    def run_dir(self) -> str:
        return storage.join(self.config.out, self.config.run_name())

    @property
    def recipe(self) -> dict:
        return self.config.overrides


@dataclass
class CellPlan:
    method: str
    train_name: str
    test_name: str
    key: str
    path: str
    train_plan: TrainPlan | None
    test: dict | None
    embed_dir: str | None = None
    error: dict | None = None
    record: dict | None = None
    embed: dict = field(default_factory=dict)


def plan(cfg: CrossEvalConfig) -> tuple[list[TrainPlan], list[CellPlan]]:
    """Resolve datasets and recipes and key every training run and cell.

    A dataset or method that cannot be resolved fails the cells that need it (with the
    error), not the matrix.
    """
    from tpr_ray.methods import get_method
    from tpr_ray.training.config import TrainConfig

    check_method_names(cfg.methods)
    out = cfg.out if storage.is_remote(cfg.out) else os.path.abspath(cfg.out)
    registry = datasets_registry.load_registry(cfg.registry)
    specs = list(dict.fromkeys([*cfg.train, *cfg.test]))
    datasets, dataset_errors = {}, {}
    for spec in specs:
        try:
            datasets[spec] = datasets_registry.resolve_dataset(spec, registry, cfg.synthetic_ids, cfg.seed)
        except (ConfigError, DataError) as exc:
            dataset_errors[spec] = error_record("plan", exc)
    # The backbone follows the training data: synthetic training sets get the tiny model.
    model, pretrained, base_overrides = backbone_choice(cfg, [datasets[s] for s in cfg.train if s in datasets])
    versions = {}
    for spec, dataset in datasets.items():
        try:
            versions[spec] = datasets_registry.dataset_version(datasets_registry.materialise(dataset, out))
        except Exception as exc:  # any unreadable dataset fails only its cells
            dataset_errors[spec] = error_record("plan", exc)
    names = {spec: (datasets[spec].name if spec in datasets else safe_name(spec)) for spec in specs}

    eval_settings = {"ks": sorted(set(int(k) for k in cfg.ks)), "split": TEST_SPLIT, "eval_version": EVAL_VERSION}
    trains, cells = [], []
    for method in cfg.methods:
        method_error, recipe = None, None
        try:
            recipe = get_method(method).default_recipe.override(**{**base_overrides, **cfg.overrides}).to_dict()
        except Exception as exc:  # a method that does not load fails its cells only
            method_error = error_record("plan", exc)
        for train_spec in cfg.train:
            train_plan = None
            error = method_error or dataset_errors.get(train_spec)
            train_key = None
            if error is None:
                train_config = TrainConfig(
                    method=method, data=versions[train_spec]["root"], out=child_path(out, "runs"), model=model,
                    pretrained=pretrained, image_size=tuple(cfg.image_size), overrides=recipe,
                    num_workers=cfg.num_workers, use_gpu=cfg.use_gpu, cpus_per_worker=cfg.cpus_per_worker,
                    loader_workers=cfg.loader_workers, max_steps=cfg.max_steps, seed=cfg.seed, mlflow=cfg.mlflow)
                train_key = config_key({**train_identity(train_config), "recipe": recipe,
                                        "data": versions[train_spec]["version"]})
                train_config.name = f"{method}-{names[train_spec]}-{train_key[:10]}"
                child_path(train_config.out, train_config.name)
                train_plan = TrainPlan(method, versions[train_spec], train_key, train_config)
                trains.append(train_plan)
            for test_spec in cfg.test:
                test_error = error or dataset_errors.get(test_spec)
                key = config_key({"train": train_key, "test": versions.get(test_spec, {}).get("version"),
                                  **eval_settings}) if test_error is None else config_key(
                    {"method": method, "train": train_spec, "test": test_spec, "unresolved": True})
                name = f"{method}__{names[train_spec]}__{names[test_spec]}-{key[:12]}.json"
                cell = CellPlan(method, names[train_spec], names[test_spec], key, child_path(out, "cells", name),
                                train_plan if test_error is None else None, versions.get(test_spec),
                                error=test_error)
                if test_error is None:
                    embed_key = config_key({"train": train_key, "test": versions[test_spec]["version"],
                                            "split": TEST_SPLIT, "rows_per_shard": cfg.rows_per_shard})
                    cell.embed_dir = child_path(out, "embeddings", train_config.name,
                                                f"{names[test_spec]}-{embed_key[:10]}")
                    train_plan.cells.append(cell)
                cells.append(cell)
    return trains, cells
