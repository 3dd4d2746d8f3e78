"""What to embed: the rows of a manifest split, or every image under a prefix or glob.

Real galleries are usually bare folders of crops with no annotations; dataset splits come
with person ids and captions. Both become one table (``image_id``, ``person_id``,
``image_uri``) in a deterministic order, which is what the shard plan is cut from.
"""

from __future__ import annotations

import logging
import posixpath

import pyarrow as pa
import pyarrow.compute as pc

from tpr_ray import storage
from tpr_ray.data import load_manifest
from tpr_ray.errors import ConfigError, DataError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif")
SPLITS = ("train", "val", "test", "all")
GLOB_CHARS = "*?["
log = logging.getLogger(__name__)

GALLERY_COLUMNS = pa.schema([("image_id", pa.string()), ("person_id", pa.int64()), ("image_uri", pa.string())])


def manifest_split(data_uri: str, split: str) -> pa.Table:
    """The manifest rows of ``split`` (or all rows), in manifest order."""
    if split not in SPLITS:
        raise ConfigError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    manifest = load_manifest(data_uri)
    if split == "all":
        return manifest
    rows = manifest.filter(pc.equal(manifest.column("split"), split))
    if rows.num_rows == 0:
        raise DataError(f"no rows in split {split!r}", file=data_uri, field="split")
    return rows


def _glob_root(path: str) -> str:
    """The fixed folder part of a glob, e.g. ``bucket/crops`` for ``bucket/crops/**/*.jpg``."""
    first = min((path.index(c) for c in GLOB_CHARS if c in path), default=len(path))
    return path[:first].rsplit("/", 1)[0] if "/" in path[:first] else ""


def list_images(pattern: str) -> pa.Table:
    """Every image file matched by a glob (``s3://b/crops/**/*.jpg``) or under a prefix.

    Sorted by URI, so the same listing always yields the same shard plan. ``image_id`` is the
    path relative to the glob's fixed root; ``person_id`` is null (no annotations).
    """
    fs, path = storage.filesystem(pattern)
    protocol = pattern.split("://", 1)[0] if "://" in pattern else None
    if any(c in path for c in GLOB_CHARS):
        root = _glob_root(path)
        found = fs.glob(path)
    else:
        root = path.rstrip("/")
        if not fs.exists(root):
            raise DataError("no such folder or prefix", file=pattern)
        found = fs.find(root)
    paths = sorted(p for p in found if p.lower().endswith(IMAGE_EXTENSIONS))
    if len(paths) < len(found):
        log.info("%s: %d of %d files are not images by extension and were not listed",
                 pattern, len(found) - len(paths), len(found))
    if not paths:
        raise DataError(f"no image files ({', '.join(IMAGE_EXTENSIONS)}) match", file=pattern)
    uris = [f"{protocol}://{p}" if protocol else p for p in paths]
    ids = [posixpath.relpath(p, root) if root else p for p in paths]
    return pa.table({"image_id": ids, "person_id": pa.nulls(len(paths), pa.int64()), "image_uri": uris},
                    schema=GALLERY_COLUMNS)


def gallery_rows(data: str | None = None, images: str | None = None, split: str = "test") -> pa.Table:
    """The gallery to embed, from a dataset/manifest split (``data``) or an image glob (``images``)."""
    if (data is None) == (images is None):
        raise ConfigError("give either a dataset/manifest (--data) or an image prefix or glob (--images)")
    if images is not None:
        return list_images(images)
    return manifest_split(data, split).select(GALLERY_COLUMNS.names)


def query_rows(images: pa.Table) -> pa.Table:
    """One row per caption of a manifest split, numbered in manifest order."""
    image_ids, pids, captions = [], [], []
    for image_id, pid, caps in zip(images.column("image_id").to_pylist(), images.column("person_id").to_pylist(),
                                   images.column("captions").to_pylist()):
        image_ids += [image_id] * len(caps)
        pids += [pid] * len(caps)
        captions += caps
    return pa.table({"query_id": pa.array(range(len(captions)), pa.int64()),
                     "image_id": pa.array(image_ids, pa.string()),
                     "person_id": pa.array(pids, pa.int64()),
                     "caption": pa.array(captions, pa.string())})
