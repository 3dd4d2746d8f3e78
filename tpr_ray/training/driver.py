"""The training driver: ``train(cfg)`` runs a ``TorchTrainer`` over ``train_loop_per_worker``.

Around ``trainer.fit()``: the run folder (is it a run, does a
``--resume`` match it, which checkpoints did Ray Train register, best.json), the up-front
image check and the MLflow run."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
import json
import logging
import os
import posixpath
from tpr_ray.io import storage
from tpr_ray.methods.backbone import BackboneConfig
from tpr_ray.model.checkpoint import BEST_FILE, CONFIG_FILE, validate_checkpoint
from tpr_ray.errors import ConfigError, DataError
from tpr_ray.methods import get_method
from tpr_ray.training.config import TrainConfig

log = logging.getLogger(__name__)

# Ray Train's record of the checkpoints it registered (written after each upload completes).
SNAPSHOT_FILE = "checkpoint_manager_snapshot.json"
CHECKPOINT_PREFIX = "checkpoint_"


def registered_checkpoints(run_dir: str) -> list[tuple[str, dict]]:
    """(checkpoint URI, reported metrics) of every complete checkpoint in a run folder, oldest first.

    Ray Train's snapshot names the checkpoints it registered; without one (a run killed before
    it was written, or another Ray version) the checkpoint folders holding a config are used."""
    snapshot = storage.join(run_dir, SNAPSHOT_FILE)
    if storage.exists(snapshot):
        try:
            results = storage.read_json(snapshot)["checkpoint_results"]
            found = [(storage.join(run_dir, r["checkpoint_dir_name"]), r.get("metrics") or {}) for r in results]
        except (json.JSONDecodeError, KeyError, TypeError):
            found = None  # a format we do not know: fall back to the folders themselves
        if found is not None:
            return [(uri, metrics) for uri, metrics in found if storage.exists(storage.join(uri, CONFIG_FILE))]
    fs, path = storage.filesystem(run_dir)
    if not fs.exists(path):
        return []
    found = []
    for entry in sorted(fs.ls(path, detail=False)):  # names carry their timestamp: sorted = oldest first
        name = posixpath.basename(entry.rstrip("/"))
        uri = storage.join(run_dir, name)
        if name.startswith(CHECKPOINT_PREFIX) and storage.exists(storage.join(uri, CONFIG_FILE)):
            found.append((uri, storage.read_json(storage.join(uri, CONFIG_FILE)).get("metrics") or {}))
    return found


def run_identity(method: str, data: str, data_version: str | None, backbone: dict, recipe: dict) -> dict:
    """What a resumed run must share with the run it continues."""
    return {"method": method, "data": data, "data_version": data_version, "model": backbone["model"],
            "pretrained": backbone.get("pretrained"), "image_size": list(backbone["image_size"]), "recipe": recipe}


def recorded_identity(checkpoint_config: dict) -> dict:
    c = checkpoint_config
    return run_identity(c["method"], c.get("data"), c.get("data_version"), c["backbone"], c["recipe"])


def _as_json(value):
    return json.loads(json.dumps(value))


def resume_mismatches(recorded: dict, requested: dict) -> list[str]:
    """One line per field that differs. Data counts as the same when the manifest versions agree
    (a dataset may move); fields a checkpoint did not record yet are not compared."""
    lines = []

    def differ(name, old, new):
        lines.append(f"{name}: the run has {old!r}, this command {new!r}")

    for key in ("method", "model", "pretrained", "image_size"):
        if recorded[key] != requested[key]:
            differ(key, recorded[key], requested[key])
    if recorded["data_version"] and requested["data_version"]:
        if recorded["data_version"] != requested["data_version"]:
            differ("data version (annotation content hash)", recorded["data_version"], requested["data_version"])
    elif recorded["data"] and recorded["data"] != requested["data"]:
        differ("data", recorded["data"], requested["data"])
    for key, old in recorded["recipe"].items():
        new = requested["recipe"].get(key, old)
        if _as_json(old) != _as_json(new):  # the record went through JSON: tuples came back as lists
            differ(f"recipe {key}", old, new)
    return lines


def check_resume(run_dir: str, latest: str, requested: dict) -> None:
    """Refuse to continue ``run_dir`` with another data, backbone or recipe than it was started with."""
    recorded = recorded_identity(storage.read_json(storage.join(latest, CONFIG_FILE)))
    lines = resume_mismatches(recorded, requested)
    if lines:
        raise ConfigError(f"--resume {run_dir}: this command differs from the run it would continue; "
                          + "; ".join(lines) + ". Use the run's settings, or start a new run with another --name")


def latest_checkpoint(checkpoints: list[tuple[str, dict]]) -> str:
    return max(checkpoints, key=lambda c: c[1].get("global_step", -1))[0]


def write_best(run_dir: str, checkpoints: list[tuple[str, dict]], latest: str, *, interrupted: bool = False) -> tuple:
    """Record the checkpoint with the highest validation R@1 in ``best.json`` (what ``--checkpoint
    RUN`` uses); returns (uri, metrics) of it."""
    best, metrics = max(checkpoints, key=lambda c: c[1].get("val_R1", -1.0))
    record = {"checkpoint": best, "selected_by": "val_R1", "latest": latest,
              "metrics": {k: v for k, v in metrics.items() if isinstance(v, (int, float, str))}}
    if interrupted:
        record["interrupted"] = True  # the run stopped early: best of the checkpoints it had registered
    storage.write_json(storage.join(run_dir, BEST_FILE), record)
    return best, metrics


# --- the recipe of a randomly initialised backbone ------------------------------------

# The papers' recipes fine-tune pretrained CLIP at lr 1e-5; a random network barely moves at
# that rate (the tiny model stayed at chance: R1 11.1 vs 20.4). These settings learn from scratch
# on the synthetic data (the demo's and crosseval's former overrides).
FROM_SCRATCH_RECIPE = {"lr": 1e-3, "warmup_epochs": 1, "weight_decay": 1e-4}


def is_random_init(pretrained: str | None, init: str | None) -> bool:
    return init is None and (pretrained is None or pretrained.strip().lower() in ("", "none"))


def from_scratch_overrides(pretrained: str | None, init: str | None, overrides: dict) -> tuple[dict, dict]:
    """(recipe overrides to train with, the from-scratch settings added to them): with a random
    backbone, FROM_SCRATCH_RECIPE fills every key the user did not set; otherwise nothing changes."""
    if not is_random_init(pretrained, init):
        return dict(overrides), {}
    added = {k: v for k, v in FROM_SCRATCH_RECIPE.items() if k not in overrides}
    return {**added, **overrides}, added


def with_recipe_rules(cfg: TrainConfig) -> tuple[TrainConfig, str | None]:
    """``cfg`` with the from-scratch settings when its backbone starts random, and the note
    that says so (shown once the checks have passed: an error, if any, comes first)."""
    overrides, added = from_scratch_overrides(cfg.pretrained, cfg.init, cfg.overrides)
    note = None
    if added:
        settings = ", ".join(f"{k}={v}" for k, v in added.items())
        note = (f"random-init backbone (--pretrained none): training with the from-scratch recipe {settings} "
                f"instead of the pretrained-CLIP one; pass --lr / --set KEY=VALUE to choose otherwise")
    return dataclasses.replace(cfg, overrides=overrides), note


# --- the driver's steps before fit() ------------------------------------------------

def absolute_references(cfg: TrainConfig) -> dict:
    """The config the workers get. Checkpoints record where the data and the backbone came
    from: keep those references valid from any working directory."""
    config = dataclasses.asdict(cfg)
    config["out"] = cfg.out if storage.is_remote(cfg.out) else os.path.abspath(cfg.out)
    for key in ("data", "pretrained", "init"):
        if config[key] and not storage.is_remote(config[key]) and os.path.exists(config[key]):
            config[key] = os.path.abspath(config[key])
    return config


def check_run_folder(cfg: TrainConfig, config: dict, recipe, run_dir: str) -> str | None:
    """A new run needs a free name; a resumed one must be the run its checkpoints belong to.
    Returns a note when --resume finds nothing to resume: the run starts, and says so (a
    re-submitted Ray job with --resume continues; its first submission starts the run)."""
    from tpr_ray.data import load_manifest, manifest_info

    # A folder without checkpoints (a first attempt that failed early) holds nothing to keep.
    checkpoints = registered_checkpoints(run_dir)
    if checkpoints and not cfg.resume:
        raise ConfigError(f"run {run_dir} already has {len(checkpoints)} checkpoint(s): pass --resume to continue "
                          f"it, or choose another --name / --out")
    if cfg.resume and not checkpoints:
        return f"--resume: nothing to resume in {run_dir} (no checkpoint yet): starting the run"
    if checkpoints:
        latest = latest_checkpoint(checkpoints)
        version = manifest_info(load_manifest(config["data"])).get("version")
        backbone = BackboneConfig(cfg.model, config["pretrained"], tuple(cfg.image_size)).to_dict()
        check_resume(run_dir, latest, run_identity(cfg.method, config["data"], version, backbone, recipe.to_dict()))
        validate_checkpoint(latest, "--resume")  # what the workers will load, checked before Ray starts


def skipped_images(cfg: TrainConfig, config: dict) -> list[str]:
    """Images the run leaves out: the user's list plus what the up-front check found unreadable."""
    from tpr_ray.training.inputs import check_images

    found = check_images(config["data"], cfg.image_size, cfg.bad_images, cfg.holdout_fraction, cfg.seed)
    if found:
        log.warning(f"skipping {len(found)} unreadable training image(s) (--bad-images skip), e.g. {found[0]}")
    return sorted(set(cfg.exclude_images) | set(found))


def mlflow_run(cfg: TrainConfig, config: dict, recipe, run_dir: str) -> tuple[str | None, str | None]:
    """(tracking URI, run id) when MLflow is asked for (--mlflow, or MLflow's environment)."""
    from tpr_ray.training.tracking import mlflow_uri, open_mlflow_run

    uri = mlflow_uri(cfg.mlflow)
    if uri is None:
        return None, None
    if cfg.mlflow is None:
        try:
            import mlflow  # noqa: F401
        except ImportError:
            log.warning("MLFLOW_TRACKING_URI is set but mlflow is not installed: logging to TensorBoard only")
            return None, None
    params = {key: config[key] for key in ("method", "data", "model", "pretrained", "image_size", "num_workers",
                                           "seed", "init", "start_stage")}
    return uri, open_mlflow_run(uri, run_dir, cfg.run_name(), {**params, "recipe": recipe.to_dict()})


def prepare_decoded_cache(cfg: TrainConfig, config: dict) -> str:
    """The decoded cache folder of the manifest's train split at this image size, built now (one
    Ray Data job) when missing. An exception raised while decoding fails the job: only what the
    decode stage records as unreadable becomes a reject."""
    from tpr_ray.training import decoded_cache
    from tpr_ray.io.cluster import require_shared_storage

    root = decoded_cache.resolve_root(config["data"], cfg.decoded_cache)
    require_shared_storage(root, "--decoded-cache")
    folder = decoded_cache.ensure(config["data"], "train", cfg.image_size, root)
    check_cache_rejects(decoded_cache.read_marker(folder), config["exclude_images"], cfg.bad_images, folder)
    return folder


def check_cache_rejects(marker: dict, excluded: list[str], policy: str, folder: str) -> None:
    """Refuse a cache that lost images the up-front check read.

    With ``--bad-images fail|skip`` every train-split image was decoded before the build, so an
    image recorded unreadable there and not excluded failed for another reason than its bytes
    (a fault of access during the build, or a file replaced since): it must not silently drop
    out of training."""
    if policy == "off":
        return
    lost = [r for r in marker["rejects"] if r["image_uri"] not in set(excluded)]
    if lost:
        first = lost[0]
        raise DataError(f"the decoded cache records {len(lost)} image(s) as unreadable that the up-front check read "
                        f"(first: {first['image_uri']}: {first['reason']}); a fault of access during the build, or "
                        f"the images changed: delete the cache folder and run again", file=folder)


def decoded_training_stream(cfg: TrainConfig, config: dict):
    """``--decoded-stream``: this run's training pairs as a Ray Dataset read shard by shard from the
    cache (for ``TorchTrainer(datasets=...)``), the same selection and labels the workers use."""
    from tpr_ray.training.decoded_cache import stream_pairs
    from tpr_ray.training.inputs import load_training_data

    data = load_training_data(config["data"], cfg.holdout_fraction, cfg.seed, exclude=config["exclude_images"])
    return stream_pairs(config["decoded_cache"], data.train, data.labels)


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

    from tpr_ray.io.cluster import init_ray, require_shared_storage

    cfg, recipe_note = with_recipe_rules(cfg)
    recipe = get_method(cfg.method).default_recipe.override(**cfg.overrides)  # fail fast, before Ray starts
    if cfg.decoded_stream and not cfg.decoded_cache:
        raise ConfigError("--decoded-stream streams the decoded cache: give --decoded-cache too")
    if cfg.init:
        from tpr_ray.model.checkpoint import check_init

        check_init(cfg.init, cfg.method)  # its files, before the data and Ray
    config = absolute_references(cfg)
    out, run_dir = config["out"], storage.join(config["out"], cfg.run_name())
    resume_note = check_run_folder(cfg, config, recipe, run_dir)
    config["exclude_images"] = skipped_images(cfg, config)
    config["mlflow"], config["mlflow_run_id"] = mlflow_run(cfg, config, recipe, run_dir)
    for note in (resume_note, recipe_note):  # after the checks: an error, if any, is the first line
        if note:
            log.warning(note)
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
        from tpr_ray.training.tracking import log_best_to_mlflow

        log_best_to_mlflow(config["mlflow"], config["mlflow_run_id"], best, best_metrics)
    return TrainResult(run_dir, best, best_metrics, latest)


def _trainer(cfg: TrainConfig, config: dict, use_gpu: bool, datasets: dict | None = None):
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from tpr_ray.training.loop import train_loop_per_worker

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
