"""A training run's folder as the driver sees it: its registered checkpoints, and whether a
``--resume`` asks for the run those checkpoints belong to."""

from __future__ import annotations

import json
import posixpath

from tpr_ray import storage
from tpr_ray.checkpoint import BEST_FILE, CONFIG_FILE
from tpr_ray.errors import ConfigError

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
        if old != new:
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
