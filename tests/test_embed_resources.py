"""Issue 19 item 3: an embedding job whose model actors leave no room for a decode task is
refused before Ray Data starts (one line: what is asked, what the cluster has, what to pass),
and a job that commits nothing for a while says what Ray is waiting for."""

import os
import subprocess
import sys
import textwrap
import time

import pytest
from click.testing import CliRunner

from cli.main import cli
from tests.helpers import save_tiny_checkpoint
from tpr_ray.embedding.resources import Ask, StallWatchdog, fits, shortfall

CPU2 = [{"CPU": 2.0, "memory": 8e9}]


def test_default_actors_and_a_decode_task_fit_two_cpus():
    assert shortfall(Ask(2, 0.5, 0, 0.5), CPU2) is None  # 1 CPU of actors + 0.5 for decoding
    assert shortfall(Ask(3, 0.5, 0, 0.5), CPU2) is None  # 1.5 + 0.5: exactly full


def test_actors_holding_every_cpu_are_refused_with_what_fits():
    line = shortfall(Ask(4, 0.5, 0, 0.5), CPU2)
    assert line == ("the embedding job would wait for ever: it needs 4 model actors x 0.5 CPU and a decode task "
                    "of 0.5 CPU beside them at the same time, and the cluster has 2 CPUs on 1 node; pass --actors 3 "
                    "or --cpus-per-actor 0.37 or a bigger cluster")
    # each suggestion really fits
    assert fits(Ask(3, 0.5, 0, 0.5), CPU2) and fits(Ask(4, 0.37, 0, 0.5), CPU2)
    assert not fits(Ask(4, 0.38, 0, 0.5), CPU2)


def test_a_smaller_decode_task_is_offered_when_it_is_enough():
    line = shortfall(Ask(2, 0.8, 0, 0.5), CPU2)  # 1.6 + 0.5 > 2, 1.6 + 0.25 fits
    assert line.endswith("pass --actors 1 or --cpus-per-actor 0.75 or --decode-cpus 0.25 or a bigger cluster")
    assert "--decode-cpus" not in shortfall(Ask(2, 0.9, 0, 0.5), CPU2)  # 1.8 + 0.25 > 2: not offered


def test_actors_are_placed_per_node():
    """2 CPUs in all, but on two 1-CPU nodes: one 1-CPU actor fills a node, a decode task fits the other."""
    nodes = [{"CPU": 1.0}, {"CPU": 1.0}]
    assert shortfall(Ask(1, 1.0, 0, 0.5), nodes) is None
    assert shortfall(Ask(2, 1.0, 0, 0.5), nodes).endswith(
        "the cluster has 2 CPUs on 2 nodes; pass --actors 1 or --cpus-per-actor 0.5 or a bigger cluster")
    # no node holds 1.5 CPUs, though the cluster does
    assert shortfall(Ask(1, 1.5, 0, 0.5), nodes).endswith("pass --cpus-per-actor 1 or a bigger cluster")


def test_gpu_actors_need_a_gpu_each():
    nodes = [{"CPU": 8.0, "GPU": 1.0}, {"CPU": 32.0}]
    assert shortfall(Ask(1, 0.5, 1, 0.5), nodes) is None
    line = shortfall(Ask(2, 0.5, 1, 0.5), nodes)
    assert "2 model actors x 0.5 CPU + 1 GPU" in line and "40 CPUs and 1 GPUs on 2 nodes" in line
    assert "pass --actors 1 or a bigger cluster" in line


def test_a_decode_task_larger_than_any_node_memory_is_refused():
    assert shortfall(Ask(1, 0.5, 0, 0.5, task_memory=int(16e9)), CPU2) is not None


def test_the_watchdog_says_what_ray_waits_for_and_is_quiet_while_shards_land():
    stuck = StallWatchdog(lambda: 3, minutes=0.002, what="embedding gallery", report=lambda: "pending [1 {'CPU': 0.5}]")
    with stuck:
        time.sleep(0.5)
    assert stuck.warnings, "no warning after a stall"
    assert stuck.warnings[0].startswith("embedding gallery: no shard committed for 0.0 min (3 so far); "
                                        "Ray: pending [1 {'CPU': 0.5}]")
    count = iter(range(10**6))
    moving = StallWatchdog(lambda: next(count), minutes=0.002, what="x", report=lambda: "")
    with moving:
        time.sleep(0.5)
    assert moving.warnings == []
    off = StallWatchdog(lambda: 0, minutes=0, what="x", report=lambda: "")
    with off:
        time.sleep(0.05)
    assert off.warnings == []


def test_embed_refuses_actors_that_leave_no_room_before_ray_data_starts(ray_cluster, cuhk_small, tmp_path):
    checkpoint = save_tiny_checkpoint(str(tmp_path / "ckpt"))
    out = tmp_path / "emb"
    result = CliRunner().invoke(cli, ["embed", "--checkpoint", checkpoint, "--data", cuhk_small, "--out", str(out),
                                      "--actors", "4"])
    lines = result.stderr.strip().splitlines()
    assert result.exit_code != 0 and "Traceback" not in result.output, result.output
    assert lines[-1] == ("Error: the embedding job would wait for ever: it needs 4 model actors x 0.5 CPU and a "
                         "decode task of 0.5 CPU beside them at the same time, and the cluster has 2 CPUs on 1 node; "
                         "pass --actors 3 or --cpus-per-actor 0.37 or a bigger cluster"), result.stderr
    assert not (out / "gallery").exists()  # nothing planned, nothing written
    print(f"\n$ tpr-ray embed ... --actors 4   (2 CPUs)\n{lines[-1]}")


HANG = textwrap.dedent("""
    import sys
    import ray
    import tpr_ray.embedding.pipeline as pipeline
    pipeline.check_fit = lambda ask: None  # a wait the check does not foresee
    ray.init(num_cpus=2, include_dashboard=False)
    pipeline.embed(pipeline.EmbedConfig(checkpoint=sys.argv[1], data=sys.argv[2], out=sys.argv[3], actors=4,
                                        stall_minutes=0.05))
""")


@pytest.mark.slow
def test_a_stalled_job_prints_what_ray_is_waiting_for(cuhk_small, tmp_path):
    checkpoint = save_tiny_checkpoint(str(tmp_path / "ckpt"))
    env = {**os.environ, "PYTHONPATH": os.getcwd(), "RAY_ADDRESS": ""}
    proc = subprocess.Popen([sys.executable, "-c", HANG, checkpoint, cuhk_small, str(tmp_path / "emb")], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen = []
    deadline = time.monotonic() + 120
    try:
        for line in proc.stdout:
            if "no shard committed" in line:
                seen.append(line.strip())
                break
            if time.monotonic() > deadline:
                break
    finally:
        proc.kill()
        proc.wait()
    assert seen, "no watchdog line"
    assert "Ray: pending [1 {'CPU': 0.5}]; free: {'CPU': 0.0}" in seen[0], seen[0]
    print(f"\n{seen[0]}")


def test_an_autoscaler_is_told_from_ray_starts_read_only_monitor(monkeypatch):
    """The monitor's report as a plain `ray start` head publishes it (read-only node types) and
    as the cluster launcher's autoscaler does (node types named after cluster.yaml's groups)."""
    import json

    import ray.experimental.internal_kv as kv

    from tpr_ray.embedding import resources

    def report(mapping):
        return json.dumps({"autoscaler_report": {"node_type_mapping": mapping}}).encode()

    node = "5dc9ccd148aff4772b42301e9c1a84fdebb953ee27e651618213e101"
    for status, expected in [(report({node: f"node_{node}"}), False), (report({node: "head"}), True),
                             (None, False), (b"not json", False)]:
        monkeypatch.setattr(kv, "_internal_kv_get", lambda key, status=status: status)
        assert resources.autoscaling() is expected, status
