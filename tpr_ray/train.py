"""Training any method on Ray Train.

``train(config)`` runs a ``TorchTrainer``; ``train_loop_per_worker`` is the plain
function every worker runs. The loop walks through the method's stages, each with
its own recipe and trainable set, checkpoints at every epoch end (rank 0 writes,
Ray Train stores it locally or on s3://), selects the best checkpoint by R@1 on
the validation split (or identities held out of train), and resumes from the
latest checkpoint when the same run is started again.
"""

from __future__ import annotations

import io
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from tpr_ray import storage
from tpr_ray.backbone import DEFAULT_IMAGE_SIZE, BackboneConfig
from tpr_ray.checkpoint import CONFIG_FILE, MODEL_FILE, OPTIMIZER_FILE, save_checkpoint
from tpr_ray.errors import ConfigError
from tpr_ray.inference import autocast
from tpr_ray.methods import Method, Stage, get_method
from tpr_ray.optim import advance, build_optimizer, build_scheduler, lr_factor
from tpr_ray.tracking import NoTracker, Tracker, epoch_scalars
from tpr_ray.train_data import CaptionPairs, TrainingData, evaluate_split, load_training_data, stage_loader
from tpr_ray.transforms import normalize

# Re-exported: callers import the training pieces from here.
__all__ = ["CaptionPairs", "TrainConfig", "TrainResult", "build_optimizer", "evaluate_split", "lr_factor", "train",
           "train_loop_per_worker"]


@dataclass
class TrainConfig:
    """Everything a training run needs; recipe overrides apply on top of the method's defaults."""

    method: str
    data: str
    out: str
    name: str | None = None
    model: str = "ViT-B-16"
    pretrained: str | None = "openai"
    image_size: tuple[int, int] = DEFAULT_IMAGE_SIZE
    overrides: dict = field(default_factory=dict)
    num_workers: int = 1
    use_gpu: bool | None = None  # None: use GPUs when the cluster has them
    cpus_per_worker: float = 1.0
    loader_workers: int = 2
    max_steps: int | None = None  # stop early (smoke tests, benchmarks)
    stage_max_steps: int | None = None  # end each stage after this many steps, then go on to the next (smoke runs)
    log_every: int = 20
    seed: int = 0
    holdout_fraction: float = 0.05
    resume: bool = False
    init: str | None = None  # start from this checkpoint's weights (same method), e.g. a stage-1 run
    start_stage: int = 0  # 0-based stage to begin with when not resuming (PD: 1 = stage 2 alone)
    max_failures: int = 0
    keep_checkpoints: int = 2
    bad_images: str = "fail"  # unreadable images: fail before training (listed), skip them, or "off" (no check)
    exclude_images: list[str] = field(default_factory=list)  # left out of training (the "skip" check fills it)
    mlflow: str | None = None  # MLflow tracking URI (default: MLFLOW_TRACKING_URI); TensorBoard files are always written
    mlflow_run_id: str | None = None  # filled by the driver
    grad_checkpointing: bool = False  # recompute activations in backward: less memory for large batches
    decoded_cache: str | None = None  # "auto" (beside the manifest) or a folder: train from decoded uint8 crops
    decoded_stream: bool = False  # with decoded_cache: stream it through Ray Data instead of loading it per worker

    def run_name(self) -> str:
        if self.name:
            return self.name
        base = os.path.basename(self.data.rstrip("/")).replace(".parquet", "") or "data"
        return f"{self.method}-{base}"


# --- the per-worker loop -----------------------------------------------------------

_RUN_LABEL = ""  # the run this worker process trains, named on each of its progress lines


def log(message: str) -> None:
    """Progress line from a worker, naming its run (several train at once in crosseval).
    Written to stdout directly: Ray Train's patched ``print`` sends each line to the driver twice."""
    label = f"{_RUN_LABEL}: " if _RUN_LABEL else ""
    sys.stdout.write(f"[tpr-ray] {label}{message}\n")
    sys.stdout.flush()


def format_eta(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


@dataclass
class Worker:
    """This worker's place in the run."""

    cfg: TrainConfig
    rank: int
    world: int
    device: torch.device

    @property
    def leader(self) -> bool:
        return self.rank == 0


@dataclass
class StageRun:
    """One stage as the loop runs it: the DDP-wrapped model, its data and its optimizer."""

    index: int
    stage: Stage
    model: torch.nn.Module
    loader: object
    sampler: object
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    counts: dict
    start_epoch: int

    @property
    def recipe(self):
        return self.stage.recipe


@dataclass
class EpochResult:
    steps: int  # optimizer steps taken in this epoch
    loss_sums: dict  # summed loss terms over those steps
    seconds: float
    samples: int  # global samples (all workers)
    finished: bool  # the epoch ran to its end
    stop: bool  # max_steps reached: the run ends after this epoch's report
    stage_stop: bool = False  # stage_max_steps reached: the stage ends after this epoch's report


def train_loop_per_worker(config: dict) -> None:
    """What every Ray Train worker runs: data, model, resume point, then stage by stage,
    epoch by epoch: train, validate (rank 0), report with a checkpoint."""
    import ray.train

    from tpr_ray import decoded_cache

    worker = start_worker(TrainConfig(**config))
    cfg = worker.cfg
    data = load_training_data(cfg.data, cfg.holdout_fraction, cfg.seed, exclude=cfg.exclude_images)
    # One copy of the decoded crops per worker, shared by every stage's loader.
    cached = decoded_cache.load(cfg.decoded_cache) if cfg.decoded_cache and not cfg.decoded_stream else None
    method = build_method(cfg, data.num_classes).to(worker.device)
    resumed = restore_or_initialise(method, worker, ray.train.get_checkpoint())
    stages = method.stages()
    start_stage, global_step = start_position(cfg, stages, resumed)
    tracker = open_tracker(worker)
    try:
        for stage_index in range(start_stage, len(stages)):
            run = prepare_stage(method, stages, stage_index, data, worker, resumed, cached)
            stage_steps = 0
            for epoch in range(run.start_epoch, run.recipe.epochs):
                result = train_epoch(method, run, epoch, global_step, worker, tracker, stage_steps)
                global_step += result.steps
                stage_steps += result.steps
                if result.finished:
                    advance(run.scheduler, run.recipe, "epoch")
                metrics = epoch_metrics(run, epoch, result, global_step, worker)
                if worker.leader:
                    metrics.update(validate(method, data, run, epoch, worker))
                tracker.log(epoch_scalars(metrics), global_step)
                tracker.flush()
                metrics["restored_from_step"] = resumed["global_step"] if resumed else -1
                _report(method, run.optimizer, run.scheduler, metrics, cfg, run.counts, worker.rank, data.version)
                if result.stop:
                    return
                if result.stage_stop:
                    break
    finally:
        tracker.close()


def start_worker(cfg: TrainConfig) -> Worker:
    import ray.train
    import ray.train.torch

    global _RUN_LABEL
    ctx = ray.train.get_context()
    _RUN_LABEL = cfg.run_name()
    torch.manual_seed(cfg.seed)
    return Worker(cfg, ctx.get_world_rank(), ctx.get_world_size(), ray.train.torch.get_device())


def open_tracker(worker: Worker):
    """TensorBoard (and MLflow) logging from rank 0; the other ranks log nothing."""
    if not worker.leader:
        return NoTracker()
    cfg = worker.cfg
    return Tracker(storage.join(cfg.out, cfg.run_name()), cfg.mlflow, cfg.mlflow_run_id)


def build_method(cfg: TrainConfig, num_classes: int) -> Method:
    cls = get_method(cfg.method)
    recipe = cls.default_recipe.override(**cfg.overrides)
    method = cls(BackboneConfig(cfg.model, cfg.pretrained, tuple(cfg.image_size)), recipe, num_classes=num_classes)
    if cfg.grad_checkpointing:
        enable_grad_checkpointing(method)
    return method


def enable_grad_checkpointing(method: Method) -> None:
    """open_clip's activation checkpointing (about a third more compute for much less memory).
    A method that runs the towers' blocks itself provides its own ``set_grad_checkpointing``."""
    switch = getattr(method, "set_grad_checkpointing", None) or method.clip.set_grad_checkpointing
    switch(True)


def restore_or_initialise(method: Method, worker: Worker, checkpoint) -> dict | None:
    """Load the run's latest checkpoint (a resumed or restarted run), else ``--init`` weights."""
    resumed = _restore(checkpoint)
    if resumed is not None:
        method.load_state_dict(resumed["model_state"], strict=method.checkpoint_holds_backbone)
        if worker.leader:
            log(f"restored from the checkpoint at step {resumed['global_step']} "
                f"(stage {resumed['stage'] + 1}, epoch {resumed['epoch']})")
    elif worker.cfg.init:
        load_weights(method, worker.cfg.init)
    return resumed


def start_position(cfg: TrainConfig, stages: list[Stage], resumed: dict | None) -> tuple[int, int]:
    """(stage index, global step) the loop begins at."""
    if not 0 <= cfg.start_stage < len(stages):
        raise ConfigError(f"method {cfg.method} has stages 1..{len(stages)}; cannot start at stage {cfg.start_stage + 1}")
    if resumed:
        return resumed["stage"], resumed["global_step"]
    return cfg.start_stage, 0


def prepare_stage(method: Method, stages: list[Stage], index: int, data: TrainingData, worker: Worker,
                  resumed: dict | None, cached: tuple | None = None) -> StageRun:
    """Trainable set, DDP wrapper, loader and optimizer of one stage (state restored when resuming in it)."""
    import ray.train.torch

    stage, cfg = stages[index], worker.cfg
    method.set_stage(stage)
    counts = method.parameter_counts()
    if worker.leader:
        log(f"stage {index + 1}/{len(stages)} {stage.name!r}: trainable "
            f"{counts['trainable']:,} of {counts['total']:,} parameters "
            f"({100.0 * counts['trainable'] / counts['total']:.2f} %)")
    model = ray.train.torch.prepare_model(method, move_to_device=False)
    loader, sampler = stage_loader(data, stage.recipe, cfg, rank=worker.rank, world=worker.world,
                                   device=worker.device, cached=cached)
    optimizer = build_optimizer(method, stage)
    scheduler = build_scheduler(optimizer, stage.recipe, len(loader))
    start_epoch = 0
    if resumed and resumed["stage"] == index and resumed["optimizer_in_stage"]:
        optimizer.load_state_dict(resumed["optimizer_state"]["optimizer"])
        scheduler.load_state_dict(resumed["optimizer_state"]["scheduler"])
        start_epoch = resumed["epoch"]
    return StageRun(index, stage, model, loader, sampler, optimizer, scheduler, counts, start_epoch)


def train_epoch(method: Method, run: StageRun, epoch: int, global_step: int, worker: Worker, tracker,
                stage_steps: int = 0) -> EpochResult:
    """One pass over this worker's share of the pairs (or up to ``max_steps``, or up to
    ``stage_max_steps`` counting the ``stage_steps`` this stage already took)."""
    cfg, recipe = worker.cfg, run.recipe
    run.sampler.set_epoch(epoch)
    run.model.train()
    tick, sums, steps, stop, stage_stop = time.perf_counter(), {}, 0, False, False
    steps_per_epoch = len(run.loader)
    for batch in run.loader:
        losses = train_step(method, run, batch, worker.device)
        steps += 1
        for k, v in losses.items():
            sums[k] = sums.get(k, 0.0) + float(v.detach())
        stop = cfg.max_steps is not None and global_step + steps >= cfg.max_steps
        stage_stop = cfg.stage_max_steps is not None and stage_steps + steps >= cfg.stage_max_steps
        if worker.leader and (steps % cfg.log_every == 0 or steps == steps_per_epoch or stop or stage_stop):
            rate = steps * recipe.batch_size * worker.world / (time.perf_counter() - tick)
            terms = " ".join(f"{k} {v / steps:.4f}" for k, v in sums.items())
            lr = run.scheduler.get_last_lr()[0]
            # ETA of the stage from this epoch's pace (validation time not included)
            left = (steps_per_epoch - steps) + (recipe.epochs - epoch - 1) * steps_per_epoch
            eta = format_eta(left * (time.perf_counter() - tick) / steps)
            log(f"{run.stage.name} epoch {epoch + 1}/{recipe.epochs} step {steps}/{steps_per_epoch} "
                f"{terms} lr {lr:.3e} samples/s {rate:.1f} ETA {eta}")
            tracker.log({**{f"train/{k}": v / steps for k, v in sums.items()}, "lr": lr, "samples_per_s": rate},
                        global_step + steps)
        if stop or stage_stop:
            break
    return EpochResult(steps, sums, time.perf_counter() - tick, steps * recipe.batch_size * worker.world,
                       finished=steps == steps_per_epoch, stop=stop, stage_stop=stage_stop)


def train_step(method: Method, run: StageRun, batch: dict, device) -> dict:
    """Forward, backward and update on one batch; returns the loss terms."""
    if "images" in batch:  # from the decoded cache: already augmented and normalised on the device
        images = batch["images"]
    else:
        images = normalize(batch["image"].to(device, non_blocking=True))
    batch = {
        "images": images,
        "tokens": method.tokenize(batch["caption"]).to(device),
        "person_ids": batch["person_id"].to(device),
        "labels": batch["label"].to(device),
    }
    with autocast(device):
        losses = run.model(batch)
    run.optimizer.zero_grad(set_to_none=True)
    losses["loss"].backward()
    run.optimizer.step()
    advance(run.scheduler, run.recipe, "step")
    return losses


def epoch_metrics(run: StageRun, epoch: int, result: EpochResult, global_step: int, worker: Worker) -> dict:
    """Loss terms averaged over steps and workers, plus the run's position."""
    metrics = {f"train_{k}": _mean_across_workers(v / max(1, result.steps), worker.device)
               for k, v in result.loss_sums.items()}
    metrics.update(stage=run.index, stage_name=run.stage.name, epoch=epoch + int(result.finished),
                   global_step=global_step, samples_per_s=result.samples / result.seconds,
                   lr=run.scheduler.get_last_lr()[0])
    return metrics


def validate(method: Method, data: TrainingData, run: StageRun, epoch: int, worker: Worker) -> dict:
    val = evaluate_split(method, data.val, worker.cfg.image_size, worker.device)
    log(f"{run.stage.name} epoch {epoch + 1} val R1 {val['R1']:.2f} R5 {val['R5']:.2f} mAP {val['mAP']:.2f}")
    return {f"val_{k}": v for k, v in val.items() if isinstance(v, float)}


def _restore(checkpoint) -> dict | None:
    """Read the checkpoint's files straight from its storage. Not through ``as_directory()``:
    its download folder is shared by the workers of a host and removed when one of them is done
    with it, which a second worker still reading saw as a corrupt file (simulated multi-node)."""
    if checkpoint is None:
        return None

    def read(name: str) -> bytes:
        with checkpoint.filesystem.open_input_stream(f"{checkpoint.path.rstrip('/')}/{name}") as f:
            return f.read()

    info = json.loads(read(CONFIG_FILE))
    for key, name in (("model_state", MODEL_FILE), ("optimizer_state", OPTIMIZER_FILE)):
        info[key] = torch.load(io.BytesIO(read(name)), map_location="cpu", weights_only=True)
    return info


def load_weights(method: Method, checkpoint: str) -> None:
    """Initialise ``method`` from a checkpoint of the same method (e.g. the end of PD stage 1)."""
    from tpr_ray.checkpoint import local_copy, read_config, resolve_checkpoint

    uri = resolve_checkpoint(checkpoint)
    local = local_copy(uri)
    source = read_config(local)["method"]
    if source != method.name:
        raise ConfigError(f"--init {uri} is a {source} checkpoint; it can only initialise a {source} run")
    state = torch.load(os.path.join(local, MODEL_FILE), map_location="cpu", weights_only=True)
    _, unexpected = method.load_state_dict(state, strict=method.checkpoint_holds_backbone)
    if unexpected:
        raise ConfigError(f"--init {uri} has weights this {method.name} model lacks: {unexpected[:5]}")


def _mean_across_workers(value: float, device) -> float:
    if not (dist.is_available() and dist.is_initialized()):
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t.item()) / dist.get_world_size()


def _report(method, optimizer, scheduler, metrics, cfg: TrainConfig, counts, rank, data_version) -> None:
    import ray.train

    if rank != 0:
        ray.train.report(metrics)
        return
    stage_done = metrics["epoch"] >= method.stages()[metrics["stage"]].recipe.epochs
    position = {
        # A checkpoint taken at the end of a stage resumes at the start of the next one.
        "stage": metrics["stage"] + int(stage_done),
        "epoch": 0 if stage_done else metrics["epoch"],
        "global_step": metrics["global_step"],
        "optimizer_in_stage": not stage_done,  # the optimizer state belongs to the stage resumed
    }
    info = {**position, "stage_name": metrics["stage_name"], "parameter_counts": counts,
            "data": cfg.data, "data_version": data_version, "run": cfg.run_name(),
            "metrics": {k: v for k, v in metrics.items() if isinstance(v, (int, float))}}
    with tempfile.TemporaryDirectory() as tmp:
        save_checkpoint(method, tmp, info, {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()})
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))


# --- the driver ----------------------------------------------------------------

@dataclass
class TrainResult:
    run_dir: str
    best_checkpoint: str
    best_metrics: dict
    latest_checkpoint: str


def _checkpoint_uri(storage_path: str, checkpoint) -> str:
    protocol = storage_path.split("://", 1)[0] if "://" in storage_path else None
    return f"{protocol}://{checkpoint.path}" if protocol else checkpoint.path


def train(cfg: TrainConfig, address: str | None = None) -> TrainResult:
    """Run training on the Ray cluster (a local one unless ``address``/RAY_ADDRESS names one)."""
    import ray

    from tpr_ray.ray_utils import init_ray, require_shared_storage
    from tpr_ray.train_run import (absolute_references, check_run_folder, decoded_training_stream,
                                   latest_checkpoint, mlflow_run, prepare_decoded_cache, registered_checkpoints,
                                   skipped_images, with_recipe_rules, write_best)

    cfg = with_recipe_rules(cfg)
    recipe = get_method(cfg.method).default_recipe.override(**cfg.overrides)  # fail fast, before Ray starts
    if cfg.decoded_stream and not cfg.decoded_cache:
        raise ConfigError("--decoded-stream streams the decoded cache: give --decoded-cache too")
    config = absolute_references(cfg)
    out, run_dir = config["out"], storage.join(config["out"], cfg.run_name())
    check_run_folder(cfg, config, recipe, run_dir)
    config["exclude_images"] = skipped_images(cfg, config)
    config["mlflow"], config["mlflow_run_id"] = mlflow_run(cfg, config, recipe, run_dir)
    init_ray(address)
    require_shared_storage(out, "--out")
    datasets = None
    if cfg.decoded_cache:  # built once here, before the workers start; they receive its folder
        config["decoded_cache"] = prepare_decoded_cache(cfg, config)
        if cfg.decoded_stream:
            datasets = {"train": decoded_training_stream(cfg, config)}
    use_gpu = cfg.use_gpu if cfg.use_gpu is not None else ray.cluster_resources().get("GPU", 0) > 0
    trainer = _trainer(cfg, config, use_gpu, datasets)
    try:
        result = trainer.fit()
    except BaseException:  # Ctrl-C or a failed run: what it registered stays usable as RUN
        checkpoints = registered_checkpoints(run_dir)
        if checkpoints:
            write_best(run_dir, checkpoints, latest_checkpoint(checkpoints), interrupted=True)
        raise
    if result.checkpoint is None:
        raise ConfigError(f"training run {run_dir} finished without a checkpoint")
    latest = _checkpoint_uri(out, result.checkpoint)
    best, best_metrics = write_best(run_dir, [(_checkpoint_uri(out, c), m) for c, m in result.best_checkpoints], latest)
    if config["mlflow_run_id"]:
        from tpr_ray.tracking import log_best_to_mlflow

        log_best_to_mlflow(config["mlflow"], config["mlflow_run_id"], best, best_metrics)
    return TrainResult(run_dir, best, best_metrics, latest)


def _trainer(cfg: TrainConfig, config: dict, use_gpu: bool, datasets: dict | None = None):
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=config,
        datasets=datasets,
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=use_gpu,
                                     resources_per_worker={"CPU": cfg.cpus_per_worker}),
        run_config=RunConfig(
            name=cfg.run_name(), storage_path=config["out"],
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.keep_checkpoints,
                                               checkpoint_score_attribute="val_R1",
                                               checkpoint_score_order="max"),
            failure_config=FailureConfig(max_failures=cfg.max_failures),
        ),
    )
