"""Thin helpers over fsspec so every job reads and writes local paths and URIs alike."""

from __future__ import annotations

import json
import os
import posixpath
import uuid
from functools import lru_cache

import fsspec
from fsspec.core import url_to_fs


@lru_cache(maxsize=32)
def _fs_for_protocol(protocol: str):
    if protocol in ("file", "local", "memory"):
        return fsspec.filesystem(protocol)
    # Other processes (Ray workers, other jobs) write to the same prefixes: a cached listing
    # would hide their shards, so object-store listings always go to the store.
    return fsspec.filesystem(protocol, use_listings_cache=False)


def filesystem(uri: str):
    """(filesystem, path) for a URI; filesystems are cached per protocol within a process."""
    protocol, path = fsspec.core.split_protocol(uri)
    protocol = protocol or "file"
    fs = _fs_for_protocol(protocol)
    return fs, fs._strip_protocol(uri) if protocol != "file" else os.path.abspath(path)


def read_bytes(uri: str) -> bytes:
    fs, path = filesystem(uri)
    with fs.open(path, "rb") as f:
        return f.read()


def exists(uri: str) -> bool:
    fs, path = filesystem(uri)
    return fs.exists(path)


def join(base: str, *parts: str) -> str:
    if "://" in base:
        return posixpath.join(base, *parts)
    return os.path.join(base, *parts)


def makedirs(uri: str) -> None:
    fs, path = filesystem(uri)
    fs.makedirs(path, exist_ok=True)


TEMP_PREFIX = "_tmp."


# Object stores whose uploads are all-or-nothing (see write_bytes_atomic).
WHOLE_UPLOADS = ("s3", "s3a", "gs", "gcs")


def write_bytes_atomic(uri: str, data: bytes | memoryview) -> None:
    """Write a file so that readers never see a partial one.

    On S3 and GCS the object is uploaded under its own name (it appears whole or not at all).
    Elsewhere it is written under a temporary name, then moved into place. The temporary name
    starts with ``_`` and does not end in the file's extension, so a writer killed before the
    move leaves nothing that pyarrow, DuckDB or a ``*.parquet`` glob would read as data (see
    :func:`remove_temporaries`). On a local filesystem the file is fsynced before the rename
    and its folder after it: without that, a power loss can bring back a renamed file that is
    empty.
    """
    fs, path = filesystem(uri)
    if fsspec.core.split_protocol(uri)[0] in WHOLE_UPLOADS:
        # S3 and GCS show an object only once its upload (one PUT, or a multipart upload) is
        # complete, and a failed multipart upload is aborted: the object's own name is safe to
        # write, and a temporary object would cost a server-side copy of every byte.
        fs.pipe_file(path, data if isinstance(data, bytes) else bytes(data))
        return
    if is_remote(uri):  # other stores: written under a temporary name, moved into place once whole
        parent = posixpath.dirname(path)
        fs.makedirs(parent, exist_ok=True)
        tmp = _temporary_name(parent, path)
        with fs.open(tmp, "wb") as f:
            f.write(data)
        fs.mv(tmp, path)
        return
    tmp = _local_temporary(path, data)
    os.replace(tmp, path)
    fsync_dir(os.path.dirname(path))


def _temporary_name(parent: str, path: str) -> str:
    return posixpath.join(parent, f"{TEMP_PREFIX}{posixpath.basename(path)}.{uuid.uuid4().hex[:8]}")


def _local_temporary(path: str, data: bytes | memoryview) -> str:
    """``data`` written and fsynced to a temporary file next to the local ``path``; its name."""
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    tmp = _temporary_name(parent, path)
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return tmp


# Object stores with a conditional "create only if absent" write (If-None-Match: *).
CONDITIONAL_CREATES = ("s3", "s3a")


def create_exclusive(uri: str, data: bytes) -> bool:
    """Write a new file whole, in one atomic step that fails if the file exists: raises
    FileExistsError then. On a local disk, a hard link of a complete temporary file (never
    over an existing one); on S3, a conditional PUT (If-None-Match). Returns True only where
    exclusivity is certain (a local disk): an S3-compatible store may ignore the condition,
    and other stores get a plain existence check first, so there the caller must still settle
    a race itself."""
    fs, path = filesystem(uri)
    protocol = fsspec.core.split_protocol(uri)[0] or "file"
    if protocol in CONDITIONAL_CREATES:
        fs.pipe_file(path, data, mode="create")  # s3fs: FileExistsError on 412 Precondition Failed
        return False
    if protocol in ("file", "local"):
        tmp = _local_temporary(path, data)
        try:
            os.link(tmp, path)  # FileExistsError if it is there
        except FileExistsError:
            raise
        except OSError:  # a filesystem without hard links: the plain way below
            pass
        else:
            fsync_dir(os.path.dirname(path))
            return True
        finally:
            os.unlink(tmp)
    if fs.exists(path):
        raise FileExistsError(uri)
    write_bytes_atomic(uri, data)
    return False


def fsync_dir(path: str) -> None:
    """Make a rename or delete in a local folder durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove_temporaries(uri: str) -> int:
    """Delete what interrupted atomic writes left in a folder; returns how many."""
    fs, path = filesystem(uri)
    if not fs.exists(path):
        return 0
    leftovers = [p for p in fs.ls(path, detail=False) if posixpath.basename(p).startswith(TEMP_PREFIX)]
    for p in leftovers:
        fs.rm(p)
    return len(leftovers)


def remove(uri: str) -> None:
    """Delete one file; on a local filesystem the deletion is made durable."""
    fs, path = filesystem(uri)
    fs.rm(path)
    if not is_remote(uri):
        fsync_dir(os.path.dirname(path))


def json_bytes(obj) -> bytes:
    """How tpr-ray writes JSON files: sorted keys, indented, one final newline."""
    return (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode()


def write_json(uri: str, obj) -> None:
    write_bytes_atomic(uri, json_bytes(obj))


def read_json(uri: str):
    return json.loads(read_bytes(uri))


def is_remote(uri: str) -> bool:
    protocol, _ = fsspec.core.split_protocol(uri)
    return protocol not in (None, "file", "local")


__all__ = ["filesystem", "read_bytes", "exists", "join", "makedirs", "write_bytes_atomic", "create_exclusive",
           "fsync_dir", "remove", "remove_temporaries", "json_bytes", "write_json", "read_json", "is_remote", "url_to_fs"]
