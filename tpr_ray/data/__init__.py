"""Datasets: the canonical manifest, readers for the three real formats, and synthetic data."""

from tpr_ray.data.formats import FORMATS, detect_format, read_dataset
from tpr_ray.data.loading import load_manifest
from tpr_ray.data.manifest import (
    MANIFEST_SCHEMA,
    SPLITS,
    manifest_info,
    read_manifest,
    selection_split,
    split_stats,
    write_manifest,
)
from tpr_ray.data.synth import STYLES, synthesize

__all__ = [
    "FORMATS", "MANIFEST_SCHEMA", "SPLITS", "STYLES", "detect_format", "load_manifest", "manifest_info",
    "read_dataset", "read_manifest", "selection_split", "split_stats", "synthesize", "write_manifest",
]
