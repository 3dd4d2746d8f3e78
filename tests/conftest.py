"""Shared fixtures: one local Ray cluster, one moto S3 server and small synthetic datasets per
test session. Constants shared by test modules are in tests/helpers.py."""

import os

# Tests, and only tests, run Ray without token authentication (the product keeps it on).
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")

import pytest  # noqa: E402

from tests.helpers import S3_BUCKET, S3_ENV, S3_PORT, SOURCE_RECIPE, TINY  # noqa: E402


@pytest.fixture(scope="session")
def s3_server():
    """moto's S3 server on loopback with one bucket, for the whole session."""
    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=S3_PORT, verbose=False)
    server.start()
    boto3.client("s3", endpoint_url=S3_ENV["AWS_ENDPOINT_URL"], aws_access_key_id=S3_ENV["AWS_ACCESS_KEY_ID"],
                 aws_secret_access_key=S3_ENV["AWS_SECRET_ACCESS_KEY"],
                 region_name=S3_ENV["AWS_DEFAULT_REGION"]).create_bucket(Bucket=S3_BUCKET)
    yield f"s3://{S3_BUCKET}"
    server.stop()


@pytest.fixture(scope="module")
def s3_bucket(s3_server):
    """The bucket URI, with the endpoint and dummy credentials in the environment for the
    module's tests only (nothing else sees AWS variables)."""
    with pytest.MonkeyPatch.context() as patch:
        for key, value in S3_ENV.items():
            patch.setenv(key, value)
        yield s3_server


@pytest.fixture(scope="session")
def ray_cluster():
    import ray
    import ray.data

    # address="local": always a fresh cluster, never one a simulated multi-node test left behind.
    # Workers get the loopback S3 endpoint and its dummy credentials: they start once per
    # session, before any test module's environment applies.
    ray.init(address="local", num_cpus=2, include_dashboard=False, object_store_memory=256 * 1024 * 1024,
             runtime_env={"env_vars": S3_ENV})
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def cuhk_small(tmp_path_factory) -> str:
    """A tiny CUHK-PEDES-format dataset (24 identities) shared by the slow tests."""
    from tpr_ray.data import synthesize

    root = tmp_path_factory.mktemp("cuhk_small")
    return synthesize("cuhk", 24, 0, str(root / "CUHK-PEDES"))


@pytest.fixture(scope="session")
def baseline_source(ray_cluster, tmp_path_factory) -> str:
    """A tpr-tiny baseline trained on synthetic CUHK style: the pretrained start that the
    other methods' learning tests adapt to another style (run directory; its best checkpoint)."""
    from tpr_ray.data import synthesize
    from tpr_ray.training.config import TrainConfig
    from tpr_ray.training.driver import train

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
