"""Which image URIs a manifest may point at.

A manifest's ``image_uri`` column is fetched by every training and embedding worker, so a
manifest from elsewhere must not make them read arbitrary local files, another bucket, or
web addresses (including a cloud metadata endpoint). The JSON readers build every URI as
``<dataset root>/imgs/<relative path>`` and refuse paths that could escape; a Parquet
manifest is held to the same rule:

- allowed are the image folder of the dataset the manifest records (``<root>/imgs/``, next
  to its annotation ``source``) and any prefix the user allows explicitly
  (``--allow-uri-prefix``, or ``TPR_RAY_ALLOW_URI_PREFIX``, comma-separated). A manifest
  without a recorded source (written by another tool) needs an explicit prefix. The
  recorded folder is trusted only as far as this goes: it always ends in ``/imgs/``, so a
  forged ``source`` cannot open a home folder or a whole disk;
- web schemes (http, https, ftp) are only allowed explicitly, whatever the manifest records;
- no NUL bytes, no ``.`` or ``..`` segments, no empty segments;
- on local disks, a URI is judged by where it really leads: a symlink out of the allowed
  folders is refused.
"""

from __future__ import annotations

import os
import posixpath
from collections.abc import Iterable, Sequence

from tpr_ray.errors import DataError

ENV_ALLOW = "TPR_RAY_ALLOW_URI_PREFIX"
IMAGE_FOLDER = "imgs"
WEB_SCHEMES = ("http", "https", "ftp", "ftps")


def split_uri(uri: str) -> tuple[str, str]:
    """(scheme, path); ``""`` for plain local paths, ``file://`` counted as local."""
    scheme, sep, rest = uri.partition("://")
    if not sep:
        return "", uri
    scheme = scheme.lower()
    return ("", rest) if scheme in ("file", "local") else (scheme, rest)


def _as_prefix(uri: str) -> str:
    scheme, path = split_uri(uri)
    if not scheme:
        path = os.path.abspath(path)
    path = path.rstrip("/") + "/"
    return f"{scheme}://{path}" if scheme else path


def env_prefixes() -> list[str]:
    return [p.strip() for p in os.environ.get(ENV_ALLOW, "").split(",") if p.strip()]


def allowed_prefixes(info: dict, extra: Iterable[str] = ()) -> list[str]:
    """The prefixes a manifest's image URIs may start with (see the module docstring)."""
    recorded = []
    source = info.get("source")
    if isinstance(source, str) and source and "\0" not in source:
        recorded.append(_join(_parent(source), IMAGE_FOLDER))
    prefixes = [_as_prefix(p) for p in recorded if split_uri(p)[0] not in WEB_SCHEMES]
    prefixes += [_as_prefix(p) for p in extra]
    return list(dict.fromkeys(prefixes))


def _parent(uri: str) -> str:
    scheme, path = split_uri(uri)
    parent = posixpath.dirname(path.rstrip("/")) if scheme else os.path.dirname(os.path.abspath(path))
    return f"{scheme}://{parent}" if scheme else parent


def _join(base: str, name: str) -> str:
    return base.rstrip("/") + "/" + name


def check_image_uris(uris: Sequence[str], prefixes: Sequence[str], source: str, *, links_only: bool = False) -> None:
    """Raise a :class:`DataError` naming the first row whose ``image_uri`` breaks the rule.

    ``links_only``: the URIs were built under the prefixes (the JSON readers); only where
    local symlinks lead is checked.
    """
    if not prefixes:
        raise DataError(f"the manifest records no dataset folder, so its image URIs cannot be trusted; pass "
                        f"--allow-uri-prefix PREFIX (or set {ENV_ALLOW}) naming where its images are", file=source)
    resolved_prefixes = [os.path.realpath(p) + os.sep for p in prefixes if not split_uri(p)[0]]
    real_dirs: dict[str, str] = {}
    for row, uri in enumerate(uris):
        problem = None if links_only else _problem(uri, prefixes)
        if problem is None and not split_uri(uri)[0]:
            real = _realpath(uri, real_dirs)
            if not any(real.startswith(p) for p in resolved_prefixes):
                problem = f"leads through a symlink to {real}, outside {_listing(prefixes)}"
        if problem is not None:
            raise DataError(f"image_uri {uri!r} {problem}; pass --allow-uri-prefix PREFIX (or set {ENV_ALLOW}) "
                            "if these images are meant to be read", file=source, entry=row, field="image_uri")


def _problem(uri: str, prefixes: Sequence[str]) -> str | None:
    if "\0" in uri:
        return "contains a NUL byte"
    scheme, path = split_uri(uri)
    segments = (path[1:] if path.startswith("/") else path).split("/")
    if any(s in ("", ".", "..") for s in segments):
        return "is not a normalised path (empty, '.' or '..' segments)"
    if not scheme and not os.path.isabs(path):
        return "is a relative path"
    if not any(uri.startswith(p) if scheme else path.startswith(p) for p in prefixes):
        return f"is outside {_listing(prefixes)}"
    return None


def _listing(prefixes: Sequence[str]) -> str:
    return "the allowed prefixes " + ", ".join(repr(p) for p in prefixes)


def _realpath(path: str, real_dirs: dict[str, str]) -> str:
    """``os.path.realpath(path)``, resolving each folder once (manifests list many files per folder)."""
    folder, name = os.path.split(path)
    if folder not in real_dirs:
        real_dirs[folder] = os.path.realpath(folder)
    candidate = os.path.join(real_dirs[folder], name)
    return os.path.realpath(candidate) if os.path.islink(candidate) else candidate
