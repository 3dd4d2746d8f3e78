"""Will the embedding job's stages fit the cluster, and what is Ray waiting for when it stalls.

An embedding job runs a fixed pool of model actors next to Ray Data's read-plan and decode
tasks. The actors hold their resources for the whole job, so when no node has room left for a
decode task beside them the job waits for ever: Ray shows the decode task as a pending demand
and nothing fails. :func:`check_fit` finds that before Ray Data starts, from the nodes alive
now, and refuses in one line: what is asked, what the cluster has, what to pass. On a cluster
whose autoscaler can add nodes the check only warns; the :class:`StallWatchdog` then says what
Ray is waiting for whenever no shard has been committed for a while.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from dataclasses import dataclass

from tpr_ray.errors import ConfigError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Ask:
    """What one embedding table needs at the same time: ``actors`` model actors of
    ``actor_cpus`` CPUs and ``actor_gpus`` GPUs each, and one decode task of ``task_cpus``
    CPUs and ``task_memory`` bytes of logical memory beside them."""

    actors: int
    actor_cpus: float
    actor_gpus: float
    task_cpus: float
    task_memory: int = 0


def _place(ask: Ask, nodes: list[dict[str, float]], actors: int) -> list[dict[str, float]] | None:
    """``nodes``' resources left after placing ``actors`` actors (most free CPUs first, as Ray
    spreads a pool), or None when they do not all fit."""
    free = [dict(node) for node in nodes]
    for _ in range(actors):
        fits = [n for n in free if n.get("CPU", 0) >= ask.actor_cpus - 1e-9 and n.get("GPU", 0) >= ask.actor_gpus - 1e-9]
        if not fits:
            return None
        node = max(fits, key=lambda n: (n.get("CPU", 0), n.get("GPU", 0)))
        node["CPU"] = node.get("CPU", 0) - ask.actor_cpus
        node["GPU"] = node.get("GPU", 0) - ask.actor_gpus
    return free


def _task_fits(ask: Ask, free: list[dict[str, float]]) -> bool:
    return any(n.get("CPU", 0) >= ask.task_cpus - 1e-9 and n.get("memory", math.inf) >= ask.task_memory for n in free)


def fits(ask: Ask, nodes: list[dict[str, float]]) -> bool:
    free = _place(ask, nodes, ask.actors)
    return free is not None and _task_fits(ask, free)


def _fmt(value: float) -> str:
    return f"{value:g}"


def shortfall(ask: Ask, nodes: list[dict[str, float]]) -> str | None:
    """None when the actors and a decode task fit ``nodes`` (each a node's total resources:
    ``CPU``, ``GPU``, ``memory``) together; otherwise the one-line reason and what to pass."""
    if fits(ask, nodes):
        return None
    cpus = sum(n.get("CPU", 0) for n in nodes)
    gpus = sum(n.get("GPU", 0) for n in nodes)
    asked = f"{ask.actors} model actor{'s' if ask.actors > 1 else ''} x {_fmt(ask.actor_cpus)} CPU"
    if ask.actor_gpus:
        asked += f" + {_fmt(ask.actor_gpus)} GPU"
    asked += f" and a decode task of {_fmt(ask.task_cpus)} CPU beside them"
    has = f"the cluster has {_fmt(cpus)} CPUs" + (f" and {_fmt(gpus)} GPUs" if gpus or ask.actor_gpus else "")
    has += f" on {len(nodes)} node{'s' if len(nodes) != 1 else ''}"
    options = []
    most = max((k for k in range(1, ask.actors) if fits(Ask(k, ask.actor_cpus, ask.actor_gpus, ask.task_cpus,
                                                                ask.task_memory), nodes)), default=0)
    if most:
        options.append(f"--actors {most}")
    if not ask.actor_gpus:
        # the most CPUs per actor (in hundredths) that leave a decode task room
        share = next((cents / 100 for cents in range(math.ceil(ask.actor_cpus * 100) - 1, 0, -1)
                      if fits(Ask(ask.actors, cents / 100, 0, ask.task_cpus, ask.task_memory), nodes)), None)
        if share is not None:
            options.append(f"--cpus-per-actor {_fmt(share)}")
    if ask.task_cpus > 0.25 and fits(Ask(ask.actors, ask.actor_cpus, ask.actor_gpus, 0.25, ask.task_memory), nodes):
        options.append("--decode-cpus 0.25")
    options.append("a bigger cluster")
    return (f"the embedding job would wait for ever: it needs {asked} at the same time, and {has}; "
            f"pass {' or '.join(options)}")


def alive_nodes() -> list[dict[str, float]]:
    import ray

    return [{k: float(v) for k, v in n["Resources"].items() if k in ("CPU", "GPU", "memory")}
            for n in ray.nodes() if n.get("Alive")]


def autoscaling() -> bool:
    """Whether an autoscaler that may add nodes watches this cluster. Ray's monitor publishes
    its report on every cluster; without an autoscaling config (a plain `ray start`) it runs a
    read-only provider whose node types are named ``node_<node id>``, while a launcher or
    KubeRay cluster names them after its node groups ("gpu_workers")."""
    import json

    from ray.experimental.internal_kv import _internal_kv_get

    try:
        status = json.loads(_internal_kv_get("__autoscaling_status") or b"{}")
    except Exception:  # noqa: BLE001 - no answer: treat the cluster as fixed
        return False
    mapping = (status.get("autoscaler_report") or {}).get("node_type_mapping") or {}
    return any(kind != f"node_{node}" for node, kind in mapping.items())


def check_fit(ask: Ask) -> None:
    """Refuse (ConfigError, one line) when ``ask`` cannot run on the nodes alive now; on an
    autoscaling cluster only warn, since nodes may be added."""
    reason = shortfall(ask, alive_nodes())
    if reason is None:
        return
    if autoscaling():
        log.warning("%s; waiting for the autoscaler to add nodes", reason.split("; pass ")[0])
        return
    raise ConfigError(reason)


# --- the watchdog ---------------------------------------------------------------

def waiting_for() -> str:
    """What Ray cannot schedule now, as `ray status` says it ("Pending Demands"), and what the
    cluster has free; a best effort (never raises)."""
    import ray

    try:
        from ray.autoscaler.v2.sdk import get_cluster_status

        status = get_cluster_status(ray.get_runtime_context().gcs_address)
        pending = [str(request) for demand in status.resource_demands.ray_task_actor_demand
                   for request in demand.bundles_by_count]
        free = {k: round(v, 2) for k, v in status.available_resources().items() if k in ("CPU", "GPU")}
    except Exception as err:  # noqa: BLE001 - a report, not a step of the job
        return f"(cluster status unavailable: {type(err).__name__})"
    if not pending:
        return f"no pending tasks or actors (free: {free}); the running tasks are slow or stuck"
    return f"pending {', '.join(pending)}; free: {free}"


class StallWatchdog:
    """Warns when no shard has been committed for ``minutes``: how long, and what Ray is
    waiting for; again every ``minutes`` while it lasts. ``progress()`` is any count that
    grows with each commit. It never stops the job (a slow cluster is not a broken one)."""

    def __init__(self, progress, minutes: float, what: str, report=waiting_for):
        self.progress, self.seconds, self.what, self.report = progress, minutes * 60.0, what, report
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="tpr-ray-stall-watchdog", daemon=True)
        self.warnings: list[str] = []

    def __enter__(self):
        if self.seconds > 0:
            self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def _watch(self):
        last, since, warned = self.progress(), time.monotonic(), 0
        poll = min(5.0, self.seconds / 4)
        while not self._stop.wait(poll):
            now = self.progress()
            if now != last:
                last, since, warned = now, time.monotonic(), 0
            elif time.monotonic() - since >= self.seconds * (warned + 1):
                line = (f"{self.what}: no shard committed for {(time.monotonic() - since) / 60:.1f} min "
                        f"({last} so far); Ray: {self.report()}")
                self.warnings.append(line)
                log.warning("%s", line)
                warned += 1
