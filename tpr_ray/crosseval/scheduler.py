"""Fits jobs to a cluster's free CPUs and GPUs and runs them as Ray tasks (or inline).

A job's task declares no CPU itself: the work inside it declares its own (Ray Train
workers, Ray Data actors and decode tasks, evaluator shard tasks). The scheduler admits a
job only when the resources its inner work declares fit beside the jobs already running,
so nested trainers and Ray Data pipelines never wait on each other for CPUs (an
over-subscribed Ray Data pipeline can hang, see RAY_NOTES). A job bigger than the whole
cluster is answered with an error at once instead of waiting forever.
"""

from __future__ import annotations

import logging
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)


def error_record(stage: str, exc: BaseException) -> dict:
    """What a failed job answers: stage, exception type, its first line, and the traceback."""
    cause = getattr(exc, "cause", None) or exc  # a RayTaskError carries the original exception
    return {"stage": stage, "type": type(cause).__name__, "message": str(cause).strip().splitlines()[0][:2000]
            if str(cause).strip() else type(cause).__name__,
            "traceback": "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))[-6000:]}


@dataclass
class Job:
    kind: str
    config: Any  # what the job function receives (a TrainConfig, EmbedConfig, ...)
    cpus: float
    gpus: float
    done: Callable[[dict], None]  # called with the job's answer; may submit more jobs
    label: str = ""


class Runner:
    """Runs ``execute(kind, config, address)`` per job, admitting jobs by the resources they declare.

    ``execute`` returns ``{"ok": True, "result": ...}`` or ``{"ok": False, "error": ...}``.
    """

    def __init__(self, execute: Callable[[str, Any, str | None], dict], use_ray: bool, cpus: float, gpus: float,
                 max_parallel: int | None, address: str | None = None, env_vars: dict | None = None):
        self.execute = execute
        self.env_vars = env_vars or {}  # for the job tasks and, by inheritance, everything they start
        self.use_ray, self.cpus, self.gpus = use_ray, cpus, gpus
        self.max_parallel = max_parallel
        self.address = address
        self.queue: list[Job] = []
        self.in_flight: dict = {}
        self.started = 0
        self.remote = None

    def submit(self, job: Job) -> None:
        if job.cpus > self.cpus + 1e-9 or job.gpus > self.gpus + 1e-9:
            job.done({"ok": False, "error": {
                "stage": job.kind, "type": "ConfigError", "traceback": "",
                "message": f"{job.kind} job needs {job.cpus:g} CPU / {job.gpus:g} GPU but the cluster has "
                           f"{self.cpus:g} CPU / {self.gpus:g} GPU; lower --workers or --cpus-per-worker"}})
            return
        self.queue.append(job)

    def run(self) -> None:
        while self.queue or self.in_flight:
            self._admit()
            if self.use_ray:
                import ray

                ready, _ = ray.wait(list(self.in_flight), num_returns=1)
                job = self.in_flight.pop(ready[0])
                try:
                    answer = ray.get(ready[0])
                except Exception as exc:  # a crashed worker fails the job, not the run
                    answer = {"ok": False, "error": error_record(job.kind, exc)}
            else:
                handle = next(iter(self.in_flight))
                job = self.in_flight.pop(handle)
                answer = self.execute(job.kind, job.config, self.address)
            outcome = "done" if answer["ok"] else f"failed ({answer['error']['message']})"
            log.info("%s %s: %s", job.kind, job.label, outcome)
            job.done(answer)

    def _admit(self) -> None:
        while self.queue:
            used_cpus = sum(j.cpus for j in self.in_flight.values())
            used_gpus = sum(j.gpus for j in self.in_flight.values())
            job = self.queue[0]
            fits = used_cpus + job.cpus <= self.cpus + 1e-9 and used_gpus + job.gpus <= self.gpus + 1e-9
            room = self.max_parallel is None or len(self.in_flight) < self.max_parallel
            if self.in_flight and not (fits and room):
                return
            self.queue.pop(0)
            log.info("starting %s %s", job.kind, job.label)
            if self.use_ray:
                import ray

                if self.remote is None:
                    # No CPU for the job itself: the work inside declares its own (see the module docstring).
                    options = {"runtime_env": {"env_vars": self.env_vars}} if self.env_vars else {}
                    self.remote = ray.remote(self.execute).options(num_cpus=0, max_retries=0, **options)
                ref = self.remote.remote(job.kind, job.config, self.address)
                self.in_flight[ref] = job
            else:
                self.started += 1
                self.in_flight[self.started] = job
