"""The loop every Ray Train worker runs (``train_loop_per_worker``, a plain function).

The driver that starts it is ``tpr_ray.training.driver.train``. The loop walks through the method's stages, each with
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
from dataclasses import dataclass

import torch
import torch.distributed as dist

from tpr_ray.io import storage
from tpr_ray.methods.backbone import BackboneConfig
from tpr_ray.model.checkpoint import CONFIG_FILE, MODEL_FILE, OPTIMIZER_FILE, build_method as build_on_backbone, save_checkpoint
from tpr_ray.errors import ConfigError
from tpr_ray.model.encode import autocast
from tpr_ray.methods import Method, Stage, get_method
from tpr_ray.training.config import TrainConfig
from tpr_ray.training.optim import advance, build_optimizer, build_scheduler
from tpr_ray.training.tracking import NoTracker, Tracker, epoch_scalars
from tpr_ray.training.inputs import TrainingData, evaluate_split, load_training_data, stage_loader
from tpr_ray.model.transforms import normalize

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


def train_loop_per_worker(config: dict) -> None:
    """What every Ray Train worker runs: data, model, resume point, then stage by stage,
    epoch by epoch: train, validate (rank 0), report with a checkpoint."""
    import ray.train

    from tpr_ray.training import decoded_cache
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
            for epoch in range(run.start_epoch, run.recipe.epochs):
                result = train_epoch(method, run, epoch, global_step, worker, tracker)
                global_step += result.steps
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
    method = build_on_backbone(cls, BackboneConfig(cfg.model, cfg.pretrained, tuple(cfg.image_size)), recipe, num_classes)
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


def train_epoch(method: Method, run: StageRun, epoch: int, global_step: int, worker: Worker, tracker) -> EpochResult:
    """One pass over this worker's share of the pairs (or up to ``max_steps``)."""
    cfg, recipe = worker.cfg, run.recipe
    run.sampler.set_epoch(epoch)
    run.model.train()
    tick, sums, steps, stop = time.perf_counter(), {}, 0, False
    steps_per_epoch = len(run.loader)
    for batch in run.loader:
        losses = train_step(method, run, batch, worker.device)
        steps += 1
        for k, v in losses.items():
            sums[k] = sums.get(k, 0.0) + float(v.detach())
        stop = cfg.max_steps is not None and global_step + steps >= cfg.max_steps
        if worker.leader and (steps % cfg.log_every == 0 or steps == steps_per_epoch or stop):
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
        if stop:
            break
    return EpochResult(steps, sums, time.perf_counter() - tick, steps * recipe.batch_size * worker.world,
                       finished=steps == steps_per_epoch, stop=stop)


def train_step(method: Method, run: StageRun, batch: dict, device) -> dict:
    """Forward, backward and update on one batch; returns the loss terms."""
    if "images" in batch:  # from the decoded cache: already augmented and normalised on the device
        images = batch["images"]
    else:
        images = normalize(batch["image"].to(device, non_blocking=True))
    batch = method.prepare_batch({"images": images, "captions": batch["caption"],
                                  "person_ids": batch["person_id"].to(device),
                                  "labels": batch["label"].to(device)}, device)
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
    from tpr_ray.model.checkpoint import local_copy, read_config, resolve_checkpoint

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
