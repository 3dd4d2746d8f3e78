"""The matrix driver: plan, skip what is done, submit train -> embed -> eval jobs, record
every cell, write the report."""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import logging
import os
import time
from dataclasses import dataclass, field

from tpr_ray.io import storage
from tpr_ray.crosseval import cells as jobs
from tpr_ray.crosseval.plan import EVAL_VERSION, TEST_SPLIT, CellPlan, CrossEvalConfig, TrainPlan, plan, \
    train_identity
from tpr_ray.crosseval.scheduler import Runner
from tpr_ray.data.uris import ENV_ALLOW, env_prefixes
from tpr_ray.errors import ConfigError
from tpr_ray.crosseval.report import write_cell_json, write_report

log = logging.getLogger(__name__)


@dataclass
class CrossEvalResult:
    cells: list[dict]
    report: dict  # name -> path of each report file
    counts: dict  # ok / failed / skipped / trained / reused checkpoints / embedded


@dataclass
class _Run:
    """What the callbacks of one matrix run share: its start, counters and progress."""

    started: str
    counts: dict
    pending: int = 0  # cells this run has to finish
    finished: int = 0
    tick: float = field(default_factory=time.perf_counter)

    def progress(self, cell: CellPlan) -> None:
        self.finished += 1
        record = cell.record
        if record["status"] == "ok":
            metrics = record["metrics"] or {}
            outcome = "ok" + (f", R1 {metrics['R1']:.2f}" if "R1" in metrics else "")
        else:
            error = record["error"]
            outcome = f"FAILED in {error['stage']}: {error['type']}: {error['message']}"
        elapsed = time.perf_counter() - self.tick
        eta = elapsed / self.finished * (self.pending - self.finished)
        log.info("cell %d/%d %s %s -> %s: %s (%.0fs, ETA %.0fs)", self.finished, self.pending, cell.method,
                 cell.train_name, cell.test_name, outcome, elapsed, eta)


def crosseval(cfg: CrossEvalConfig, address: str | None = None) -> CrossEvalResult:
    """Run (or finish) the matrix and write the report; see the package docstring."""
    if not cfg.methods or not cfg.train or not cfg.test:
        raise ConfigError("give at least one method, one training set and one test set")
    out = cfg.out if storage.is_remote(cfg.out) else os.path.abspath(cfg.out)
    cfg = dataclasses.replace(cfg, out=out)
    with _allowed_uris(cfg.allow_uri_prefixes):
        return _crosseval(cfg, address)


@contextlib.contextmanager
def _allowed_uris(prefixes):
    """Every manifest read, here and in the jobs, also accepts images under ``prefixes``:
    the jobs read manifests through the environment (see tpr_ray.data.uris)."""
    if not prefixes:
        yield
        return
    previous = os.environ.get(ENV_ALLOW)
    os.environ[ENV_ALLOW] = ",".join([*env_prefixes(), *prefixes])
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(ENV_ALLOW, None)
        else:
            os.environ[ENV_ALLOW] = previous


def _crosseval(cfg: CrossEvalConfig, address: str | None) -> CrossEvalResult:
    out = cfg.out
    trains, cells = plan(cfg)
    counts = {"ok": 0, "failed": 0, "skipped": 0, "trained": 0, "reused_checkpoints": 0, "embedded": 0}
    run = _Run(_now(), counts)

    for cell in cells:
        previous = _read_cell(cell.path)
        if previous is not None and previous.get("status") == "ok":
            cell.record = previous
            counts["skipped"] += 1
    run.pending = sum(cell.record is None for cell in cells)
    if counts["skipped"]:
        log.info("%d of %d cells already done", counts["skipped"], len(cells))
    for cell in cells:
        if cell.record is None and cell.error is not None:
            _finish(cell, cfg, run, error=cell.error)

    busy = [t for t in trains if any(c.record is None for c in t.cells)]
    runner = _make_runner(cfg, address) if busy else Runner(jobs.run_job, False, 0.0, 0.0, 1)
    use_gpu = _use_gpu(cfg, runner)
    for train_plan in busy:
        if storage.exists(storage.join(train_plan.run_dir, "best.json")):
            try:
                train_plan.checkpoint = {**jobs.checkpoint_identity(train_plan.run_dir), "reused": True}
                counts["reused_checkpoints"] += 1
                _after_training(train_plan, cfg, runner, run)
                continue
            except Exception as exc:  # an unreadable run is trained again (resumed)
                log.warning("cannot reuse %s (%s); training again", train_plan.run_dir, exc)
        train_config = dataclasses.replace(train_plan.config, use_gpu=use_gpu,
                                           resume=storage.exists(train_plan.run_dir))

        def trained(answer, train_plan=train_plan):
            if not answer["ok"]:
                for cell in train_plan.cells:
                    if cell.record is None:
                        _finish(cell, cfg, run, error=answer["error"])
                return
            counts["trained"] += 1
            train_plan.checkpoint = answer["result"]
            _after_training(train_plan, cfg, runner, run)

        runner.submit(jobs.make_job("train", train_config, trained, label=train_config.run_name()))
    runner.run()

    records = [c.record for c in cells]
    counts["ok"] = sum(r["status"] == "ok" for r in records) - counts["skipped"]
    counts["failed"] = sum(r["status"] != "ok" for r in records)
    report = write_report(records, storage.join(out, "report"))
    return CrossEvalResult(records, report, counts)


def _make_runner(cfg: CrossEvalConfig, address: str | None) -> Runner:
    if not cfg.use_ray:
        return Runner(jobs.run_job, False, cpus=float("inf"), gpus=float("inf"), max_parallel=1, address=address)
    import ray

    from tpr_ray.io.cluster import init_ray

    init_ray(address)
    resources = ray.cluster_resources()
    env_vars = {ENV_ALLOW: os.environ[ENV_ALLOW]} if os.environ.get(ENV_ALLOW) else None
    return Runner(jobs.run_job, True, cpus=resources.get("CPU", 1.0), gpus=resources.get("GPU", 0.0),
                  max_parallel=cfg.max_parallel, address=address, env_vars=env_vars)


def _use_gpu(cfg: CrossEvalConfig, runner: Runner) -> bool | None:
    """The user's choice, else whether the cluster has GPUs; run inline (no cluster
    resources known here), None lets each job look for itself."""
    if cfg.use_gpu is not None:
        return cfg.use_gpu
    return runner.gpus > 0 if runner.use_ray else None


def _after_training(train_plan: TrainPlan, cfg: CrossEvalConfig, runner: Runner, run: _Run) -> None:
    """Embed each pending test set with the checkpoint (or reuse its embeddings), then evaluate."""
    from tpr_ray.embedding.pipeline import EmbedConfig

    use_gpu = _use_gpu(cfg, runner)
    gpus_per_actor = None if use_gpu is None else (1.0 if use_gpu else 0.0)
    for cell in train_plan.cells:
        if cell.record is not None:
            continue
        if jobs.embedding_complete(cell.embed_dir, train_plan.checkpoint["uri"]):
            cell.embed = {"dir": cell.embed_dir, "reused": True, "seconds": 0.0}
            _submit_eval(cell, cfg, runner, run)
            continue
        embed_config = EmbedConfig(checkpoint=train_plan.checkpoint["uri"], out=cell.embed_dir,
                                   data=cell.test["root"], split=TEST_SPLIT, batch_size=cfg.embed_batch_size,
                                   actors=1, gpus_per_actor=gpus_per_actor, rows_per_shard=cfg.rows_per_shard)

        def embedded(answer, cell=cell):
            if not answer["ok"]:
                _finish(cell, cfg, run, error=answer["error"])
                return
            run.counts["embedded"] += 1
            cell.embed = answer["result"]
            _submit_eval(cell, cfg, runner, run)

        runner.submit(jobs.make_job("embed", embed_config, embedded,
                                    label=f"{os.path.basename(train_plan.run_dir)} on {cell.test_name}"))


def _eval_settings(cfg: CrossEvalConfig) -> dict:
    return {"ks": list(cfg.ks), "split": TEST_SPLIT, "top_k": cfg.top_k, "block_size": cfg.block_size,
            "eval_version": EVAL_VERSION}


def _submit_eval(cell: CellPlan, cfg: CrossEvalConfig, runner: Runner, run: _Run) -> None:
    from tpr_ray.evaluation.streaming import StreamingSettings

    streaming = StreamingSettings(ks=tuple(cfg.ks), top_k=cfg.top_k, block_size=cfg.block_size,
                                  use_ray=runner.use_ray)
    settings = jobs.EvalJob(embed_dir=cell.embed_dir, settings=streaming, samples=cfg.samples)

    def evaluated(answer):
        if answer["ok"]:
            _finish(cell, cfg, run, result=answer["result"])
        else:
            _finish(cell, cfg, run, error=answer["error"])

    runner.submit(jobs.make_job("eval", settings, evaluated,
                                label=f"{cell.method} {cell.train_name} -> {cell.test_name}"))


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _finish(cell: CellPlan, cfg: CrossEvalConfig, run: _Run, *, result: dict | None = None,
            error: dict | None = None) -> None:
    """Build the cell's record and write it to ``cells/``."""
    train_plan = cell.train_plan
    checkpoint = train_plan.checkpoint if train_plan is not None else None
    record = {
        "key": cell.key, "method": cell.method, "train": cell.train_name, "test": cell.test_name,
        "in_domain": cell.train_name == cell.test_name, "status": "ok" if error is None else "failed",
        "metrics": result["metrics"] if result else None, "chance": result["chance"] if result else None,
        "config": {"train": train_identity(train_plan.config) if train_plan else None,
                   "recipe": train_plan.recipe if train_plan else None,
                   "eval": _eval_settings(cfg)},
        "checkpoint": checkpoint,
        "datasets": {"train": train_plan.train if train_plan else None, "test": cell.test},
        "embeddings": cell.embed or None,
        "time": {"run_started": run.started, "finished": _now(),
                 "train_s": round(checkpoint.get("seconds", 0.0), 2) if checkpoint else None,
                 "embed_s": round(cell.embed.get("seconds", 0.0), 2) if cell.embed else None,
                 "eval_s": round(result["seconds"], 2) if result else None},
        "samples": result["samples"] if result else [],
    }
    if error is not None:
        record["error"] = error
    cell.record = record
    write_cell_json(record, cell.path)
    run.progress(cell)


def _read_cell(path: str) -> dict | None:
    if not storage.exists(path):
        return None
    try:
        return storage.read_json(path)
    except (json.JSONDecodeError, OSError):
        return None
