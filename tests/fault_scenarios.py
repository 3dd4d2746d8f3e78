"""Failure scenarios on a simulated multi-node Ray cluster, with storage on S3.

Each scenario runs in its own process (``python -m tests.fault_scenarios NAME WORKDIR``),
because a ``ray.cluster_utils.Cluster`` cannot share a process with the test session's
local cluster. It prints one JSON line of findings that tests/test_fault_tolerance.py checks.
The S3 endpoint and dummy credentials come from the environment (set by the s3_bucket fixture).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")

import ray  # noqa: E402
from ray.cluster_utils import Cluster  # noqa: E402

from tpr_ray.io import storage  # noqa: E402
from tpr_ray.model.checkpoint import CONFIG_FILE, MODEL_FILE, OPTIMIZER_FILE  # noqa: E402
from tpr_ray.data import synthesize  # noqa: E402
from tpr_ray.errors import ConfigError  # noqa: E402
from tpr_ray.training.config import TrainConfig  # noqa: E402
from tpr_ray.training.driver import train
from tests.helpers import TINY  # noqa: E402

BUCKET = os.environ.get("TPR_TEST_BUCKET", "s3://tpr-test")
RECIPE = {"batch_size": 8, "epochs": 3, "lr": 1e-3, "warmup_epochs": 0}


def start_cluster(worker_nodes: int, cpus_per_node: int) -> tuple[Cluster, list]:
    """A head with no CPUs (it only hosts the driver's bookkeeping) and CPU worker nodes."""
    # a killed node is found dead after 5 failed health checks 1 s apart (Ray's default: 3 s apart)
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 0, "_system_config": {"health_check_period_ms": 1000, "health_check_timeout_ms": 5000}})
    nodes = [cluster.add_node(num_cpus=cpus_per_node) for _ in range(worker_nodes)]
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, include_dashboard=False, log_to_driver=False)
    return cluster, nodes


def _children(pid: int) -> list[int]:
    kids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        kids.append(int(entry))
            except (OSError, IndexError, ValueError):
                continue
    return kids


def kill_node(cluster: Cluster, node) -> int:
    """A node dies: its worker processes (children of its raylet) are killed, then the node.

    Removing a simulated node alone can leave its workers running for a while (they talk to
    each other over gloo without the raylet), which is not what a dead machine does.
    """
    raylet = node.all_processes["raylet"][0].process.pid
    workers = _children(raylet)
    for pid in workers:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    cluster.remove_node(node, allow_graceful=False)
    return len(workers)


def upload_dataset(work: str, name: str, n_ids: int) -> str:
    local = synthesize("cuhk", n_ids, 0, os.path.join(work, name))
    fs, bucket = storage.filesystem(BUCKET)
    fs.put(local, f"{bucket}/{name}", recursive=True)
    return f"{BUCKET}/{name}"


def checkpoints(run_dir: str) -> list[str]:
    """Checkpoint folders that hold files (object stores may keep an empty marker of a deleted one)."""
    fs, path = storage.filesystem(run_dir)
    if not fs.exists(path):
        return []
    found = []
    for entry in fs.ls(path, detail=False):
        name = os.path.basename(entry.rstrip("/"))
        if name.startswith("checkpoint_") and not name.endswith(".json"):
            if any(os.path.basename(p) for p in fs.ls(entry, detail=False) if p.rstrip("/") != entry.rstrip("/")):
                found.append(entry)
    return sorted(found)


def registered(run_dir: str) -> list[str]:
    """Checkpoints Ray Train has registered (fully uploaded and reported), from its snapshot."""
    try:
        snapshot = storage.read_json(f"{run_dir}/checkpoint_manager_snapshot.json")
    except Exception:  # not written yet, or being replaced
        return []
    return [c["checkpoint_dir_name"] for c in snapshot["checkpoint_results"]]


def checkpoint_report(run_dir: str) -> dict:
    """Every checkpoint's files and position. Registered checkpoints must be whole; a folder
    left by an upload cut short by the failure is listed as unregistered (never used)."""
    fs, _ = storage.filesystem(run_dir)
    names_registered = set(registered(run_dir))
    found, orphans = [], []
    for path in checkpoints(run_dir):
        names = sorted(os.path.basename(p) for p in fs.ls(path, detail=False) if p.rstrip("/") != path.rstrip("/"))
        if os.path.basename(path.rstrip("/")) not in names_registered:
            orphans.append(names)
            continue
        config = json.loads(fs.cat(f"{path}/{CONFIG_FILE}")) if CONFIG_FILE in names else {}
        found.append({"files": names, "global_step": config.get("global_step"),
                      "restored_from_step": config.get("metrics", {}).get("restored_from_step")})
    return {"checkpoints": found, "unregistered": orphans,
            "complete": bool(found) and all({MODEL_FILE, CONFIG_FILE, OPTIMIZER_FILE} <= set(c["files"]) for c in found)}


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise TimeoutError(f"timed out waiting for {what}")


def run_in_thread(fn, *args):
    box: dict = {}

    def target():
        try:
            box["result"] = fn(*args)
        except BaseException as exc:  # reported, not swallowed
            box["error"] = f"{type(exc).__name__}: {exc}"

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread, box


def train_node_failure(work: str) -> dict:
    """Two training workers on two nodes; one node dies after the first checkpoint."""
    cluster, nodes = start_cluster(worker_nodes=2, cpus_per_node=1)
    data = upload_dataset(work, "ft-train-data", 40)
    findings = {}
    try:
        train(TrainConfig(method="baseline", data=data, out=os.path.join(work, "local-runs"), **TINY))
    except ConfigError as exc:
        findings["local_out_refused"] = "node-local path" in str(exc)
    cfg = TrainConfig(method="baseline", data=data, out=f"{BUCKET}/ft-runs", name="node-failure", **TINY,
                      num_workers=2, cpus_per_worker=1, loader_workers=0, max_failures=3, overrides=RECIPE)
    run_dir = f"{BUCKET}/ft-runs/node-failure"
    thread, box = run_in_thread(train, cfg)
    wait_for(lambda: len(registered(run_dir)) >= 1 or not thread.is_alive(), 300, "the first checkpoint")
    findings["checkpoints_before_failure"] = len(registered(run_dir))
    findings["training_alive_at_failure"] = thread.is_alive()
    tick = time.time()
    findings["processes_killed"] = kill_node(cluster, nodes[1])  # a worker node dies
    cluster.add_node(num_cpus=1)  # its replacement arrives, as the autoscaler would provide
    thread.join(600)
    findings["seconds_after_failure"] = time.time() - tick
    findings.update(error=box.get("error"), **checkpoint_report(run_dir))
    if "result" in box:
        findings["final"] = storage.read_json(f"{box['result'].latest_checkpoint}/{CONFIG_FILE}")
    ray.shutdown()
    cluster.shutdown()
    return findings


def train_driver_killed(work: str) -> dict:
    """The driver of a training job is killed; re-running the command resumes the run."""
    cluster, _ = start_cluster(worker_nodes=2, cpus_per_node=1)
    data = upload_dataset(work, "ft-driver-data", 40)
    run_dir = f"{BUCKET}/ft-runs/driver-killed"
    args = ["--method", "baseline", "--data", data, "--out", f"{BUCKET}/ft-runs", "--name", "driver-killed",
            "--model", "tpr-tiny", "--pretrained", "none", "--workers", "2", "--loader-workers", "0",
            "--batch-size", "8", "--epochs", str(RECIPE["epochs"]), "--lr", "1e-3", "--set", "warmup_epochs=0",
            "--address", cluster.address]
    log_path = os.path.join(work, "driver.log")
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "jobs.train", *args], stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        wait_for(lambda: len(registered(run_dir)) >= 1 or proc.poll() is not None, 300, "the first checkpoint")
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    killed_after = len(registered(run_dir))
    # `tpr-ray train ... --resume`: the same command again, continuing the run
    cfg = TrainConfig(method="baseline", data=data, out=f"{BUCKET}/ft-runs", name="driver-killed", **TINY,
                      num_workers=2, loader_workers=0, overrides=RECIPE, resume=True)
    thread, box = run_in_thread(train, cfg)
    thread.join(600)
    findings = {"error": box.get("error"), "checkpoints_when_killed": killed_after, **checkpoint_report(run_dir)}
    if "result" in box:
        findings["final"] = storage.read_json(f"{box['result'].latest_checkpoint}/{CONFIG_FILE}")
    findings["driver_log"] = open(log_path, errors="replace").read()[-20000:]
    ray.shutdown()
    cluster.shutdown()
    return findings


SCENARIOS = {"train-node-failure": train_node_failure, "train-driver-killed": train_driver_killed}

if __name__ == "__main__":
    name, work = sys.argv[1], sys.argv[2]
    result = SCENARIOS[name](work)
    print("FINDINGS " + json.dumps(result, default=str), flush=True)
