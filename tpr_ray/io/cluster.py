"""Connecting to Ray: an existing cluster when one is named, else a local one."""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys

import ray

PROJECT_MARK = "[tpr-ray] "  # worker lines that belong on the console start with this
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_console = {"log_file": None, "handler": None}


# --- a quiet console ----------------------------------------------------------------
# By default the console shows the project's own lines only; everything Ray, Ray Train,
# Ray Data, open_clip and Python warnings say goes to a log file in the output folder.
# `-v` (no quiet_console call) leaves Ray's own printing as it is.

class _Stderr(logging.StreamHandler):
    """Writes to whatever sys.stderr is when a line is logged (Click's test runner swaps it)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


class _LazyFileHandler(logging.FileHandler):
    """Creates the log file (and its folder) with the first line: a command refused before it
    does anything leaves no file behind in its output folder."""

    def __init__(self, path: str):
        super().__init__(path, encoding="utf-8", delay=True)

    def _open(self):
        os.makedirs(os.path.dirname(self.baseFilename), exist_ok=True)
        return super()._open()


def quiet_console(log_file: str) -> None:
    """Send every log line of this process and of the Ray workers it starts to ``log_file``;
    keep the console for the ``tpr_ray`` loggers and workers' PROJECT_MARK lines."""
    handler = _LazyFileHandler(log_file)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    previous = _console["handler"]
    _console.update(log_file=log_file, handler=handler)
    root = logging.getLogger()
    for old in list(root.handlers):
        if old is previous or _is_console(old):
            root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    logging.captureWarnings(True)  # warnings.warn from torch / open_clip go to the file too
    project = logging.getLogger("tpr_ray")
    if not any(isinstance(h, _Stderr) for h in project.handlers):
        console = _Stderr()
        console.setFormatter(logging.Formatter("%(message)s"))
        project.addHandler(console)
    project.setLevel(logging.INFO)
    _mute_ray_loggers(previous)
    if previous is not None:
        previous.close()


def log_file() -> str | None:
    return _console["log_file"]


def _is_console(handler: logging.Handler) -> bool:
    """A handler that prints to the terminal (not a file, not a test framework's capture)."""
    if isinstance(handler, _Stderr) or isinstance(handler, logging.FileHandler):
        return False
    if type(handler).__name__ in ("PlainRayHandler", "_StderrHandler"):
        return True
    return getattr(handler, "stream", None) in (sys.stderr, sys.stdout, sys.__stderr__, sys.__stdout__)


def _mute_ray_loggers(previous: logging.Handler | None = None) -> None:
    """Ray's loggers (ray, ray.data, ray.train ...) print through handlers of their own."""
    handler = _console["handler"]
    names = [name for name in logging.Logger.manager.loggerDict if name == "ray" or name.startswith("ray.")]
    for name in names:
        logger = logging.getLogger(name)
        if not isinstance(logger, logging.Logger):
            continue
        replaced = [h for h in logger.handlers if h is previous or _is_console(h)]
        for old in replaced:
            logger.removeHandler(old)
        if replaced and handler not in logger.handlers:
            logger.addHandler(handler)


def _route_worker_output() -> None:
    """Workers' stdout/stderr reach the driver through Ray's dispatcher: file everything,
    print the project's lines."""
    try:
        from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher
    except ImportError:  # another Ray: keep its printing
        return
    path = _console["log_file"]

    def handle(data: dict) -> None:
        who = data.get("actor_name") or data.get("task_name") or ""
        lines = [_ANSI.sub("", line) for line in data.get("lines", [])]
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "a", encoding="utf-8") as f:
            f.writelines(f"({who} pid={data.get('pid')}) {line}\n" for line in lines)
        for line in lines:
            if line.startswith(PROJECT_MARK):
                print(line[len(PROJECT_MARK):], file=sys.stderr, flush=True)

    dispatcher.remove_handler("ray_print_logs")
    dispatcher.remove_handler("tpr_ray_logs")
    dispatcher.add_handler("tpr_ray_logs", handle)


def setup_quiet_worker() -> None:
    """Ray's worker_process_setup_hook: the project's log lines carry PROJECT_MARK, so the
    driver can tell them from Ray's and open_clip's."""
    project = logging.getLogger("tpr_ray")
    if any(getattr(h, "tpr_ray_mark", False) for h in project.handlers):
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(PROJECT_MARK + "%(message)s"))
    handler.tpr_ray_mark = True
    project.addHandler(handler)
    project.setLevel(logging.INFO)
    project.propagate = False


def _native_stderr_to_log() -> None:
    """Ray's C++ core worker in this process (and the processes it starts) write straight to
    file descriptor 2, past every Python handler: e.g. core_worker.cc's warning that Ray Data's
    actor pool has "constructor arguments in the object store". Point descriptor 2 at the log
    file and keep Python's ``sys.stderr`` (the project's lines, errors, tracebacks) on the
    console. Only when ``sys.stderr`` is the process's own (a test runner's capture is left alone)."""
    if _console.get("native_fd") is not None or sys.stderr is not sys.__stderr__:
        return
    try:
        fd = sys.__stderr__.fileno()
    except (AttributeError, OSError, ValueError):
        return
    path = _console["log_file"]
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    sys.stderr.flush()
    console = os.dup(fd)
    log = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(log, fd)
    os.close(log)
    _console["native_fd"] = console
    sys.stderr = os.fdopen(console, "w", buffering=1, encoding=sys.__stderr__.encoding or "utf-8",
                           errors="backslashreplace")


@contextlib.contextmanager
def _loopback_node():
    """Make Ray pick 127.0.0.1 as this node's address while a local cluster starts.

    Ray binds its GCS, raylet, object manager and worker ports to the node address, which on
    Linux is the machine's network address. Ray already uses loopback on macOS/Windows, decided
    by a flag it reads once at import (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER); flipping that flag
    for the duration of the start gives the same single-machine cluster on Linux. Processes the
    cluster starts take the address from the node, so nothing else changes.
    """
    from ray._private import ray_constants

    before = getattr(ray_constants, "ENABLE_RAY_CLUSTER", None)
    if before is None:  # a Ray without the flag: keep its default binding
        yield
        return
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = before


def init_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Connect once per process. ``address`` (or RAY_ADDRESS) targets an existing cluster.

    A local cluster keeps Ray's token authentication (on by default for a new local cluster
    since Ray 2.60: tpr-ray leaves RAY_AUTH_MODE alone) and listens on loopback only: without
    both, anyone who can reach the machine could run code as the user. Only a caller that sets
    RAY_AUTH_MODE=disabled itself (the test suite) turns authentication off.
    """
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    kwargs = {"include_dashboard": False, "log_to_driver": True}
    if os.environ.get("AWS_ENDPOINT_URL"):
        # An S3-compatible endpoint must reach workers on other nodes too. Credentials are
        # never passed this way: workers get them from their own AWS chain.
        kwargs["runtime_env"] = {"env_vars": {"AWS_ENDPOINT_URL": os.environ["AWS_ENDPOINT_URL"]}}
    if _console["log_file"]:
        _native_stderr_to_log()
    if address:
        ray.init(address=address, **kwargs)
    else:
        if _console["log_file"]:
            # Only for a cluster of our own: a submitted job's runtime env is the submitter's.
            kwargs.setdefault("runtime_env", {})["worker_process_setup_hook"] = \
                "tpr_ray.io.cluster.setup_quiet_worker"
        with _loopback_node():
            ray.init(num_cpus=num_cpus, **kwargs)
    if _console["log_file"]:
        import importlib

        # Ray Data's and Ray Train's loggers exist from their import on: mute them now.
        ray_data = importlib.import_module("ray.data")
        importlib.import_module("ray.train")
        ray_data.DataContext.get_current().enable_progress_bars = sys.stderr.isatty()
        _mute_ray_loggers()
        _route_worker_output()


def require_shared_storage(uri: str, what: str) -> None:
    """Refuse a node-local path for outputs when the cluster has more than one node.

    Checkpoints, shards and reports written to a local folder would be scattered over nodes
    (or lost with one). A path on a filesystem mounted on every node (NFS, Lustre) is fine:
    set TPR_RAY_SHARED_FS=1 to say so.
    """
    from tpr_ray.io import storage
    from tpr_ray.errors import ConfigError

    if storage.is_remote(uri) or os.environ.get("TPR_RAY_SHARED_FS") == "1":
        return
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if len(nodes) > 1:
        raise ConfigError(
            f"{what} {uri} is a node-local path, but the cluster has {len(nodes)} nodes; use shared storage "
            f"such as s3://bucket/prefix (or set TPR_RAY_SHARED_FS=1 if this path is mounted on every node)")
