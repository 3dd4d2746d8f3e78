"""Shared fixtures: one local Ray cluster and one small synthetic dataset per test session."""

import os
import socket

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")

import pytest  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# The S3 endpoint is fixed before any Ray worker starts, so workers inherit it with the
# standard AWS variables (dummy credentials; moto accepts any).
S3_PORT = _free_port()
os.environ.update(AWS_ENDPOINT_URL=f"http://127.0.0.1:{S3_PORT}", AWS_ACCESS_KEY_ID="tpr-test-key-id",
                  AWS_SECRET_ACCESS_KEY="tpr-test-secret", AWS_DEFAULT_REGION="us-east-1")
S3_BUCKET = "tpr-test"


@pytest.fixture(scope="session")
def s3_bucket():
    """A real S3 endpoint on loopback (moto's server) with one bucket; yields the bucket URI."""
    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=S3_PORT, verbose=False)
    server.start()
    boto3.client("s3").create_bucket(Bucket=S3_BUCKET)
    yield f"s3://{S3_BUCKET}"
    server.stop()


@pytest.fixture(scope="session")
def ray_cluster():
    import ray
    import ray.data

    # address="local": always a fresh cluster, never one a simulated multi-node test left behind
    ray.init(address="local", num_cpus=2, include_dashboard=False, object_store_memory=256 * 1024 * 1024)
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def cuhk_small(tmp_path_factory) -> str:
    """A tiny CUHK-PEDES-format dataset (24 identities) shared by the slow tests."""
    from tpr_ray.data import synthesize

    root = tmp_path_factory.mktemp("cuhk_small")
    return synthesize("cuhk", 24, 0, str(root / "CUHK-PEDES"))


TINY = {"model": "tpr-tiny", "pretrained": None}

SOURCE_RECIPE = {"lr": 1e-3, "batch_size": 32, "epochs": 10, "warmup_epochs": 1, "weight_decay": 1e-4}


@pytest.fixture(scope="session")
def baseline_source(ray_cluster, tmp_path_factory) -> str:
    """A tpr-tiny baseline trained on synthetic CUHK style: the pretrained start that the
    other methods' learning tests adapt to another style (run directory; its best checkpoint)."""
    from tpr_ray.data import synthesize
    from tpr_ray.train import TrainConfig, train

    root = tmp_path_factory.mktemp("source")
    data = synthesize("cuhk", 80, 0, str(root / "CUHK-PEDES"))
    result = train(TrainConfig(method="baseline", data=data, out=str(root / "runs"), name="source", **TINY,
                               overrides=SOURCE_RECIPE, loader_workers=0, log_every=100))
    return result.run_dir


@pytest.fixture(scope="session")
def icfg_target(tmp_path_factory) -> str:
    """The target domain of the learning tests: synthetic ICFG-PEDES style, 60 identities
    (its 24 % test split gives ~15 test identities; no val, so training holds some out)."""
    from tpr_ray.data import synthesize

    return synthesize("icfg", 60, 1, str(tmp_path_factory.mktemp("target") / "ICFG-PEDES"))
