"""The front door to a dataset: a `.parquet` manifest or a dataset folder in one of the
known formats (detected), both read as the canonical manifest table."""

from __future__ import annotations

from collections.abc import Sequence

import pyarrow as pa
from fsspec.core import url_to_fs

from tpr_ray.data.formats import read_dataset
from tpr_ray.data.manifest import read_manifest
from tpr_ray.errors import DataError


def load_manifest(data_uri: str, *, on_error: str = "raise", rejects_uri: str | None = None,
                  allow_uri_prefixes: Sequence[str] | None = None) -> pa.Table:
    """A manifest from either a `.parquet` manifest or a dataset folder (format auto-detected).

    `on_error` and `rejects_uri` apply to dataset folders only (see formats.read_dataset);
    a manifest has been validated when it was written. `allow_uri_prefixes`: see read_manifest.
    """
    if data_uri.rstrip("/").endswith(".parquet"):
        return read_manifest(data_uri, allow_uri_prefixes=allow_uri_prefixes)
    fs, path = url_to_fs(data_uri)
    if fs.isfile(path):
        raise DataError("expected a dataset folder or a .parquet manifest, got another file", file=data_uri)
    return read_dataset(data_uri, on_error=on_error, rejects_uri=rejects_uri)
