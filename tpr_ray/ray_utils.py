"""Connecting to Ray: an existing cluster when one is named, else a local one."""

from __future__ import annotations

import contextlib
import os

import ray


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
    if address:
        ray.init(address=address, **kwargs)
        return
    with _loopback_node():
        ray.init(num_cpus=num_cpus, **kwargs)


def require_shared_storage(uri: str, what: str) -> None:
    """Refuse a node-local path for outputs when the cluster has more than one node.

    Checkpoints, shards and reports written to a local folder would be scattered over nodes
    (or lost with one). A path on a filesystem mounted on every node (NFS, Lustre) is fine:
    set TPR_RAY_SHARED_FS=1 to say so.
    """
    from tpr_ray import storage
    from tpr_ray.errors import ConfigError

    if storage.is_remote(uri) or os.environ.get("TPR_RAY_SHARED_FS") == "1":
        return
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if len(nodes) > 1:
        raise ConfigError(
            f"{what} {uri} is a node-local path, but the cluster has {len(nodes)} nodes; use shared storage "
            f"such as s3://bucket/prefix (or set TPR_RAY_SHARED_FS=1 if this path is mounted on every node)")
