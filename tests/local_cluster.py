"""A real multi-node Ray cluster on this machine, started with `ray start` as a user starts one:
a head and worker nodes, each a `ray start --block` process group of its own, all on loopback
with explicit ports, token authentication on (a token file of the cluster's own, never
~/.ray/auth_token) and a temp dir of its own. Nothing here touches the test session's cluster
or the session's environment: every command gets its environment from :meth:`LocalCluster.env`.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid

from tests.helpers import free_port

RAY = os.path.join(os.path.dirname(sys.executable), "ray")
# Only these of the session's variables reach the cluster's processes (no RAY_ADDRESS, no
# RAY_AUTH_MODE=disabled, no AWS settings of other tests).
PASSED_ON = ("PATH", "HOME", "LANG", "LC_ALL", "TMPDIR", "PYTHONPATH", "VIRTUAL_ENV", "USER")


class LocalCluster:
    def __init__(self, root: str, env: dict | None = None):
        """``env``: variables every node and submitter has besides Ray's (e.g. the S3 endpoint
        and credentials a node would get from its instance profile)."""
        self.root = root
        self.extra_env = dict(env or {})
        self.temp_dir = os.path.join(root, "ray")
        self.token_file = os.path.join(root, "auth_token")
        os.makedirs(self.temp_dir, exist_ok=True)
        with open(os.open(self.token_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as f:
            f.write(uuid.uuid4().hex + uuid.uuid4().hex)
        self.gcs_port = free_port()
        self.dashboard_port = free_port()
        self.address = f"127.0.0.1:{self.gcs_port}"
        self.dashboard = f"http://127.0.0.1:{self.dashboard_port}"
        self.nodes: dict[str, subprocess.Popen] = {}
        self.node_ports: dict[str, int] = {}  # name -> the raylet's node manager port

    def env(self, **extra) -> dict:
        """The environment of every process that belongs to this cluster (nodes, submitters)."""
        env = {k: v for k, v in os.environ.items() if k in PASSED_ON}
        env.update(self.extra_env)
        env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=self.token_file, RAY_DEDUP_LOGS="0",
                   RAY_USAGE_STATS_ENABLED="0",
                   # A killed node is found dead after 5 failed checks 1 s apart (Ray's default: 3 s
                   # apart). The timeout of each check stays long, so a busy live node is not declared dead.
                   RAY_health_check_period_ms="1000", RAY_health_check_timeout_ms="5000")
        # The venv's python and ray first, as on a node where it is activated (a job's
        # `python -m ...` entrypoint is found on the head's PATH).
        env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
        env.update(extra)
        return env

    def _node_args(self, name: str, cpus: int) -> list[str]:
        manager = free_port()
        self.node_ports[name] = manager
        first = free_port()
        return ["--block", "--node-ip-address", "127.0.0.1", "--num-cpus", str(cpus), "--num-gpus", "0",
                "--temp-dir", self.temp_dir, "--node-manager-port", str(manager),
                "--object-manager-port", str(free_port()), "--dashboard-agent-listen-port", str(free_port()),
                "--dashboard-agent-grpc-port", str(free_port()), "--runtime-env-agent-port", str(free_port()),
                "--metrics-export-port", str(free_port()), "--object-store-memory", str(100 * 1024 * 1024),
                "--min-worker-port", str(first), "--max-worker-port", str(first + 40), "--disable-usage-stats"]

    def _start(self, name: str, args: list[str]) -> None:
        log = open(os.path.join(self.root, f"{name}.log"), "ab")
        self.nodes[name] = subprocess.Popen([RAY, "start", *args], env=self.env(), stdout=log,
                                            stderr=subprocess.STDOUT, start_new_session=True)
        log.close()

    def start_head(self, cpus: int = 0) -> None:
        self._start("head", ["--head", "--port", str(self.gcs_port), "--include-dashboard", "true",
                             "--dashboard-host", "127.0.0.1", "--dashboard-port", str(self.dashboard_port),
                             "--ray-client-server-port", str(free_port()), *self._node_args("head", cpus)])

    def add_worker(self, name: str, cpus: int = 2) -> None:
        self._start(name, ["--address", self.address, *self._node_args(name, cpus)])

    def alive_nodes(self) -> set[str]:
        """Names of the nodes the cluster sees alive (asked through the CLI, authenticated)."""
        proc = subprocess.run([sys.executable, "-c", _LIST_NODES, self.address], env=self.env(),
                              capture_output=True, text=True, timeout=60)
        if proc.returncode:
            return set()
        answer = [line for line in proc.stdout.splitlines() if line.startswith("[")]  # Ray may print too
        if not answer:
            return set()
        ports = set(json.loads(answer[-1]))
        return {name for name, port in self.node_ports.items() if port in ports}

    def wait_for_nodes(self, names: set[str], timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for name, proc in self.nodes.items():
                if proc.poll() is not None and name in names:
                    raise RuntimeError(f"ray start of {name} exited {proc.returncode}: {self.log(name)[-3000:]}")
            if names <= self.alive_nodes():
                return
            time.sleep(1)
        raise TimeoutError(f"nodes {names} not alive after {timeout}s: {self.log('head')[-3000:]}")

    def wait_for_jobs_api(self, timeout: float = 120) -> None:
        import urllib.request

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                # Reachable without a token only to say it needs one (or that it is up).
                urllib.request.urlopen(f"{self.dashboard}/api/version", timeout=5).read()
                return
            except Exception as error:  # noqa: BLE001 - 401 counts as up
                if getattr(error, "code", None) in (401, 403):
                    return
                time.sleep(1)
        raise TimeoutError(f"the Jobs API at {self.dashboard} is not up after {timeout}s")

    def kill_node(self, name: str) -> None:
        """The node dies as a machine does: every process of its `ray start` group, SIGKILL."""
        proc = self.nodes.pop(name)
        raylet = _raylet_pid(self.node_ports[name])
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
        if raylet is not None:  # the raylet and its workers, should they be in a group of their own
            for pid in [raylet, *_descendants(raylet)]:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass

    def log(self, name: str) -> str:
        try:
            return open(os.path.join(self.root, f"{name}.log"), errors="replace").read()
        except OSError:
            return ""

    def shutdown(self) -> None:
        """Stop every node: workers first, the head last; whatever is left is killed."""
        for name in [n for n in self.nodes if n != "head"] + (["head"] if "head" in self.nodes else []):
            proc = self.nodes[name]
            pids = [pid for port in [self.node_ports[name]] if (pid := _raylet_pid(port))]
            pids += [d for pid in pids for d in _descendants(pid)]
            try:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(timeout=5)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                pass
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        self.nodes.clear()
        # Processes that Ray started in sessions of their own (GCS, dashboard) under our temp dir.
        for pid in _processes_mentioning(self.temp_dir):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


_LIST_NODES = """
import json, sys, ray
ray.init(address=sys.argv[1], include_dashboard=False, log_to_driver=False)
print(json.dumps([n["NodeManagerPort"] for n in ray.nodes() if n["Alive"]]))
"""


def _cmdline(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return [part.decode(errors="replace") for part in f.read().split(b"\0") if part]
    except OSError:
        return []


def _raylet_pid(port: int) -> int | None:
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            line = _cmdline(int(entry))
            if line and line[0].endswith("raylet") and f"--node_manager_port={port}" in line:
                return int(entry)
    return None


def _processes_mentioning(text: str) -> list[int]:
    return [int(e) for e in os.listdir("/proc") if e.isdigit() and int(e) != os.getpid()
            and any(text in part for part in _cmdline(int(e)))]


def _descendants(pid: int) -> list[int]:
    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    parents[int(entry)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        kids = [child for child, parent in parents.items() if parent == current]
        found += kids
        todo += kids
    return found
