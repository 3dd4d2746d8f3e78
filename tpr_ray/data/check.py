"""Finding a dataset's missing and unreadable image files before any job trips over them.

Two depths: ``"exists"`` lists the image folder once (one recursive listing, cheap on
object stores too) and compares; ``"decode"`` also fetches and decodes every image, in
parallel, with threads here or as Ray tasks for large datasets.

Only a file that is not there or is not an image is *bad*: "could not fetch it now"
(permissions, network, throttling) is retried and, if it persists, stops the check with an
error naming the URI, so a passing outage is never recorded as bad data.
"""

from __future__ import annotations

import logging
import os
import posixpath
import re
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

from fsspec.core import url_to_fs

from tpr_ray.io import storage
from tpr_ray.errors import DataError

log = logging.getLogger(__name__)

CHECKS = ("none", "exists", "decode")
RAY_THRESHOLD = 20_000  # images; above this, decoding runs as Ray tasks (unless told otherwise)
CHUNK = 500  # images per Ray task
FETCH_ATTEMPTS = 3
# Decoding at a reduced JPEG scale still reads the whole stream, so truncation is caught.
CHECK_SIZE = (384, 128)


def missing_files(image_root: str, paths: Sequence[str]) -> set[str]:
    """The relative ``paths`` with no file under ``image_root``."""
    fs, root = url_to_fs(image_root)
    root = root.rstrip("/")
    try:
        found = fs.find(root)
    except FileNotFoundError:
        found = []
    present = {posixpath.relpath(p, root) for p in found}
    if os.sep != "/":  # local listings on Windows use backslashes
        present = {p.replace(os.sep, "/") for p in present}
    return {p for p in paths if p not in present}


def image_problem(uri: str) -> str | None:
    """Why the image at ``uri`` is bad ("missing", "unreadable: ..."), or None when it decodes.

    Errors fetching it (other than its absence) are retried and then raised.
    """
    from tpr_ray.io.images import decode_image

    for attempt in range(FETCH_ATTEMPTS):
        try:
            data = storage.read_bytes(uri)
            break
        except FileNotFoundError:
            return "missing"
        except (MemoryError, KeyboardInterrupt):
            raise
        except Exception as exc:  # a fetch failure is not bad data: retry, then stop
            if attempt == FETCH_ATTEMPTS - 1:
                raise OSError(f"could not read {uri} after {FETCH_ATTEMPTS} attempts "
                              f"({type(exc).__name__}: {exc}); nothing was recorded as bad") from exc
            time.sleep(0.5 * 2 ** attempt)
    if not data:
        return "unreadable: empty file"
    try:
        decode_image(data, CHECK_SIZE)
    except MemoryError:
        raise
    except Exception as exc:  # Pillow signals a broken file with many types (OSError, SyntaxError, ...)
        message = re.sub(r"\s*<_io\.BytesIO object at 0x[0-9a-fA-F]+>", "", str(exc))
        return f"unreadable: {type(exc).__name__}: {message}"[:300]
    return None


def _chunk_problems(uris: Sequence[str]) -> list[str | None]:
    return [image_problem(uri) for uri in uris]


def undecodable(uris: Sequence[str], *, use_ray: bool | None = None, address: str | None = None,
                threads: int | None = None) -> dict[int, str]:
    """{index: reason} of the ``uris`` that are missing or do not decode."""
    if not uris:
        return {}
    if use_ray is None:
        use_ray = len(uris) > RAY_THRESHOLD
    size = CHUNK if use_ray else 16
    chunks = [list(uris[i:i + size]) for i in range(0, len(uris), size)]
    tick = time.perf_counter()
    if use_ray:
        import ray

        from tpr_ray.io.cluster import init_ray

        init_ray(address)
        # Ray retries a task whose fetch kept failing (with its own backoff) before giving up.
        task = ray.remote(_chunk_problems).options(num_cpus=1, max_retries=3, retry_exceptions=[OSError])
        results = ray.get([task.remote(chunk) for chunk in chunks])
    else:
        with ThreadPoolExecutor(max_workers=threads or min(32, 2 * (os.cpu_count() or 1))) as pool:
            results = list(pool.map(_chunk_problems, chunks))
    problems = {}
    for offset, result in zip(range(0, len(uris), size), results):
        for k, reason in enumerate(result):
            if reason is not None:
                problems[offset + k] = reason
    log.info("checked %d images in %.1fs (%s): %d bad", len(uris), time.perf_counter() - tick,
             "Ray tasks" if use_ray else "threads", len(problems))
    return problems


def describe(problems: list[tuple[int, str, str]], total: int, source: str, limit: int = 10) -> DataError:
    """One error listing the first bad image files: (entry, path, reason) each."""
    listed = "; ".join(f"entry {entry} {path}: {reason}" for entry, path, reason in problems[:limit])
    more = f"; and {len(problems) - limit} more" if len(problems) > limit else ""
    return DataError(f"{len(problems)} of {total} image files are missing or unreadable: {listed}{more}; "
                     "pass --skip-bad to leave them out (they are listed in the rejects file)", file=source)
