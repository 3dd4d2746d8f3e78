"""Surviving failures on a simulated multi-node cluster (ray.cluster_utils.Cluster, CPU
only, storage on moto's S3 server). Each scenario runs in its own process: see
tests/fault_scenarios.py for what is killed and when. A node dying under an embedding job is
tested on a real `ray start` cluster with S3 storage, through `ray job submit`
(tests/test_cluster_jobs.py)."""

import json
import os
import subprocess
import sys
import time

import pytest

from tests.helpers import S3_BUCKET, S3_ENV

EPOCHS = 3  # tests/fault_scenarios.py RECIPE
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
    return final["global_step"] // EPOCHS


@pytest.mark.slow
def test_training_survives_a_worker_node_dying(s3_bucket, tmp_path):
    f = run_scenario("train-node-failure", tmp_path)
    assert f["local_out_refused"] is True
    assert f["error"] is None
    assert f["checkpoints_before_failure"] >= 1 and f["training_alive_at_failure"]
    final = f["final"]
    assert final["stage"] == 1 and final["epoch"] == 0  # past the last epoch of the only stage
    per_epoch = steps_per_epoch(f)
    assert per_epoch > 0 and final["global_step"] == EPOCHS * per_epoch  # no step lost or repeated in the count
    assert f["complete"]  # every kept checkpoint has all of its files
    restored = [c["restored_from_step"] for c in f["checkpoints"]]
    assert max(restored) > 0  # the restarted workers continued from a checkpoint


@pytest.mark.slow
def test_killed_training_driver_resumes_and_leaks_no_credentials(s3_bucket, tmp_path):
    f = run_scenario("train-driver-killed", tmp_path)
    assert f["error"] is None
    assert f["checkpoints_when_killed"] >= 1
    final = f["final"]
    assert final["stage"] == 1 and final["global_step"] == EPOCHS * steps_per_epoch(f)
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


# --- a kill at every step of a shard's commit (in-process, no Ray) ------------------------
#
# The driver's commit protocol is driven directly: open_job (clean up, find the commits,
# record the job), ShardCommitter.add with each shard's results, finish. A "kill" is an
# exception raised from inside storage at one step; whatever files were on disk stay there,
# as after a SIGKILL. The re-run must then finish with every input exactly once.

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from tpr_ray.io import storage  # noqa: E402
from tpr_ray.embedding.committer import open_job  # noqa: E402
from tpr_ray.embedding.plan import plan_fingerprint, plan_shards  # noqa: E402
from tpr_ray.tables import SIDECAR, rejects_dir  # noqa: E402

N_ROWS, PER_SHARD = 9, 3


class Killed(BaseException):
    """Stands for SIGKILL: nothing in the code under test catches it."""


def _rows():
    return pa.table({"image_id": [f"img{i}" for i in range(N_ROWS)], "person_id": pa.array(range(N_ROWS), pa.int64()),
                     "image_uri": [f"/g/img{i}.jpg" for i in range(N_ROWS)]})


def _header(rows):
    fingerprint = plan_fingerprint(rows, {"rows_per_shard": PER_SHARD})
    return {"method": "baseline", "model": "tpr-tiny", "checkpoint": "/ckpt", "dim": 2, "fingerprint": fingerprint}


def run_job(out, rejected=()):
    """One run of the job: every pending shard's results, rows in `rejected` as rejects."""
    rows = _rows()
    plan = plan_shards(N_ROWS, PER_SHARD)
    committer = open_job(out, "gallery", rows, plan, _header(rows))
    for shard, (start, stop) in enumerate(plan):
        if shard in committer.committed:
            continue
        ids = np.arange(start, stop)
        emb = np.stack([np.cos(ids), np.sin(ids)], axis=1).astype(np.float32)
        reasons = np.array(["UnidentifiedImageError" if r in rejected else "" for r in ids], dtype=object)
        committer.add({"row": ids, "shard": np.full(len(ids), shard), "embedding": emb, "reject_reason": reasons})
    return committer.finish()


def _check_exactly_once(out, rejected=()):
    table = pq.read_table(out)
    ids = table.column("image_id").to_pylist()
    expected = [f"img{i}" for i in range(N_ROWS) if i not in rejected]
    assert ids == expected  # nothing lost, nothing twice, in input order
    emb = np.asarray(table.column("embedding").combine_chunks().flatten()).reshape(-1, 2)
    rows = [int(i[3:]) for i in ids]
    np.testing.assert_allclose(emb, np.stack([np.cos(rows), np.sin(rows)], axis=1), rtol=1e-6)
    info = storage.read_json(f"{out}/{SIDECAR}")
    assert info["complete"] and info["rows"] == len(expected) and info["rejected"] == len(rejected)
    rejects_path = rejects_dir(out)
    has_rejects = os.path.exists(rejects_path) and any(n.endswith(".parquet") for n in os.listdir(rejects_path))
    found = pq.read_table(rejects_path).column("image_id").to_pylist() if has_rejects else []
    assert found == [f"img{i}" for i in rejected]
    assert not [n for d in (out, rejects_path) if os.path.exists(d) for n in os.listdir(d)
                if n.startswith(storage.TEMP_PREFIX)]


def kill_at(monkeypatch, name: str, step: str, listing_shard: int | None = None):
    """Raise Killed at `step` of the atomic write of file `name` (folder/file): "before" it
    starts, "temp" (the temporary file is written, not yet moved), "after" (moved into
    place). For the sidecar, `listing_shard` picks the write that first lists that shard."""
    write, replace = storage.write_bytes_atomic, os.replace

    def matches(uri, data=None):
        if not uri.endswith("/" + name):
            return False
        if listing_shard is None:
            return True
        info = json.loads(data)
        return any(s["file"] == f"part-{listing_shard:05d}.parquet" for s in info.get("shards", []))

    def patched_write(uri, data):
        if step == "before" and matches(uri, data):
            raise Killed(f"before {uri}")
        write(uri, data)
        if step == "after" and matches(uri, data):
            raise Killed(f"after {uri}")

    def patched_replace(src, dst):
        if step == "temp" and matches(dst, open(src, "rb").read() if listing_shard is not None else None):
            raise Killed(f"between the temporary file and {dst}")
        replace(src, dst)

    monkeypatch.setattr(storage, "write_bytes_atomic", patched_write)
    monkeypatch.setattr(os, "replace", patched_replace)


SHARD_0, SHARD_1 = "gallery/part-00000.parquet", "gallery/part-00001.parquet"
REJECTS_1, JOB = "gallery-rejects/part-00001.parquet", f"gallery/{SIDECAR}"
KILL_POINTS = [(JOB, "after", None), (SHARD_0, "before", None), (SHARD_0, "after", None),  # the first writes
               (REJECTS_1, "temp", None), (REJECTS_1, "after", None),  # shard 1 rejects img4: written first
               (SHARD_1, "before", None), (SHARD_1, "temp", None), (SHARD_1, "after", None),  # the commit point
               (JOB, "temp", 1), (JOB, "after", 1)]  # the sidecar that lists shard 1


@pytest.mark.parametrize("name,step,listing", KILL_POINTS, ids=[f"{n}-{s}-{where}" for n, s, where in KILL_POINTS])
def test_a_kill_at_any_commit_step_loses_and_duplicates_nothing(tmp_path, monkeypatch, name, step, listing):
    out = str(tmp_path / "gallery")
    with monkeypatch.context() as m:
        kill_at(m, name, step, listing)
        with pytest.raises(Killed):
            run_job(out, rejected=(4,))
    run_job(out, rejected=(4,))
    _check_exactly_once(out, rejected=(4,))
    assert run_job(out, rejected=(4,))["complete"]  # and a finished job re-run changes nothing
    _check_exactly_once(out, rejected=(4,))


def test_rejects_of_a_shard_killed_before_its_commit_do_not_outlive_it(tmp_path, monkeypatch):
    # run 1 rejects img4 and dies right before shard 1's file; run 2 reads img4 fine
    out = str(tmp_path / "gallery")
    with monkeypatch.context() as m:
        kill_at(m, SHARD_1, "before")
        with pytest.raises(Killed):
            run_job(out, rejected=(4,))
    assert os.listdir(rejects_dir(out)) == ["part-00001.parquet"]
    run_job(out)
    run_job(out)  # the run after that must not trip over the stale rejects file either
    _check_exactly_once(out)


def test_a_committed_shard_that_came_back_empty_is_redone_and_logged(tmp_path, caplog):
    # what a power loss does to a renamed file whose data never reached the disk
    out = str(tmp_path / "gallery")
    run_job(out, rejected=(4,))
    open(os.path.join(out, "part-00001.parquet"), "wb").close()
    with caplog.at_level("WARNING", logger="tpr_ray.embedding.committer"):
        info = run_job(out, rejected=(4,))
    assert "part-00001.parquet" in caplog.text and "redo" in caplog.text
    assert info["complete"]
    _check_exactly_once(out, rejected=(4,))


def test_local_writes_are_fsynced_before_the_rename_and_the_folder_after(tmp_path, monkeypatch):
    events = []
    fsync, replace = os.fsync, os.replace

    def record_fsync(fd):
        events.append(("fsync", "dir" if os.path.isdir(f"/proc/self/fd/{fd}") else os.readlink(f"/proc/self/fd/{fd}")))
        fsync(fd)

    def record_replace(src, dst):
        events.append(("replace", src))
        replace(src, dst)

    monkeypatch.setattr(os, "fsync", record_fsync)
    monkeypatch.setattr(os, "replace", record_replace)
    storage.write_bytes_atomic(str(tmp_path / "part-00000.parquet"), b"data")
    assert [e[0] for e in events] == ["fsync", "replace", "fsync"]
    assert events[0][1] == events[1][1] and os.path.basename(events[0][1]).startswith(storage.TEMP_PREFIX)
    assert events[2][1] == "dir"
    assert (tmp_path / "part-00000.parquet").read_bytes() == b"data"


# --- one writer per output: the lease ------------------------------------------------------

from tpr_ray.io.lease import LEASE_FILE, Lease, LeaseHeld  # noqa: E402


def test_a_second_writer_is_refused_while_the_first_holds_the_lease(tmp_path):
    out = str(tmp_path / "out")
    with Lease(out, settle_s=0):
        with pytest.raises(LeaseHeld, match=rf"being written by another job \(pid {os.getpid()} on "):
            Lease(out, settle_s=0).acquire()
    with Lease(out, settle_s=0):  # given back: free again
        pass
    assert not os.path.exists(os.path.join(out, LEASE_FILE))


def test_an_expired_lease_or_one_of_a_dead_process_is_taken_over(tmp_path):
    out = str(tmp_path / "out")
    storage.write_json(os.path.join(out, LEASE_FILE), {"owner": "x", "host": "elsewhere", "pid": 1,
                                                        "expires": time.time() - 1})
    with Lease(out, settle_s=0):
        pass
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    import socket
    storage.write_json(os.path.join(out, LEASE_FILE), {"owner": "y", "host": socket.gethostname(), "pid": int(dead),
                                                        "expires": time.time() + 600})
    with Lease(out, settle_s=0):
        pass


def test_a_writer_whose_lease_was_taken_over_stops_before_its_next_commit(tmp_path, monkeypatch):
    out = str(tmp_path / "gallery")
    rows = _rows()
    plan = plan_shards(N_ROWS, PER_SHARD)
    first = Lease(str(tmp_path), ttl_s=0.3, settle_s=0)
    monkeypatch.setattr(first, "_renew_loop", lambda: None)  # a driver paused (GC, partition) past its lease
    first.acquire()
    committer = open_job(out, "gallery", rows, plan, _header(rows), guard=first.check)
    time.sleep(0.4)
    second = Lease(str(tmp_path), settle_s=0).acquire()  # expired: taken over
    with pytest.raises(LeaseHeld, match="lost its lease"):
        committer.add({"row": np.arange(3), "shard": np.zeros(3), "embedding": np.ones((3, 2), np.float32),
                       "reject_reason": np.array(["", "", ""], dtype=object)})
    assert not os.path.exists(os.path.join(out, "part-00000.parquet"))
    second.release()


def test_two_concurrent_jobs_on_one_output_give_every_row_once(tmp_path, monkeypatch):
    """Job A commits slowly; job B starts meanwhile and is refused; A's output is whole."""
    import threading

    out = str(tmp_path / "gallery")
    started, box = threading.Event(), {}
    write = storage.write_bytes_atomic

    def slow_write(uri, data):
        time.sleep(0.05)
        write(uri, data)

    monkeypatch.setattr(storage, "write_bytes_atomic", slow_write)

    def job_a():
        with Lease(str(tmp_path), settle_s=0.05) as lease:
            started.set()
            rows = _rows()
            plan = plan_shards(N_ROWS, PER_SHARD)
            committer = open_job(out, "gallery", rows, plan, _header(rows), guard=lease.check)
            for shard, (start, stop) in enumerate(plan):
                ids = np.arange(start, stop)
                committer.add({"row": ids, "shard": np.full(len(ids), shard),
                               "embedding": np.stack([np.cos(ids), np.sin(ids)], axis=1).astype(np.float32),
                               "reject_reason": np.array([""] * len(ids), dtype=object)})
            box["a"] = committer.finish()

    thread = threading.Thread(target=job_a)
    thread.start()
    started.wait(5)
    with pytest.raises(LeaseHeld, match="being written by another job"):
        with Lease(str(tmp_path), settle_s=0.05):
            run_job(out)
    thread.join(10)
    assert box["a"]["complete"]
    _check_exactly_once(out)


def race_two_fresh_writers(out: str) -> list[str]:
    """Two writers that both found the output free (each checked before either wrote), with no
    settling time to catch the race afterwards: what each of them got."""
    writers = [Lease(out, settle_s=0), Lease(out, settle_s=0)]
    for writer in writers:  # both first checks happen before either write
        real, first = writer._read, [True]

        def read(real=real, first=first):
            if first.pop() if first else False:
                return None
            return real()

        writer._read = read
    got = []
    for writer in writers:
        try:
            writer.acquire()
            got.append("held")
        except LeaseHeld:
            got.append("refused")
    for writer in writers:
        writer.release()
    return got


def test_two_writers_racing_for_a_free_local_output_cannot_both_take_it(tmp_path):
    assert race_two_fresh_writers(str(tmp_path / "out")) == ["held", "refused"]
