"""tpr-ray: text-based person retrieval on Ray."""

from __future__ import annotations


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("tpr-ray")
    except PackageNotFoundError:  # a checkout on PYTHONPATH without `pip install`
        return "0.1.0+checkout"


__version__ = _version()

# The public API, imported on first use: `import tpr_ray` stays cheap (no torch, no Ray).
_API = {
    "load": ("tpr_ray.api", "load"),
    "Model": ("tpr_ray.api", "Model"),
    "search": ("tpr_ray.index.faiss_index", "search"),
    "read_table": ("tpr_ray.tables", "read_table"),
}
__all__ = ["__version__", *_API]


def __getattr__(name: str):
    if name not in _API:
        raise AttributeError(f"module 'tpr_ray' has no attribute {name!r}")
    import importlib

    module, attr = _API[name]
    return getattr(importlib.import_module(module), attr)
