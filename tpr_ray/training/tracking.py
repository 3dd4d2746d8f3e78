"""Experiment tracking of a training run: TensorBoard event files always, MLflow when asked.

As Ray Train's experiment-tracking guide does it: the rank-0 worker logs from inside the
training function with the tracking libraries themselves. Event files live in
``RUN/tensorboard`` (``tensorboard --logdir OUT`` shows every run under OUT); on object
storage they are written locally and copied up after every epoch. MLflow is optional: the
driver opens (or, on ``--resume``, reopens) one MLflow run per training run, the worker logs
metrics into it, and the driver adds the best checkpoint at the end.
"""

from __future__ import annotations

import os
import shutil
import tempfile

from tpr_ray.io import storage
from tpr_ray.errors import ConfigError

TENSORBOARD_DIR = "tensorboard"
MLFLOW_FILE = "mlflow.json"  # the MLflow run a resumed training run keeps logging into
MLFLOW_EXPERIMENT = "tpr-ray"


class Tracker:
    """Scalars of one worker (rank 0) to TensorBoard and, with a run id, MLflow."""

    def __init__(self, run_dir: str, mlflow_uri: str | None = None, mlflow_run_id: str | None = None):
        from tensorboardX import SummaryWriter

        self.remote = storage.is_remote(run_dir)
        self.target = storage.join(run_dir, TENSORBOARD_DIR)
        self.local = tempfile.mkdtemp(prefix="tpr-tb-") if self.remote else self.target
        self.writer = SummaryWriter(self.local, flush_secs=30)
        self.mlflow = None
        if mlflow_run_id:
            mlflow = import_mlflow()
            mlflow.set_tracking_uri(mlflow_uri)
            mlflow.start_run(run_id=mlflow_run_id)
            self.mlflow = mlflow

    def log(self, scalars: dict, step: int) -> None:
        """Numbers under names like ``train/loss``, ``val/R1``, ``lr``; other values are ignored."""
        numbers = {k: float(v) for k, v in scalars.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        for name, value in numbers.items():
            self.writer.add_scalar(name, value, step)
        if self.mlflow is not None and numbers:
            # MLflow's metric names allow "/"; keep the same names as TensorBoard.
            self.mlflow.log_metrics(numbers, step=step)

    def flush(self) -> None:
        self.writer.flush()
        self._upload()

    def _upload(self) -> None:
        if self.remote:
            fs, path = storage.filesystem(self.target)
            for name in os.listdir(self.local):  # one event file per writer; copied whole each time
                fs.put_file(os.path.join(self.local, name), f"{path}/{name}")

    def close(self) -> None:
        self.writer.close()
        self._upload()
        if self.mlflow is not None:
            self.mlflow.end_run()
        if self.remote:
            shutil.rmtree(self.local, ignore_errors=True)


class NoTracker:
    """What the other ranks get: their numbers are already in rank 0's averages."""

    def log(self, scalars: dict, step: int) -> None:
        pass

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


def epoch_scalars(metrics: dict) -> dict:
    """An epoch's report as tracking names: ``train_loss`` -> ``train/loss``, ``val_R1`` -> ``val/R1``."""
    out = {}
    for key, value in metrics.items():
        prefix, _, rest = key.partition("_")
        if prefix in ("train", "val") and rest:
            out[f"{prefix}/{rest}"] = value
        elif key in ("lr", "samples_per_s", "epoch", "stage"):
            out[key] = value
    return out


# --- MLflow, on the driver --------------------------------------------------------------

def import_mlflow():
    try:
        import mlflow
    except ImportError:
        raise ConfigError("MLflow tracking needs the mlflow package: pip install mlflow "
                          "(or leave out --mlflow and MLFLOW_TRACKING_URI)") from None
    return mlflow


def mlflow_uri(option: str | None) -> str | None:
    """``--mlflow URI``, else MLflow's own MLFLOW_TRACKING_URI; None when neither is set."""
    return option or os.environ.get("MLFLOW_TRACKING_URI") or None


def open_mlflow_run(uri: str, run_dir: str, run_name: str, params: dict) -> str:
    """The MLflow run id for this training run: the one recorded in the run folder when it
    was started against the same tracking URI, else a new run with ``params``."""
    mlflow = import_mlflow()
    mlflow.set_tracking_uri(uri)
    record = storage.join(run_dir, MLFLOW_FILE)
    if storage.exists(record):
        known = storage.read_json(record)
        if known.get("tracking_uri") == uri:
            return known["run_id"]
    mlflow.set_experiment(os.environ.get("MLFLOW_EXPERIMENT_NAME") or MLFLOW_EXPERIMENT)
    with mlflow.start_run(run_name=run_name) as run:
        mlflow.log_params({k: v for k, v in flatten(params).items()})
        run_id = run.info.run_id
    storage.write_json(record, {"tracking_uri": uri, "run_id": run_id})
    return run_id


def log_best_to_mlflow(uri: str, run_id: str, best_checkpoint: str, metrics: dict) -> None:
    """The selected checkpoint's files as artifacts of the MLflow run, with its metrics as ``best/...``."""
    from tpr_ray.model.checkpoint import CONFIG_FILE, MODEL_FILE

    mlflow = import_mlflow()
    mlflow.set_tracking_uri(uri)
    with mlflow.start_run(run_id=run_id):
        mlflow.log_metrics({f"best/{k}": float(v) for k, v in metrics.items()
                            if isinstance(v, (int, float)) and not isinstance(v, bool)})
        mlflow.set_tag("best_checkpoint", best_checkpoint)
        with tempfile.TemporaryDirectory() as tmp:
            for name in (MODEL_FILE, CONFIG_FILE):
                with open(os.path.join(tmp, name), "wb") as f:
                    f.write(storage.read_bytes(storage.join(best_checkpoint, name)))
            mlflow.log_artifacts(tmp, artifact_path="best_checkpoint")


def flatten(params: dict, prefix: str = "") -> dict:
    """Nested settings as ``a.b`` keys with string values (MLflow params are strings)."""
    flat = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = str(value)
    return flat
