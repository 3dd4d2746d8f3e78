"""The run folder as the training driver sees it: resume checks, existing runs, best.json.
No Ray here: every case fails (or is decided) before a cluster starts."""

import json
import os

import pytest

from tests.helpers import save_tiny_checkpoint

from tpr_ray.data import load_manifest, manifest_info
from tpr_ray.errors import ConfigError
from tpr_ray.methods import get_method
from tpr_ray.training.config import TrainConfig
from tpr_ray.training.driver import train
from tpr_ray.training.driver import registered_checkpoints

BASE_RECIPE = {"batch_size": 8, "epochs": 2, "lr": 1e-3}


def _fake_checkpoint(run_dir, name, *, data, data_version, model="tpr-tiny", pretrained=None, recipe=None,
                     step=3, val_r1=10.0, method="baseline"):
    """A checkpoint folder as `_report` writes it (only the config matters to the driver)."""
    path = os.path.join(run_dir, name)
    save_tiny_checkpoint(path)  # real weights: the driver validates the checkpoint it would resume
    from tpr_ray.training.driver import from_scratch_overrides

    effective, _ = from_scratch_overrides(pretrained, None, recipe or BASE_RECIPE)  # as the driver records it
    full_recipe = get_method(method).default_recipe.override(**effective).to_dict()
    config = {"method": method, "backbone": {"model": model, "pretrained": pretrained, "image_size": [384, 128]},
              "recipe": full_recipe, "data": data, "data_version": data_version, "global_step": step,
              "metrics": {"global_step": step, "val_R1": val_r1}}
    with open(os.path.join(path, "config.json")) as f:
        config = {**json.load(f), **config}
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f)
    return path


def _config(data, out, **changes):
    base = dict(method="baseline", data=data, out=str(out), name="run", model="tpr-tiny", pretrained=None,
                loader_workers=0, overrides=dict(BASE_RECIPE), resume=True)
    return TrainConfig(**{**base, **changes})


@pytest.fixture
def started_run(cuhk_small, tmp_path):
    """A run folder whose latest checkpoint recorded the current cuhk_small data and BASE_RECIPE."""
    version = manifest_info(load_manifest(cuhk_small)).get("version")
    assert version
    run_dir = tmp_path / "run"
    _fake_checkpoint(str(run_dir), "checkpoint_2026-01-01_00-00-00.000001", data=cuhk_small,
                     data_version=version, step=3)
    return run_dir


@pytest.mark.parametrize("changes, field", [
    ({"overrides": {**BASE_RECIPE, "lr": 1e-5}}, "recipe lr"),
    ({"model": "ViT-S-16"}, "model"),
    ({"pretrained": "openai"}, "pretrained"),
    ({"method": "cskt"}, "method"),
    ({"image_size": (256, 128)}, "image_size"),
])
def test_resume_refuses_another_recipe_model_or_backbone_naming_the_field(started_run, cuhk_small, tmp_path,
                                                                            changes, field):
    with pytest.raises(ConfigError, match=f"--resume .*{field}: the run has"):
        train(_config(cuhk_small, tmp_path, **changes))


def test_resume_with_the_same_settings_passes_the_check(started_run, cuhk_small, tmp_path, monkeypatch):
    import tpr_ray.io.cluster

    def started(address=None):
        raise _Started

    monkeypatch.setattr(tpr_ray.io.cluster, "init_ray", started)
    with pytest.raises(_Started):
        train(_config(cuhk_small, tmp_path))


def test_resume_refuses_other_data_by_manifest_version(started_run, cuhk_small, tmp_path):
    # Same folder, same identity count, other annotations: rewrite the recorded version.
    cfg_path = next(started_run.glob("checkpoint_*/config.json"))
    config = json.loads(cfg_path.read_text())
    config["data_version"] = "0123456789abcdef"
    cfg_path.write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="data version .*'0123456789abcdef'"):
        train(_config(cuhk_small, tmp_path))


def test_resume_compares_with_the_latest_checkpoint(started_run, cuhk_small, tmp_path):
    """The run changed nothing since its first checkpoint, but the newest one is what Ray resumes."""
    version = manifest_info(load_manifest(cuhk_small)).get("version")
    _fake_checkpoint(str(started_run), "checkpoint_2026-01-01_00-00-01.000001", data=cuhk_small,
                     data_version=version, step=9, recipe={**BASE_RECIPE, "epochs": 5})
    with pytest.raises(ConfigError, match="recipe epochs: the run has 5, this command 2"):
        train(_config(cuhk_small, tmp_path))


def test_registered_checkpoints_come_from_ray_trains_snapshot(tmp_path):
    run = tmp_path / "run"
    kept = _fake_checkpoint(str(run), "checkpoint_a", data="d", data_version="v", step=1)
    _fake_checkpoint(str(run), "checkpoint_b", data="d", data_version="v", step=2)  # not registered
    (run / "checkpoint_manager_snapshot.json").write_text(json.dumps(
        {"checkpoint_results": [{"checkpoint_dir_name": "checkpoint_a", "metrics": {"val_R1": 1.0}}]}))
    assert registered_checkpoints(str(run)) == [(kept, {"val_R1": 1.0})]
    (run / "checkpoint_manager_snapshot.json").unlink()  # without a snapshot: the complete folders
    assert [os.path.basename(u) for u, _ in registered_checkpoints(str(run))] == ["checkpoint_a", "checkpoint_b"]
    assert registered_checkpoints(str(tmp_path / "nothing")) == []


class _Started(Exception):
    """Raised instead of starting Ray: the driver got past its run-folder checks."""


def test_a_failed_first_attempt_without_checkpoints_does_not_block_the_corrected_command(cuhk_small, tmp_path,
                                                                                          monkeypatch):
    import tpr_ray.io.cluster

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / ".validate_storage_marker").touch()  # what Ray Train leaves when the loop fails early
    (run_dir / "checkpoint_2026-01-01_00-00-00.000001").mkdir()  # an upload that never completed

    def started(address=None):
        raise _Started

    monkeypatch.setattr(tpr_ray.io.cluster, "init_ray", started)
    with pytest.raises(_Started):
        train(_config(cuhk_small, tmp_path, resume=False))


@pytest.mark.parametrize("folder", ["missing", "without a checkpoint"])
def test_resume_with_nothing_to_resume_says_so_and_starts(cuhk_small, tmp_path, monkeypatch, caplog, folder):
    import tpr_ray.io.cluster

    run_dir = tmp_path / "run"
    if folder == "without a checkpoint":
        (run_dir / "checkpoint_2026-01-01_00-00-00.000001").mkdir(parents=True)  # an upload that never completed

    def started(address=None):
        raise _Started

    monkeypatch.setattr(tpr_ray.io.cluster, "init_ray", started)
    with caplog.at_level("WARNING", logger="tpr_ray"), pytest.raises(_Started):
        train(_config(cuhk_small, tmp_path, resume=True, bad_images="off"))
    assert f"--resume: nothing to resume in {run_dir} (no checkpoint yet): starting the run" in caplog.text


def test_an_interrupted_run_still_names_its_best_checkpoint(cuhk_small, tmp_path, monkeypatch):
    import tpr_ray.io.cluster
    import tpr_ray.training.driver
    from tpr_ray.model.checkpoint import resolve_checkpoint

    run_dir = tmp_path / "run"
    version = manifest_info(load_manifest(cuhk_small)).get("version")

    class Interrupted:
        def fit(self):
            names = ["checkpoint_2026-01-01_00-00-01.000001", "checkpoint_2026-01-01_00-00-02.000001"]
            good = _fake_checkpoint(str(run_dir), names[0], data=cuhk_small, data_version=version, step=4, val_r1=30.0)
            _fake_checkpoint(str(run_dir), names[1], data=cuhk_small, data_version=version, step=8, val_r1=20.0)
            (run_dir / "checkpoint_manager_snapshot.json").write_text(json.dumps({"checkpoint_results": [
                {"checkpoint_dir_name": names[0], "metrics": {"val_R1": 30.0, "global_step": 4}},
                {"checkpoint_dir_name": names[1], "metrics": {"val_R1": 20.0, "global_step": 8}}]}))
            self.good = good
            raise KeyboardInterrupt

    trainer = Interrupted()
    monkeypatch.setattr(tpr_ray.io.cluster, "init_ray", lambda address=None: None)
    monkeypatch.setattr(tpr_ray.io.cluster, "require_shared_storage", lambda *a, **k: None)
    monkeypatch.setattr(tpr_ray.training.driver, "_trainer", lambda *a, **k: trainer)
    with pytest.raises(KeyboardInterrupt):
        train(_config(cuhk_small, tmp_path, resume=False, use_gpu=False))
    best = json.loads((run_dir / "best.json").read_text())
    assert best["checkpoint"] == trainer.good and best["interrupted"] is True
    assert best["latest"].endswith("00-00-02.000001")
    assert resolve_checkpoint(str(run_dir)) == trainer.good


def test_a_random_backbone_trains_with_the_from_scratch_recipe_unless_told_otherwise():
    from tpr_ray.training.driver import FROM_SCRATCH_RECIPE, from_scratch_overrides

    assert from_scratch_overrides(None, None, {}) == (FROM_SCRATCH_RECIPE, FROM_SCRATCH_RECIPE)
    assert from_scratch_overrides("none", None, {"lr": 5e-4}) == ({**FROM_SCRATCH_RECIPE, "lr": 5e-4},
                                                                  {"warmup_epochs": 1, "weight_decay": 1e-4})
    assert from_scratch_overrides("openai", None, {"epochs": 3}) == ({"epochs": 3}, {})
    assert from_scratch_overrides(None, "runs/stage1", {}) == ({}, {})  # weights come from --init


def test_the_driver_applies_the_from_scratch_recipe_and_says_so(cuhk_small, tmp_path, monkeypatch, caplog):
    import tpr_ray.io.cluster
    import tpr_ray.training.driver

    seen = {}

    def capture(cfg, config, use_gpu, datasets=None):
        seen.update(config)
        raise _Started

    monkeypatch.setattr(tpr_ray.io.cluster, "init_ray", lambda address=None: None)
    monkeypatch.setattr(tpr_ray.io.cluster, "require_shared_storage", lambda *a, **k: None)
    monkeypatch.setattr(tpr_ray.training.driver, "_trainer", capture)
    with caplog.at_level("WARNING", logger="tpr_ray"), pytest.raises(_Started):
        train(_config(cuhk_small, tmp_path, resume=False, use_gpu=False, overrides={"epochs": 2}, bad_images="off"))
    assert seen["overrides"] == {"lr": 1e-3, "warmup_epochs": 1, "weight_decay": 1e-4, "epochs": 2}
    assert "random-init backbone" in caplog.text and "--lr" in caplog.text


def test_a_recipe_tuple_recorded_as_a_json_list_is_the_same_setting():
    from tpr_ray.training.driver import resume_mismatches

    base = {"method": "cfine", "model": "m", "pretrained": None, "image_size": [8, 4], "data": "d",
            "data_version": "v"}
    recorded = {**base, "recipe": {"step_milestones": [20, 25, 35]}}
    assert resume_mismatches(recorded, {**base, "recipe": {"step_milestones": (20, 25, 35)}}) == []
    assert resume_mismatches(recorded, {**base, "recipe": {"step_milestones": (20, 30)}})
