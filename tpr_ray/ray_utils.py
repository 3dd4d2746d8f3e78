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
