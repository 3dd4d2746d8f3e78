"""tpr-ray: text-based person retrieval on Ray."""

from __future__ import annotations


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("tpr-ray")
    except PackageNotFoundError:  # a checkout on PYTHONPATH without `pip install`
        return "0.1.0+checkout"


__version__ = _version()
