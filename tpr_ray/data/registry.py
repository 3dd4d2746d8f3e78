"""Datasets by name: a JSON registry, the built-in synthetic styles, or a folder / URI.

Cross-dataset runs name their data (``--train cuhk,icfg``); this module turns such a name
into a :class:`Dataset` with a root, generating the synthetic ones on first use, and gives
the identity (format and annotation hash) that keys every result built from it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
from dataclasses import dataclass

from tpr_ray.io import storage
from tpr_ray.data.synth import STYLES as SYNTHETIC_STYLES
from tpr_ray.errors import ConfigError, DataError

log = logging.getLogger(__name__)

REGISTRY_KEYS = ("root", "synthetic", "ids", "seed")


@dataclass(frozen=True)
class Dataset:
    """A dataset by name: a folder or URI in a real format, or a synthetic style to generate."""

    name: str
    root: str | None = None
    synthetic: str | None = None  # style; the data is generated into OUT/data/<name> on first use
    ids: int = 200
    seed: int = 0

    def describe(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


def safe_name(name: str) -> str:
    """``name`` as one path component: letters, digits, ``.``, ``_`` and ``-`` only, and no
    leading dot (so never ``.`` or ``..``): user-given names become folders under the output."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).lstrip("._").rstrip("_") or "data"


def child_path(parent: str, *names: str) -> str:
    """``parent/names...``, refusing any name that is not one plain path component, so a
    name built from user input can never point outside ``parent``."""
    for name in names:
        if name in ("", ".", "..") or any(c in name for c in "/\\\0") or ":" in name:
            raise ConfigError(f"{name!r} cannot be used as a file or folder name under {parent}")
    return storage.join(parent, *names)


def load_registry(path: str | None) -> dict[str, Dataset]:
    """Named datasets from a JSON registry file; ``{}`` for ``None``.

    Format (relative roots are taken from the registry file's folder)::

        {"datasets": {
            "cuhk": {"root": "/data/CUHK-PEDES"},
            "rstp": "s3://bucket/RSTPReid",
            "tiny-icfg": {"synthetic": "icfg", "ids": 60, "seed": 1}}}
    """
    if path is None:
        return {}
    try:
        raw = storage.read_json(path)
    except FileNotFoundError:
        raise ConfigError(f"dataset registry {path} not found; pass a JSON file (see `tpr-ray crosseval --help`)") \
            from None
    except json.JSONDecodeError as error:
        raise DataError(f"not valid JSON: {error}", file=path) from None
    entries = raw.get("datasets", raw) if isinstance(raw, dict) else None
    if not isinstance(entries, dict):
        raise DataError('expected {"datasets": {name: {"root": ...}}}', file=path)
    base = os.path.dirname(os.path.abspath(path)) if not storage.is_remote(path) else path.rsplit("/", 1)[0]
    registry = {}
    for name, entry in entries.items():
        if isinstance(entry, str):
            entry = {"root": entry}
        if not isinstance(entry, dict) or ("root" in entry) == ("synthetic" in entry):
            raise DataError('each dataset needs exactly one of "root" (a folder or URI) or "synthetic" (a style)',
                            file=path, entry=name)
        unknown = set(entry) - set(REGISTRY_KEYS)
        if unknown:
            raise DataError(f"unknown keys {sorted(unknown)}; use {', '.join(REGISTRY_KEYS)}", file=path, entry=name)
        if "synthetic" in entry and entry["synthetic"] not in SYNTHETIC_STYLES:
            raise DataError(f"unknown synthetic style {entry['synthetic']!r}; use {', '.join(SYNTHETIC_STYLES)}",
                            file=path, entry=name, field="synthetic")
        root = entry.get("root")
        if root is not None and "://" not in root and not os.path.isabs(root):
            root = storage.join(base, root)
        registry[name] = Dataset(safe_name(name), root=root, synthetic=entry.get("synthetic"),
                                 ids=int(entry.get("ids", 200)), seed=int(entry.get("seed", 0)))
    return registry


def resolve_dataset(spec: str, registry: dict[str, Dataset], synthetic_ids: int = 200, seed: int = 0) -> Dataset:
    """A registry name, a built-in synthetic name (cuhk, icfg, rstp), or a folder / URI."""
    if spec in registry:
        return registry[spec]
    if spec in SYNTHETIC_STYLES:
        return Dataset(spec, synthetic=spec, ids=synthetic_ids, seed=seed)
    if "://" in spec or os.path.sep in spec or os.path.exists(spec):
        root = spec if "://" in spec else os.path.abspath(spec)
        return Dataset(safe_name(os.path.basename(spec.rstrip("/")).replace(".parquet", "")), root=root)
    known = sorted(set(registry) | set(SYNTHETIC_STYLES))
    raise ConfigError(f"unknown dataset {spec!r}: not in the registry ({', '.join(known)}) and not a folder or URI")


def materialise(dataset: Dataset, out: str) -> Dataset:
    """The dataset with a root: synthetic ones are generated into ``OUT/data/<name>`` once."""
    if dataset.root is not None:
        return dataset
    from tpr_ray.data.synth import synthesize

    root = child_path(out, "data", safe_name(f"{dataset.name}-{dataset.synthetic}-{dataset.ids}ids-seed{dataset.seed}"))
    if not storage.exists(root) or not _has_annotations(root):
        if storage.exists(root):  # an interrupted generation: start it over
            fs, path = storage.filesystem(root)
            fs.rm(path, recursive=True)
        log.info("generating synthetic %s data (%d identities) in %s", dataset.synthetic, dataset.ids, root)
        tmp = root + ".partial"
        if storage.exists(tmp):
            fs, path = storage.filesystem(tmp)
            fs.rm(path, recursive=True)
        synthesize(dataset.synthetic, dataset.ids, dataset.seed, tmp)
        fs, path = storage.filesystem(tmp)
        fs.mv(path, storage.filesystem(root)[1], recursive=True)
    return dataclasses.replace(dataset, root=root)


def _has_annotations(root: str) -> bool:
    from tpr_ray.data.formats import detect_format

    try:
        detect_format(root)
        return True
    except (ConfigError, DataError):
        return False


def dataset_version(dataset: Dataset) -> dict:
    """Name, root, format and annotation hash of a dataset (its identity in every key)."""
    from tpr_ray.data.loading import load_manifest
    from tpr_ray.data.manifest import manifest_info

    info = manifest_info(load_manifest(dataset.root))
    return {**dataset.describe(), "format": info.get("dataset"), "version": info.get("version")}
