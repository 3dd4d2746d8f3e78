"""Connecting to Ray: an existing cluster when one is named, else a local one."""

from __future__ import annotations

import os

import ray


def init_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Connect once per process. ``address`` (or RAY_ADDRESS) targets an existing cluster."""
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
    else:
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
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
