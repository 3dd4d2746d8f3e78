"""Cross-dataset generalisation: every method x training set x test set, on a Ray cluster.

``crosseval(config)`` trains each (method, training set), or reuses the checkpoint an
earlier run left for the same configuration, embeds each test split once per checkpoint,
evaluates every cell (in-domain ones included) with the streaming evaluator, and writes a
report. What runs is a small job graph driven from here:

    train (method, train set) -> embed (checkpoint, test set) -> eval (cell)

Each job is a Ray task that declares no CPU itself, because the work inside it declares
its own: the Ray Train workers (``num_workers`` x ``cpus_per_worker``, a GPU each when the
cluster has them), the Ray Data actor and decode tasks of the embedder, the shard tasks of
the evaluator. The driver admits a job only when the CPUs and GPUs its inner work
declares fit beside the jobs already running, so nested trainers and Ray Data pipelines
never wait on each other for CPUs (an over-subscribed Ray Data pipeline can hang, see
RAY_NOTES). On a 2-CPU machine that is two trainings, or two embeddings, at a time.

Everything is keyed by hashes of the configuration: a cell whose result file says ``ok``
is skipped on a re-run; a run directory with a ``best.json`` is a checkpoint to reuse; a
complete embedding folder is reused. A failing job marks its cells failed, with the
error, and the others go on.

Output folder::

    data/<name>/                                synthetic datasets, generated on first use
    runs/<method>-<train>-<key>/                training runs (Ray Train storage)
    embeddings/<method>-<train>-<key>/<test>-<key>/{gallery,queries}/
    cells/<method>__<train>__<test>-<key>.json  one result per cell
    report/                                     matrix.csv, matrix.md, heatmap-<method>.png, index.html
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import logging
import os
import re
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import pyarrow.parquet as pq

from tpr_ray import storage
from tpr_ray.backbone import DEFAULT_IMAGE_SIZE
from tpr_ray.errors import ConfigError, DataError
from tpr_ray.report import write_cell_json, write_report

log = logging.getLogger(__name__)

# Built-in dataset names: synthetic data in the three real formats (see tpr_ray.data.synth).
SYNTHETIC_STYLES = ("cuhk", "icfg", "rstp")
# A random-init tiny CLIP needs a from-scratch recipe (the demo's) and a few epochs.
TINY_MODEL = "tpr-tiny"
SYNTHETIC_EPOCHS = 6
TEST_SPLIT = "test"
# Bump when a change to the evaluation changes the numbers: every cell is then recomputed.
EVAL_VERSION = 1


# --------------------------------------------------------------------------- datasets


@dataclass(frozen=True)
class Dataset:
    """A dataset by name: a folder or URI in a real format, or a synthetic style to generate."""

    name: str
    root: str | None = None
    synthetic: str | None = None  # style; the data is generated into OUT/data/<name> on first use
    ids: int = 200
    seed: int = 0

    def describe(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


def load_registry(path: str | None) -> dict[str, Dataset]:
    """Named datasets from a JSON registry file; ``{}`` for ``None``.

    Format (relative roots are taken from the registry file's folder)::

        {"datasets": {
            "cuhk": {"root": "/data/CUHK-PEDES"},
            "rstp": "s3://bucket/RSTPReid",
            "tiny-icfg": {"synthetic": "icfg", "ids": 60, "seed": 1}}}
    """
    if path is None:
        return {}
    try:
        raw = storage.read_json(path)
    except FileNotFoundError:
        raise ConfigError(f"dataset registry {path} not found; pass a JSON file (see `tpr-ray crosseval --help`)") \
            from None
    except json.JSONDecodeError as error:
        raise DataError(f"not valid JSON: {error}", file=path) from None
    entries = raw.get("datasets", raw) if isinstance(raw, dict) else None
    if not isinstance(entries, dict):
        raise DataError('expected {"datasets": {name: {"root": ...}}}', file=path)
    base = os.path.dirname(os.path.abspath(path)) if not storage.is_remote(path) else path.rsplit("/", 1)[0]
    registry = {}
    for name, entry in entries.items():
        if isinstance(entry, str):
            entry = {"root": entry}
        if not isinstance(entry, dict) or ("root" in entry) == ("synthetic" in entry):
            raise DataError('each dataset needs exactly one of "root" (a folder or URI) or "synthetic" (a style)',
                            file=path, entry=name)
        unknown = set(entry) - {"root", "synthetic", "ids", "seed"}
        if unknown:
            raise DataError(f"unknown keys {sorted(unknown)}; use root, synthetic, ids, seed", file=path, entry=name)
        if "synthetic" in entry and entry["synthetic"] not in SYNTHETIC_STYLES:
            raise DataError(f"unknown synthetic style {entry['synthetic']!r}; use {', '.join(SYNTHETIC_STYLES)}",
                            file=path, entry=name, field="synthetic")
        root = entry.get("root")
        if root is not None and "://" not in root and not os.path.isabs(root):
            root = storage.join(base, root)
        registry[name] = Dataset(_safe_name(name), root=root, synthetic=entry.get("synthetic"),
                                 ids=int(entry.get("ids", 200)), seed=int(entry.get("seed", 0)))
    return registry


def resolve_dataset(spec: str, registry: dict[str, Dataset], synthetic_ids: int = 200, seed: int = 0) -> Dataset:
    """A registry name, a built-in synthetic name (cuhk, icfg, rstp), or a folder / URI."""
    if spec in registry:
        return registry[spec]
    if spec in SYNTHETIC_STYLES:
        return Dataset(spec, synthetic=spec, ids=synthetic_ids, seed=seed)
    if "://" in spec or os.path.sep in spec or os.path.exists(spec):
        root = spec if "://" in spec else os.path.abspath(spec)
        return Dataset(_safe_name(os.path.basename(spec.rstrip("/")).replace(".parquet", "")), root=root)
    known = sorted(set(registry) | set(SYNTHETIC_STYLES))
    raise ConfigError(f"unknown dataset {spec!r}: not in the registry ({', '.join(known)}) and not a folder or URI")


def materialise(dataset: Dataset, out: str) -> Dataset:
    """The dataset with a root: synthetic ones are generated into ``OUT/data/<name>`` once."""
    if dataset.root is not None:
        return dataset
    from tpr_ray.data import synthesize

    root = storage.join(out, "data", f"{dataset.name}-{dataset.synthetic}-{dataset.ids}ids-seed{dataset.seed}")
    if not storage.exists(root) or not _has_annotations(root):
        if storage.exists(root):  # an interrupted generation: start it over
            fs, path = storage.filesystem(root)
            fs.rm(path, recursive=True)
        log.info("generating synthetic %s data (%d identities) in %s", dataset.synthetic, dataset.ids, root)
        tmp = root + ".partial"
        if storage.exists(tmp):
            fs, path = storage.filesystem(tmp)
            fs.rm(path, recursive=True)
        synthesize(dataset.synthetic, dataset.ids, dataset.seed, tmp)
        fs, path = storage.filesystem(tmp)
        fs.mv(path, storage.filesystem(root)[1], recursive=True)
    return dataclasses.replace(dataset, root=root)


def _has_annotations(root: str) -> bool:
    from tpr_ray.data import detect_format

    try:
        detect_format(root)
        return True
    except (ConfigError, DataError):
        return False


def dataset_version(dataset: Dataset) -> dict:
    """Name, root, format and annotation hash of a dataset (its identity in every key)."""
    from tpr_ray.data import load_manifest, manifest_info

    info = manifest_info(load_manifest(dataset.root))
    return {**dataset.describe(), "format": info.get("dataset"), "version": info.get("version")}


# --------------------------------------------------------------------------- configuration


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
    use_ray: bool = True  # False: run the jobs one by one in this process (tests, debugging)


def config_key(obj) -> str:
    """sha256 of a JSON-able configuration (sorted keys): the identity of a result."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "data"


def backbone_choice(cfg: CrossEvalConfig, datasets: Sequence[Dataset]) -> tuple[str, str | None, dict]:
    """(model, pretrained, base recipe overrides) for these training sets: the tiny
    from-scratch setup when they are all synthetic, else ViT-B-16 with OpenAI weights."""
    from tpr_ray.demo import DEMO_OVERRIDES

    all_synthetic = bool(datasets) and all(d.synthetic for d in datasets)
    model = cfg.model or (TINY_MODEL if all_synthetic else "ViT-B-16")
    pretrained = cfg.pretrained
    if pretrained == "default":
        pretrained = None if model == TINY_MODEL else "openai"
    if isinstance(pretrained, str) and pretrained.lower() == "none":
        pretrained = None
    base = {}
    if model == TINY_MODEL and pretrained is None:
        base = {**DEMO_OVERRIDES, "epochs": SYNTHETIC_EPOCHS}
    return model, pretrained, base


# --------------------------------------------------------------------------- plan


@dataclass
class TrainPlan:
    method: str
    train: dict  # dataset_version() of the training set
    key: str
    run_dir: str
    train_config: dict  # TrainConfig fields
    recipe: dict
    checkpoint: dict | None = None  # filled when trained or reused
    cells: list = field(default_factory=list)


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


def _error(stage: str, exc: BaseException) -> dict:
    cause = getattr(exc, "cause", None) or exc  # a RayTaskError carries the original exception
    return {"stage": stage, "type": type(cause).__name__, "message": str(cause).strip().splitlines()[0][:2000]
            if str(cause).strip() else type(cause).__name__,
            "traceback": "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))[-6000:]}


def plan(cfg: CrossEvalConfig) -> tuple[list[TrainPlan], list[CellPlan]]:
    """Resolve datasets and recipes and key every training run and cell.

    A dataset or method that cannot be resolved fails the cells that need it (with the
    error), not the matrix.
    """
    from tpr_ray.methods import get_method

    out = cfg.out if storage.is_remote(cfg.out) else os.path.abspath(cfg.out)
    registry = load_registry(cfg.registry)
    specs = list(dict.fromkeys([*cfg.train, *cfg.test]))
    datasets, dataset_errors = {}, {}
    for spec in specs:
        try:
            datasets[spec] = resolve_dataset(spec, registry, cfg.synthetic_ids, cfg.seed)
        except (ConfigError, DataError) as exc:
            dataset_errors[spec] = _error("plan", exc)
    # The backbone follows the training data: synthetic training sets get the tiny model.
    model, pretrained, base_overrides = backbone_choice(cfg, [datasets[s] for s in cfg.train if s in datasets])
    versions = {}
    for spec, dataset in datasets.items():
        try:
            versions[spec] = dataset_version(materialise(dataset, out))
        except Exception as exc:  # any unreadable dataset fails only its cells
            dataset_errors[spec] = _error("plan", exc)
    names = {spec: (datasets[spec].name if spec in datasets else _safe_name(spec)) for spec in specs}

    eval_settings = {"ks": sorted(set(int(k) for k in cfg.ks)), "split": TEST_SPLIT, "eval_version": EVAL_VERSION}
    trains, cells = [], []
    for method in cfg.methods:
        method_error, recipe = None, None
        try:
            recipe = get_method(method).default_recipe.override(**{**base_overrides, **cfg.overrides}).to_dict()
        except Exception as exc:  # a method that does not load fails its cells only
            method_error = _error("plan", exc)
        for train_spec in cfg.train:
            train_plan = None
            error = method_error or dataset_errors.get(train_spec)
            train_key = None
            if error is None:
                train_config = {"method": method, "model": model, "pretrained": pretrained,
                                "image_size": list(cfg.image_size), "max_steps": cfg.max_steps, "seed": cfg.seed,
                                "num_workers": cfg.num_workers}
                train_key = config_key({**train_config, "recipe": recipe, "data": versions[train_spec]["version"]})
                run_name = f"{method}-{names[train_spec]}-{train_key[:10]}"
                train_plan = TrainPlan(method, versions[train_spec], train_key, storage.join(out, "runs", run_name),
                                       train_config, recipe)
                trains.append(train_plan)
            for test_spec in cfg.test:
                test_error = error or dataset_errors.get(test_spec)
                key = config_key({"train": train_key, "test": versions.get(test_spec, {}).get("version"),
                                  **eval_settings}) if test_error is None else config_key(
                    {"method": method, "train": train_spec, "test": test_spec, "unresolved": True})
                name = f"{method}__{names[train_spec]}__{names[test_spec]}-{key[:12]}.json"
                cell = CellPlan(method, names[train_spec], names[test_spec], key, storage.join(out, "cells", name),
                                train_plan if test_error is None else None, versions.get(test_spec),
                                error=test_error)
                if test_error is None:
                    embed_key = config_key({"train": train_key, "test": versions[test_spec]["version"],
                                            "split": TEST_SPLIT, "rows_per_shard": cfg.rows_per_shard})
                    cell.embed_dir = storage.join(out, "embeddings", os.path.basename(train_plan.run_dir),
                                                  f"{names[test_spec]}-{embed_key[:10]}")
                    train_plan.cells.append(cell)
                cells.append(cell)
    return trains, cells


# --------------------------------------------------------------------------- jobs


def train_job(payload: dict) -> dict:
    """Train one (method, training set); returns the checkpoint's identity."""
    from tpr_ray.train import TrainConfig, train

    tick = time.perf_counter()
    cfg = TrainConfig(**payload["train_config"])
    result = train(cfg, address=payload.get("address"))
    return {**checkpoint_identity(result.run_dir), "seconds": time.perf_counter() - tick, "reused": False}


def embed_job(payload: dict) -> dict:
    """Embed one test split with one checkpoint (resumes a partial folder)."""
    import ray.data

    from tpr_ray.embed import EmbedConfig, embed

    tick = time.perf_counter()
    ray.data.DataContext.get_current().enable_progress_bars = False  # parallel jobs would interleave bars
    summary = embed(EmbedConfig(**payload["embed_config"]), address=payload.get("address"))
    return {"dir": payload["embed_config"]["out"], "rows": {k: v["rows"] for k, v in summary.items()},
            "seconds": time.perf_counter() - tick, "reused": False}


def eval_job(payload: dict) -> dict:
    """Evaluate one cell with the streaming evaluator; returns metrics and report samples."""
    from tpr_ray.streaming_eval import evaluate_tables

    tick = time.perf_counter()
    gallery, queries = storage.join(payload["embed_dir"], "gallery"), storage.join(payload["embed_dir"], "queries")
    result = evaluate_tables(gallery, queries, payload["ks"], top_k=payload["top_k"],
                             block_size=payload["block_size"], use_ray=payload["use_ray"])
    metrics = {k: v for k, v in result.metrics.items() if k not in ("chance", "gallery", "queries")}
    return {"metrics": metrics, "chance": result.metrics["chance"], "timings": result.timings,
            "samples": query_samples(result, gallery, queries, payload["samples"]),
            "seconds": time.perf_counter() - tick}


JOBS: dict[str, Callable[[dict], dict]] = {"train": train_job, "embed": embed_job, "eval": eval_job}


def run_job(kind: str, payload: dict) -> dict:
    """Run a job and return ``{"ok": True, "result": ...}`` or ``{"ok": False, "error": ...}``."""
    try:
        return {"ok": True, "result": JOBS[kind](payload)}
    except Exception as exc:  # every failure is recorded with its cell
        return {"ok": False, "error": _error(kind, exc)}


def checkpoint_identity(run_dir: str) -> dict:
    """Best checkpoint of a run: URI, content hash of its weights, epoch, step, val metrics."""
    from tpr_ray.checkpoint import BEST_FILE, MODEL_FILE, read_config, resolve_checkpoint

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
    fs, path = storage.filesystem(uri)
    with fs.open(path, "rb") as f:
        return pq.read_table(f, columns=columns).to_pydict()


# --------------------------------------------------------------------------- running jobs


@dataclass
class Job:
    kind: str
    payload: dict
    cpus: float
    gpus: float
    done: Callable[[dict], None]  # called with run_job's answer; may submit more jobs
    label: str = ""


class Runner:
    """Runs jobs as Ray tasks (or inline) and admits them by the resources they declare."""

    def __init__(self, use_ray: bool, cpus: float, gpus: float, max_parallel: int | None):
        self.use_ray, self.cpus, self.gpus = use_ray, cpus, gpus
        self.max_parallel = max_parallel
        self.queue: list[Job] = []
        self.in_flight: dict = {}
        self.started = 0
        self.remote = None

    def submit(self, job: Job) -> None:
        if job.cpus > self.cpus + 1e-9 or job.gpus > self.gpus + 1e-9:
            job.done({"ok": False, "error": {
                "stage": job.kind, "type": "ConfigError", "traceback": "",
                "message": f"{job.kind} job needs {job.cpus:g} CPU / {job.gpus:g} GPU but the cluster has "
                           f"{self.cpus:g} CPU / {self.gpus:g} GPU; lower --workers or --cpus-per-worker"}})
            return
        self.queue.append(job)

    def run(self) -> None:
        while self.queue or self.in_flight:
            self._admit()
            if self.use_ray:
                import ray

                ready, _ = ray.wait(list(self.in_flight), num_returns=1)
                job = self.in_flight.pop(ready[0])
                try:
                    answer = ray.get(ready[0])
                except Exception as exc:  # a crashed worker fails the job, not the run
                    answer = {"ok": False, "error": _error(job.kind, exc)}
            else:
                handle = next(iter(self.in_flight))
                job = self.in_flight.pop(handle)
                answer = run_job(job.kind, job.payload)
            outcome = "done" if answer["ok"] else f"failed ({answer['error']['message']})"
            log.info("%s %s: %s", job.kind, job.label, outcome)
            job.done(answer)

    def _admit(self) -> None:
        while self.queue:
            used_cpus = sum(j.cpus for j in self.in_flight.values())
            used_gpus = sum(j.gpus for j in self.in_flight.values())
            job = self.queue[0]
            fits = used_cpus + job.cpus <= self.cpus + 1e-9 and used_gpus + job.gpus <= self.gpus + 1e-9
            room = self.max_parallel is None or len(self.in_flight) < self.max_parallel
            if self.in_flight and not (fits and room):
                return
            self.queue.pop(0)
            log.info("starting %s %s", job.kind, job.label)
            if self.use_ray:
                import ray

                if self.remote is None:
                    # No CPU for the job itself: the work inside declares its own (see the module docstring).
                    self.remote = ray.remote(run_job).options(num_cpus=0, max_retries=0)
                ref = self.remote.remote(job.kind, job.payload)
                self.in_flight[ref] = job
            else:
                self.started += 1
                self.in_flight[self.started] = job


# --------------------------------------------------------------------------- the matrix


@dataclass
class CrossEvalResult:
    cells: list[dict]
    report: dict  # name -> path of each report file
    counts: dict  # ok / failed / skipped / trained / reused checkpoints / embedded


def crosseval(cfg: CrossEvalConfig, address: str | None = None) -> CrossEvalResult:
    """Run (or finish) the matrix and write the report; see the module docstring."""
    if not cfg.methods or not cfg.train or not cfg.test:
        raise ConfigError("give at least one method, one training set and one test set")
    out = cfg.out if storage.is_remote(cfg.out) else os.path.abspath(cfg.out)
    cfg = dataclasses.replace(cfg, out=out)
    started = _now()
    trains, cells = plan(cfg)
    counts = {"ok": 0, "failed": 0, "skipped": 0, "trained": 0, "reused_checkpoints": 0, "embedded": 0}

    for cell in cells:
        previous = _read_cell(cell.path)
        if previous is not None and previous.get("status") == "ok":
            cell.record = previous
            counts["skipped"] += 1
    todo = [c for c in cells if c.record is None]
    for cell in todo:
        if cell.error is not None:
            _finish(cell, cfg, started, error=cell.error)

    busy = [t for t in trains if any(c.record is None for c in t.cells)]
    runner = _make_runner(cfg, address) if busy else Runner(False, 0.0, 0.0, 1)
    use_gpu = cfg.use_gpu if cfg.use_gpu is not None else runner.gpus > 0
    for train_plan in busy:
        best = storage.join(train_plan.run_dir, "best.json")
        if storage.exists(best):
            try:
                train_plan.checkpoint = {**checkpoint_identity(train_plan.run_dir), "reused": True}
                counts["reused_checkpoints"] += 1
                _after_training(train_plan, cfg, runner, address, counts, started)
                continue
            except Exception as exc:  # an unreadable run is trained again (resumed)
                log.warning("cannot reuse %s (%s); training again", train_plan.run_dir, exc)
        train_config = {**train_plan.train_config, "data": train_plan.train["root"],
                        "out": storage.join(out, "runs"), "name": os.path.basename(train_plan.run_dir),
                        "overrides": train_plan.recipe, "use_gpu": use_gpu, "cpus_per_worker": cfg.cpus_per_worker,
                        "loader_workers": cfg.loader_workers,
                        "image_size": tuple(train_plan.train_config["image_size"]),
                        "resume": storage.exists(train_plan.run_dir)}

        def trained(answer, train_plan=train_plan):
            if not answer["ok"]:
                for cell in train_plan.cells:
                    if cell.record is None:
                        _finish(cell, cfg, started, error=answer["error"])
                return
            counts["trained"] += 1
            train_plan.checkpoint = answer["result"]
            _after_training(train_plan, cfg, runner, address, counts, started)

        runner.submit(Job("train", {"train_config": train_config, "address": address},
                          cpus=cfg.num_workers * cfg.cpus_per_worker, gpus=cfg.num_workers if use_gpu else 0,
                          done=trained, label=os.path.basename(train_plan.run_dir)))
    runner.run()

    records = [c.record for c in cells]
    counts["ok"] = sum(r["status"] == "ok" for r in records) - counts["skipped"]
    counts["failed"] = sum(r["status"] != "ok" for r in records)
    report = write_report(records, storage.join(out, "report"))
    return CrossEvalResult(records, report, counts)


def _make_runner(cfg: CrossEvalConfig, address: str | None) -> Runner:
    if not cfg.use_ray:
        return Runner(False, cpus=float("inf"), gpus=float("inf"), max_parallel=1)
    import ray

    from tpr_ray.ray_utils import init_ray

    init_ray(address)
    resources = ray.cluster_resources()
    return Runner(True, cpus=resources.get("CPU", 1.0), gpus=resources.get("GPU", 0.0), max_parallel=cfg.max_parallel)


def _after_training(train_plan: TrainPlan, cfg: CrossEvalConfig, runner: Runner, address, counts, started) -> None:
    """Embed each pending test set with the checkpoint (or reuse its embeddings), then evaluate."""
    gpus_per_actor = 1.0 if runner.gpus > 0 and cfg.use_gpu is not False else 0.0
    for cell in train_plan.cells:
        if cell.record is not None:
            continue
        if _embedding_complete(cell.embed_dir, train_plan.checkpoint["uri"]):
            cell.embed = {"dir": cell.embed_dir, "reused": True, "seconds": 0.0}
            _submit_eval(cell, cfg, runner, started)
            continue
        embed_config = {"checkpoint": train_plan.checkpoint["uri"], "out": cell.embed_dir, "data": cell.test["root"],
                        "split": TEST_SPLIT, "batch_size": cfg.embed_batch_size, "actors": 1,
                        "gpus_per_actor": gpus_per_actor, "cpus_per_actor": 0.5, "decode_cpus": 0.5,
                        "rows_per_shard": cfg.rows_per_shard}

        def embedded(answer, cell=cell):
            if not answer["ok"]:
                _finish(cell, cfg, started, error=answer["error"])
                return
            counts["embedded"] += 1
            cell.embed = answer["result"]
            _submit_eval(cell, cfg, runner, started)

        runner.submit(Job("embed", {"embed_config": embed_config, "address": address}, cpus=1.0, gpus=gpus_per_actor,
                          done=embedded, label=f"{os.path.basename(train_plan.run_dir)} on {cell.test_name}"))


def _submit_eval(cell: CellPlan, cfg: CrossEvalConfig, runner: Runner, started: str) -> None:
    payload = {"embed_dir": cell.embed_dir, "ks": list(cfg.ks), "top_k": cfg.top_k, "block_size": cfg.block_size,
               "use_ray": runner.use_ray, "samples": cfg.samples}

    def evaluated(answer):
        if answer["ok"]:
            _finish(cell, cfg, started, result=answer["result"])
        else:
            _finish(cell, cfg, started, error=answer["error"])

    runner.submit(Job("eval", payload, cpus=1.0, gpus=0.0, done=evaluated,
                      label=f"{cell.method} {cell.train_name} -> {cell.test_name}"))


def _embedding_complete(embed_dir: str, checkpoint: str) -> bool:
    from tpr_ray.tables import SIDECAR

    for kind in ("gallery", "queries"):
        sidecar = storage.join(embed_dir, kind, SIDECAR)
        if not storage.exists(sidecar):
            return False
        info = storage.read_json(sidecar)
        if not info.get("complete") or info.get("checkpoint") != checkpoint:
            return False
    return True


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _finish(cell: CellPlan, cfg: CrossEvalConfig, started: str, *, result: dict | None = None,
            error: dict | None = None) -> None:
    """Build the cell's record and write it to ``cells/``."""
    train_plan = cell.train_plan
    checkpoint = train_plan.checkpoint if train_plan is not None else None
    record = {
        "key": cell.key, "method": cell.method, "train": cell.train_name, "test": cell.test_name,
        "in_domain": cell.train_name == cell.test_name, "status": "ok" if error is None else "failed",
        "metrics": result["metrics"] if result else None, "chance": result["chance"] if result else None,
        "config": {"train": dict(train_plan.train_config) if train_plan else None,
                   "recipe": train_plan.recipe if train_plan else None,
                   "eval": {"ks": list(cfg.ks), "split": TEST_SPLIT, "top_k": cfg.top_k,
                            "block_size": cfg.block_size, "eval_version": EVAL_VERSION}},
        "checkpoint": checkpoint,
        "datasets": {"train": train_plan.train if train_plan else None, "test": cell.test},
        "embeddings": cell.embed or None,
        "time": {"run_started": started, "finished": _now(),
                 "train_s": round(checkpoint.get("seconds", 0.0), 2) if checkpoint else None,
                 "embed_s": round(cell.embed.get("seconds", 0.0), 2) if cell.embed else None,
                 "eval_s": round(result["seconds"], 2) if result else None},
        "samples": result["samples"] if result else [],
    }
    if error is not None:
        record["error"] = error
    cell.record = record
    write_cell_json(record, cell.path)


def _read_cell(path: str) -> dict | None:
    if not storage.exists(path):
        return None
    try:
        return storage.read_json(path)
    except (json.JSONDecodeError, OSError):
        return None

