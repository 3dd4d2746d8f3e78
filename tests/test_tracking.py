"""Experiment tracking: TensorBoard event files always, MLflow when asked (a fake mlflow module
stands in for the optional package; the calls are what MLflow's fluent API takes)."""

import glob
import json
import struct
import sys
import types

import pytest

from tpr_ray.errors import ConfigError
from tpr_ray.training.tracking import Tracker, epoch_scalars, log_best_to_mlflow, open_mlflow_run


def read_scalars(logdir) -> dict[str, list[tuple[int, float]]]:
    """{tag: [(step, value), ...]} from TensorBoard event files (TFRecord framing, Event protos)."""
    from tensorboardX.proto import event_pb2

    scalars = {}
    for path in sorted(glob.glob(f"{logdir}/events.out.tfevents.*")):
        data = open(path, "rb").read()
        offset = 0
        while offset < len(data):
            (length,) = struct.unpack("<Q", data[offset:offset + 8])
            event = event_pb2.Event.FromString(data[offset + 12:offset + 12 + length])
            offset += 12 + length + 4
            for value in event.summary.value:
                scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
    return scalars


def test_tracker_writes_tensorboard_scalars_under_the_run_folder(tmp_path):
    tracker = Tracker(str(tmp_path / "run"))
    tracker.log({"train/loss": 2.5, "lr": 1e-4, "samples_per_s": 80.0, "stage_name": "finetune"}, step=20)
    tracker.log(epoch_scalars({"train_loss": 2.0, "val_R1": 40.0, "val_mAP": 30.0, "lr": 5e-5, "global_step": 40,
                               "restored_from_step": -1}), step=40)
    tracker.close()
    scalars = read_scalars(tmp_path / "run" / "tensorboard")
    assert scalars["train/loss"] == [(20, 2.5), (40, 2.0)]
    assert scalars["val/R1"] == [(40, 40.0)] and scalars["val/mAP"] == [(40, 30.0)]
    assert [s for s, _ in scalars["lr"]] == [20, 40] and scalars["samples_per_s"] == [(20, 80.0)]
    assert "stage_name" not in scalars and "global_step" not in scalars and "restored_from_step" not in scalars


class FakeMlflow(types.ModuleType):
    """Records the fluent-API calls tpr-ray makes."""

    def __init__(self):
        super().__init__("mlflow")
        self.calls, self.runs, self.active = [], 0, None

    def set_tracking_uri(self, uri):
        self.calls.append(("uri", uri))

    def set_experiment(self, name):
        self.calls.append(("experiment", name))

    def start_run(self, run_id=None, run_name=None):
        if run_id is None:
            self.runs += 1
            run_id = f"run{self.runs}"
        self.active = run_id
        self.calls.append(("start", run_id, run_name))
        fake = self

        class Run:
            info = types.SimpleNamespace(run_id=run_id)

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                fake.end_run()

        return Run()

    def end_run(self):
        self.calls.append(("end", self.active))

    def log_params(self, params):
        self.calls.append(("params", self.active, dict(params)))

    def log_metrics(self, metrics, step=None):
        self.calls.append(("metrics", self.active, dict(metrics), step))

    def set_tag(self, key, value):
        self.calls.append(("tag", self.active, key, value))

    def log_artifacts(self, local_dir, artifact_path=None):
        import os

        self.calls.append(("artifacts", self.active, sorted(os.listdir(local_dir)), artifact_path))


@pytest.fixture
def fake_mlflow(monkeypatch):
    fake = FakeMlflow()
    monkeypatch.setitem(sys.modules, "mlflow", fake)
    return fake


def test_mlflow_run_gets_params_metrics_and_the_best_checkpoint_and_is_reused_on_resume(fake_mlflow, tmp_path):
    run_dir = str(tmp_path / "run")
    uri = f"file://{tmp_path}/mlruns"
    run_id = open_mlflow_run(uri, run_dir, "demo", {"method": "baseline", "recipe": {"lr": 1e-3}})
    assert ("params", run_id, {"method": "baseline", "recipe.lr": "0.001"}) in fake_mlflow.calls
    assert json.loads((tmp_path / "run" / "mlflow.json").read_text()) == {"tracking_uri": uri, "run_id": run_id}
    assert open_mlflow_run(uri, run_dir, "demo", {}) == run_id  # --resume continues the same MLflow run
    assert open_mlflow_run("file:///elsewhere", run_dir, "demo", {}) != run_id

    tracker = Tracker(run_dir, uri, run_id)
    tracker.log({"val/R1": 12.5, "stage_name": "x"}, step=7)
    tracker.close()
    assert ("metrics", run_id, {"val/R1": 12.5}, 7) in fake_mlflow.calls

    checkpoint = tmp_path / "run" / "checkpoint_x"
    checkpoint.mkdir()
    (checkpoint / "model.pt").write_bytes(b"weights")
    (checkpoint / "config.json").write_text("{}")
    log_best_to_mlflow(uri, run_id, str(checkpoint), {"val_R1": 12.5, "stage_name": "x"})
    assert ("artifacts", run_id, ["config.json", "model.pt"], "best_checkpoint") in fake_mlflow.calls
    assert ("metrics", run_id, {"best/val_R1": 12.5}, None) in fake_mlflow.calls


def test_mlflow_option_without_the_package_is_one_clear_error_before_ray_starts(cuhk_small, tmp_path, monkeypatch):
    import tpr_ray.io.cluster
    from tpr_ray.training.config import TrainConfig
    from tpr_ray.training.driver import train

    monkeypatch.setitem(sys.modules, "mlflow", None)  # import mlflow -> ImportError
    monkeypatch.setattr(tpr_ray.io.cluster, "init_ray", lambda address=None: pytest.fail("Ray started"))
    cfg = TrainConfig(method="baseline", data=cuhk_small, out=str(tmp_path), model="tpr-tiny", pretrained=None,
                      mlflow=f"file://{tmp_path}/mlruns", bad_images="off")
    with pytest.raises(ConfigError, match="pip install mlflow"):
        train(cfg)


def test_tensorboard_files_of_a_run_on_object_storage_are_copied_up(s3_bucket, tmp_path):
    from tpr_ray.io import storage
    run_dir = f"{s3_bucket}/tracking/run"
    tracker = Tracker(run_dir)
    tracker.log({"train/loss": 1.0}, step=1)
    tracker.flush()  # after every epoch
    tracker.log({"train/loss": 0.5}, step=2)
    tracker.close()
    fs, path = storage.filesystem(f"{run_dir}/tensorboard")
    files = fs.ls(path, detail=False)
    assert len(files) == 1 and "events.out.tfevents" in files[0]
    local = tmp_path / "copy"
    local.mkdir()
    fs.get(files[0], str(local / files[0].rsplit("/", 1)[1]))
    assert read_scalars(local)["train/loss"] == [(1, 1.0), (2, 0.5)]
