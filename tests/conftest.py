"""Shared fixtures: one local Ray cluster and one small synthetic dataset per test session."""

import os

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def ray_cluster():
    import ray
    import ray.data

    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=256 * 1024 * 1024)
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
