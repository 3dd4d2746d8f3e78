"""What to embed: the rows of a manifest split, every image under a prefix or glob, or the
rows of a Parquet listing file (streamed: the way to embed galleries of hundreds of millions).

Real galleries are usually bare folders of crops with no annotations; dataset splits come
with person ids and captions. Both become one table (``image_id``, ``person_id``,
``image_uri``) in a deterministic order, which is what the shard plan is cut from.
"""

from __future__ import annotations

import logging
import os
import posixpath

import pyarrow as pa
import pyarrow.compute as pc

from tpr_ray.io import storage
from tpr_ray.data import load_manifest
from tpr_ray.errors import ConfigError, DataError
from tpr_ray.tables import GALLERY_INPUT

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif")
SPLITS = ("train", "val", "test", "all")
GLOB_CHARS = "*?["
log = logging.getLogger(__name__)

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
                    schema=GALLERY_INPUT)


def gallery_rows(data: str | None = None, images: str | None = None, split: str = "test") -> pa.Table:
    """The gallery to embed, from a dataset/manifest split (``data``) or an image glob (``images``)."""
    if (data is None) == (images is None):
        raise ConfigError("give either a dataset/manifest (--data) or an image prefix or glob (--images)")
    if images is not None:
        return list_images(images)
    return manifest_split(data, split).select(GALLERY_INPUT.names)


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


# --- a listing file: galleries too large to list in one process ---------------------------

LISTING_BATCH_ROWS = 65_536


def is_listing(images: str) -> bool:
    """``--images`` names a Parquet listing file (not a folder, prefix or glob of images)."""
    return images.lower().endswith(".parquet") and not any(c in images for c in GLOB_CHARS)


def _listing_columns(uri: str, schema: pa.Schema) -> list[str]:
    """The gallery columns the listing has, after checking their types."""
    wanted = {"image_uri": pa.types.is_string, "image_id": pa.types.is_string, "person_id": pa.types.is_integer}
    if "image_uri" not in schema.names:
        raise DataError(f"a gallery listing needs an image_uri column (has: {', '.join(schema.names)})",
                        file=uri, field="image_uri")
    for name, ok in wanted.items():
        if name in schema.names:
            kind = schema.field(name).type
            if not (ok(kind) or (name != "person_id" and pa.types.is_large_string(kind))):
                raise DataError(f"has type {kind}; expected {'an integer' if name == 'person_id' else 'string'}",
                                file=uri, field=name)
    return [name for name in wanted if name in schema.names]


def check_listing(uri: str) -> int:
    """Check a listing file's columns (from its footer, without reading rows); its row count."""
    import pyarrow.parquet as pq

    fs, path = storage.filesystem(uri)
    if not fs.exists(path):
        raise DataError("no such listing file", file=uri)
    with fs.open(path, "rb") as f:
        meta = pq.ParquetFile(f)
        _listing_columns(uri, meta.schema_arrow)
        return meta.metadata.num_rows


def listing_batches(uri: str, batch_rows: int = LISTING_BATCH_ROWS):
    """The gallery rows of a Parquet listing file, streamed in record batches in the file's order.

    Columns: ``image_uri`` (required: a URI or path; a relative path is taken relative to
    the listing's folder), ``image_id`` (where absent or null: the URI) and ``person_id``
    (default: null);
    others are ignored. A missing or empty ``image_uri`` is an error naming its row. This
    never holds more than one batch of the listing, so a gallery of 100M images can be
    embedded from its listing (e.g. an S3 Inventory report) by a small driver.
    """
    import pyarrow.parquet as pq

    fs, path = storage.filesystem(uri)
    folder = uri.rsplit("/", 1)[0] if "://" in uri else os.path.dirname(os.path.abspath(uri))
    with fs.open(path, "rb") as f:
        reader = pq.ParquetFile(f)
        present = _listing_columns(uri, reader.schema_arrow)
        first = 0
        for batch in reader.iter_batches(batch_rows, columns=present):
            uris = batch.column("image_uri").cast(pa.string())
            bad = pc.or_kleene(pc.is_null(uris), pc.equal(pc.utf8_length(uris), 0))
            if pc.any(bad).as_py():
                row = first + pc.index(bad, True).as_py()
                raise DataError("no image URI", file=uri, entry=f"row {row}", field="image_uri")
            relative = pc.invert(pc.or_(pc.match_substring(uris, "://"), pc.starts_with(uris, "/")))
            if pc.any(relative).as_py():
                uris = pc.if_else(relative, pc.binary_join_element_wise(folder, uris, "/"), uris)
            ids = pc.coalesce(batch.column("image_id").cast(pa.string()), uris) if "image_id" in present else uris
            pids = (batch.column("person_id").cast(pa.int64()) if "person_id" in present
                    else pa.nulls(batch.num_rows, pa.int64()))
            yield pa.RecordBatch.from_arrays([ids, pids, uris], schema=GALLERY_INPUT)
            first += batch.num_rows
