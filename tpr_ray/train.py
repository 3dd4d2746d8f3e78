"""Training any method on Ray Train.

``train(config)`` runs a ``TorchTrainer``; ``train_loop_per_worker`` is the plain
function every worker runs. The loop walks through the method's stages, each with
its own recipe and trainable set, checkpoints at every epoch end (rank 0 writes,
Ray Train stores it locally or on s3://), selects the best checkpoint by R@1 on
the validation split (or identities held out of train), and resumes from the
latest checkpoint when the same run is started again.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from tpr_ray import storage
from tpr_ray.backbone import DEFAULT_IMAGE_SIZE, BackboneConfig
from tpr_ray.checkpoint import BEST_FILE, CONFIG_FILE, MODEL_FILE, OPTIMIZER_FILE, save_checkpoint
from tpr_ray.data import load_manifest, selection_split
from tpr_ray.errors import ConfigError
from tpr_ray.inference import autocast, encode_captions, encode_images
from tpr_ray.methods import Method, Stage, get_method
from tpr_ray.metrics import retrieval_metrics_from_embeddings
from tpr_ray.images import decode_image, resize_uint8
from tpr_ray.transforms import normalize, train_augment


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
    log_every: int = 20
    seed: int = 0
    holdout_fraction: float = 0.05
    resume: bool = False
    init: str | None = None  # start from this checkpoint's weights (same method), e.g. a stage-1 run
    start_stage: int = 0  # 0-based stage to begin with when not resuming (PD: 1 = stage 2 alone)
    max_failures: int = 0
    keep_checkpoints: int = 2

    def run_name(self) -> str:
        if self.name:
            return self.name
        base = os.path.basename(self.data.rstrip("/")).replace(".parquet", "") or "data"
        return f"{self.method}-{base}"


# --- pure pieces ---------------------------------------------------------------

def lr_factor(step: int, warmup_steps: int, total_steps: int, warmup_factor: float, schedule: str = "cosine",
              decay_steps: int = 0, gamma: float = 0.1) -> float:
    """Multiplier of the base lr at ``step``: linear warm-up from ``warmup_factor``, then
    cosine to 0, constant, or ``gamma`` every ``decay_steps`` (step decay)."""
    if step < warmup_steps:
        alpha = step / warmup_steps
        return warmup_factor * (1 - alpha) + alpha
    if schedule == "constant":
        return 1.0
    if schedule == "step":
        return gamma ** ((step - warmup_steps) // max(1, decay_steps))
    if schedule != "cosine":
        raise ConfigError(f"unknown lr schedule {schedule!r}; use cosine, step or constant")
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def build_optimizer(method: Method, stage: Stage) -> torch.optim.Optimizer:
    recipe = stage.recipe
    groups = method.param_groups(recipe)
    if not groups:
        raise ConfigError(f"stage {stage.name!r} of method {method.name!r} trains no parameters")
    if recipe.optimizer == "adam":
        return torch.optim.Adam(groups, lr=recipe.lr, eps=recipe.adam_eps)
    if recipe.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=recipe.lr)
    raise ConfigError(f"unknown optimizer {recipe.optimizer!r}; use adam or sgd")


class CaptionPairs(Dataset):
    """One item per (image, caption) pair, as in IRRA: an epoch visits every caption once."""

    def __init__(self, table, labels: dict[int, int], image_size: tuple[int, int], augment: bool):
        self.uris = table.column("image_uri").to_pylist()
        self.pids = table.column("person_id").to_pylist()
        self.items = [(row, cap) for row, caps in enumerate(table.column("captions").to_pylist()) for cap in caps]
        self.labels = labels
        self.image_size = tuple(image_size)
        self.augment = train_augment(self.image_size) if augment else None

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        row, caption = self.items[index]
        image = resize_uint8(decode_image(storage.read_bytes(self.uris[row])), self.image_size)
        x = torch.from_numpy(image).permute(2, 0, 1).float().div_(255.0)
        if self.augment is not None:
            x = self.augment(x)
        pid = self.pids[row]
        return {"image": x, "caption": caption, "person_id": pid, "label": self.labels[pid]}


def evaluate_split(method: Method, table, image_size, device, batch_size: int = 64) -> dict:
    """Text-to-image metrics of ``method`` on a manifest split (used for model selection)."""
    method.eval()
    uris = table.column("image_uri").to_pylist()
    gallery = []
    for start in range(0, len(uris), batch_size):
        images = np.stack([resize_uint8(decode_image(storage.read_bytes(u)), image_size) for u in uris[start:start + batch_size]])
        gallery.append(encode_images(method, images, device))
    captions, query_pids = [], []
    for pid, caps in zip(table.column("person_id").to_pylist(), table.column("captions").to_pylist()):
        captions += caps
        query_pids += [pid] * len(caps)
    queries = [encode_captions(method, captions[s:s + batch_size], device) for s in range(0, len(captions), batch_size)]
    method.train()
    return retrieval_metrics_from_embeddings(
        np.concatenate(queries), np.concatenate(gallery),
        np.asarray(query_pids), np.asarray(table.column("person_id").to_pylist()),
    )


# --- the per-worker loop -----------------------------------------------------------

def log(message: str) -> None:
    """Progress line from a worker. Written to stdout directly: Ray Train's patched
    ``print`` sends each line to the driver twice."""
    sys.stdout.write(f"[tpr-ray] {message}\n")
    sys.stdout.flush()


def _restore(checkpoint) -> dict | None:
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as d:
        with open(os.path.join(d, CONFIG_FILE)) as f:
            info = json.load(f)
        info["model_state"] = torch.load(os.path.join(d, MODEL_FILE), map_location="cpu", weights_only=True)
        info["optimizer_state"] = torch.load(os.path.join(d, OPTIMIZER_FILE), map_location="cpu", weights_only=True)
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


def train_loop_per_worker(config: dict) -> None:
    import ray.train
    import ray.train.torch

    cfg = TrainConfig(**config)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.manual_seed(cfg.seed)
    device = ray.train.torch.get_device()

    manifest = load_manifest(cfg.data)
    train_table, val_table = selection_split(manifest, holdout_fraction=cfg.holdout_fraction, seed=cfg.seed)
    pids = sorted(set(train_table.column("person_id").to_pylist()))
    labels = {pid: i for i, pid in enumerate(pids)}

    cls = get_method(cfg.method)
    recipe = cls.default_recipe.override(**cfg.overrides)
    backbone = BackboneConfig(cfg.model, cfg.pretrained, tuple(cfg.image_size))
    method = cls(backbone, recipe, num_classes=len(labels)).to(device)

    resumed = _restore(ray.train.get_checkpoint())
    if resumed is not None:
        method.load_state_dict(resumed["model_state"], strict=cls.checkpoint_holds_backbone)
        if rank == 0:
            log(f"restored from the checkpoint at step {resumed['global_step']} "
                f"(stage {resumed['stage'] + 1}, epoch {resumed['epoch']})")
    elif cfg.init:
        load_weights(method, cfg.init)
    stages = method.stages()
    if not 0 <= cfg.start_stage < len(stages):
        raise ConfigError(f"method {cfg.method} has stages 1..{len(stages)}; cannot start at stage {cfg.start_stage + 1}")
    start_stage = resumed["stage"] if resumed else cfg.start_stage
    global_step = resumed["global_step"] if resumed else 0

    for stage_index in range(start_stage, len(stages)):
        stage = stages[stage_index]
        recipe = stage.recipe
        method.set_stage(stage)
        counts = method.parameter_counts()
        if rank == 0:
            log(f"stage {stage_index + 1}/{len(stages)} {stage.name!r}: trainable "
                  f"{counts['trainable']:,} of {counts['total']:,} parameters "
                  f"({100.0 * counts['trainable'] / counts['total']:.2f} %)")
        model = ray.train.torch.prepare_model(method, move_to_device=False)

        dataset = CaptionPairs(train_table, labels, cfg.image_size, augment=recipe.augment)
        if len(dataset) < recipe.batch_size * world:
            raise ConfigError(f"{len(dataset)} training pairs cannot fill one global batch of "
                              f"{recipe.batch_size} x {world} workers; lower --batch-size")
        sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=cfg.seed, drop_last=True)
        loader = DataLoader(dataset, batch_size=recipe.batch_size, sampler=sampler, drop_last=True,
                            num_workers=cfg.loader_workers, pin_memory=device.type == "cuda",
                            persistent_workers=cfg.loader_workers > 0)
        steps_per_epoch = len(loader)
        optimizer = build_optimizer(method, stage)
        total = recipe.epochs * steps_per_epoch
        warmup = recipe.warmup_epochs * steps_per_epoch
        decay = recipe.step_decay_epochs * steps_per_epoch
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(
            s, warmup, total, recipe.warmup_factor, recipe.schedule, decay, recipe.step_gamma))
        start_epoch = 0
        if resumed and resumed["stage"] == stage_index and resumed["optimizer_in_stage"]:
            optimizer.load_state_dict(resumed["optimizer_state"]["optimizer"])
            scheduler.load_state_dict(resumed["optimizer_state"]["scheduler"])
            start_epoch = resumed["epoch"]

        for epoch in range(start_epoch, recipe.epochs):
            sampler.set_epoch(epoch)
            model.train()
            tick, seen, running = time.perf_counter(), 0, {}
            for step, batch in enumerate(loader):
                batch = {
                    "images": normalize(batch["image"].to(device, non_blocking=True)),
                    "tokens": method.tokenize(batch["caption"]).to(device),
                    "person_ids": batch["person_id"].to(device),
                    "labels": batch["label"].to(device),
                }
                with autocast(device):
                    losses = model(batch)
                optimizer.zero_grad(set_to_none=True)
                losses["loss"].backward()
                optimizer.step()
                scheduler.step()
                global_step += 1
                seen += recipe.batch_size * world
                for k, v in losses.items():
                    running[k] = running.get(k, 0.0) + float(v.detach())
                done = cfg.max_steps is not None and global_step >= cfg.max_steps
                if rank == 0 and ((step + 1) % cfg.log_every == 0 or step + 1 == steps_per_epoch or done):
                    rate = seen / (time.perf_counter() - tick)
                    terms = " ".join(f"{k} {v / (step + 1):.4f}" for k, v in running.items())
                    log(f"{stage.name} epoch {epoch + 1}/{recipe.epochs} step {step + 1}/{steps_per_epoch} "
                          f"{terms} lr {scheduler.get_last_lr()[0]:.3e} samples/s {rate:.1f}")
                if done:
                    break
            epoch_done = step + 1 == steps_per_epoch
            metrics = {f"train_{k}": _mean_across_workers(v / (step + 1), device) for k, v in running.items()}
            metrics.update(stage=stage_index, stage_name=stage.name, epoch=epoch + int(epoch_done),
                           global_step=global_step, samples_per_s=seen / (time.perf_counter() - tick),
                           lr=scheduler.get_last_lr()[0])
            if rank == 0:
                val = evaluate_split(method, val_table, cfg.image_size, device)
                metrics.update({f"val_{k}": v for k, v in val.items() if isinstance(v, float)})
                log(f"{stage.name} epoch {epoch + 1} val R1 {val['R1']:.2f} R5 {val['R5']:.2f} "
                      f"mAP {val['mAP']:.2f}")
            metrics["restored_from_step"] = resumed["global_step"] if resumed else -1
            _report(method, optimizer, scheduler, metrics, cfg, counts, rank)
            if done:
                return


def _mean_across_workers(value: float, device) -> float:
    if not (dist.is_available() and dist.is_initialized()):
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t.item()) / dist.get_world_size()


def _report(method, optimizer, scheduler, metrics, cfg: TrainConfig, counts, rank) -> None:
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
            "data": cfg.data, "run": cfg.run_name(),
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
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from tpr_ray.ray_utils import init_ray, require_shared_storage

    cls = get_method(cfg.method)
    cls.default_recipe.override(**cfg.overrides)  # fail fast on a bad option, before Ray starts
    out = cfg.out if storage.is_remote(cfg.out) else os.path.abspath(cfg.out)
    run_dir = storage.join(out, cfg.run_name())
    if storage.exists(run_dir) and not cfg.resume:
        raise ConfigError(f"run directory {run_dir} already exists: pass --resume to continue it, "
                          f"or choose another --name / --out")
    init_ray(address)
    require_shared_storage(out, "--out")
    use_gpu = cfg.use_gpu if cfg.use_gpu is not None else ray.cluster_resources().get("GPU", 0) > 0
    config = dataclasses.asdict(cfg)
    config["out"] = out
    # Checkpoints record where the data and the backbone came from: keep those references
    # valid from any working directory.
    for key in ("data", "pretrained", "init"):
        if config[key] and not storage.is_remote(config[key]) and os.path.exists(config[key]):
            config[key] = os.path.abspath(config[key])
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=config,
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=use_gpu,
                                     resources_per_worker={"CPU": cfg.cpus_per_worker}),
        run_config=RunConfig(
            name=cfg.run_name(), storage_path=out,
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.keep_checkpoints,
                                               checkpoint_score_attribute="val_R1",
                                               checkpoint_score_order="max"),
            failure_config=FailureConfig(max_failures=cfg.max_failures),
        ),
    )
    result = trainer.fit()
    if result.checkpoint is None:
        raise ConfigError(f"training run {run_dir} finished without a checkpoint")
    best_ckpt, best_metrics = max(result.best_checkpoints, key=lambda cm: cm[1].get("val_R1", -1.0))
    best = _checkpoint_uri(out, best_ckpt)
    storage.write_json(storage.join(run_dir, BEST_FILE), {
        "checkpoint": best, "metrics": {k: v for k, v in best_metrics.items() if isinstance(v, (int, float, str))},
        "selected_by": "val_R1", "latest": _checkpoint_uri(out, result.checkpoint),
    })
    return TrainResult(run_dir, best, best_metrics, _checkpoint_uri(out, result.checkpoint))
