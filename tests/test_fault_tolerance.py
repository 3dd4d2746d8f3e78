"""Surviving failures on a simulated multi-node cluster (ray.cluster_utils.Cluster, CPU
only, storage on moto's S3 server). Each scenario runs in its own process: see
tests/fault_scenarios.py for what is killed and when."""

import json
import os
import subprocess
import sys

import pytest

from tests.helpers import S3_BUCKET, S3_ENV

SECRETS = (S3_ENV["AWS_SECRET_ACCESS_KEY"], S3_ENV["AWS_ACCESS_KEY_ID"])


def run_scenario(name: str, work) -> dict:
    proc = subprocess.run([sys.executable, "-m", "tests.fault_scenarios", name, str(work)],
                          capture_output=True, text=True, timeout=900, env={**os.environ, "TPR_TEST_BUCKET": f"s3://{S3_BUCKET}"})
    lines = [line for line in proc.stdout.splitlines() if line.startswith("FINDINGS ")]
    assert proc.returncode == 0 and lines, f"scenario {name} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    findings = json.loads(lines[-1][len("FINDINGS "):])
    print(name, {k: v for k, v in findings.items() if k != "driver_log"})
    return findings


def steps_per_epoch(findings) -> int:
    final = findings["final"]
    return final["global_step"] // 5  # RECIPE epochs = 5


@pytest.mark.slow
def test_training_survives_a_worker_node_dying(s3_bucket, tmp_path):
    f = run_scenario("train-node-failure", tmp_path)
    assert f["local_out_refused"] is True
    assert f["error"] is None
    assert f["checkpoints_before_failure"] >= 1 and f["training_alive_at_failure"]
    final = f["final"]
    assert final["stage"] == 1 and final["epoch"] == 0  # past the last epoch of the only stage
    per_epoch = steps_per_epoch(f)
    assert per_epoch > 0 and final["global_step"] == 5 * per_epoch  # no step lost or repeated in the count
    assert f["complete"]  # every kept checkpoint has all of its files
    restored = [c["restored_from_step"] for c in f["checkpoints"]]
    assert max(restored) > 0  # the restarted workers continued from a checkpoint


@pytest.mark.slow
def test_embedding_survives_a_node_dying_with_every_image_once(s3_bucket, tmp_path):
    f = run_scenario("embed-node-failure", tmp_path)
    assert f["error"] is None and f["complete"]
    assert 2 <= f["shards_before_failure"] < 24
    assert f["rows"] == f["inputs"] == 240
    assert f["lost"] == 0 and f["duplicates"] == 0


@pytest.mark.slow
def test_killed_training_driver_resumes_and_leaks_no_credentials(s3_bucket, tmp_path):
    f = run_scenario("train-driver-killed", tmp_path)
    assert f["error"] is None
    assert f["checkpoints_when_killed"] >= 1
    final = f["final"]
    assert final["stage"] == 1 and final["global_step"] == 5 * steps_per_epoch(f)
    assert final["metrics"]["restored_from_step"] > 0
    assert f["complete"]
    # no credential in the driver's log, nor in anything written to storage
    assert not any(secret in f["driver_log"] for secret in SECRETS)
    import fsspec
    fs = fsspec.filesystem("s3")
    for path in fs.find(S3_BUCKET):
        if path.endswith((".json", ".pt", ".parquet")):
            data = fs.cat(path)
            assert not any(secret.encode() in data for secret in SECRETS), path
