"""Which image URIs a manifest or a gallery listing may point at.

A manifest's (or a ``--images`` listing's) ``image_uri`` column is fetched by every training
and embedding worker, so such a file from elsewhere must not make them read arbitrary local
files, another bucket, or web addresses (including a cloud metadata endpoint). The JSON
readers build every URI as ``<dataset root>/imgs/<relative path>`` and refuse paths that
could escape; a Parquet manifest or listing is held to the same rule:

- allowed is the folder the user's file actually is in (and everything under it), and any
  prefix the user allows explicitly (``--allow-uri-prefix``, or ``TPR_RAY_ALLOW_URI_PREFIX``,
  comma-separated). What the file says about itself (a manifest's recorded ``source``)
  widens nothing: it is named in the error only as a hint;
- web schemes (http, https, ftp) are only allowed explicitly, and link-local addresses (the
  cloud metadata endpoints) never;
- no NUL bytes, no ``.`` or ``..`` segments, no empty segments;
- ``file://`` URIs are local paths and follow the local rules;
- on local disks, a URI is judged by where it really leads: a symlink out of the allowed
  folders is refused.
"""

from __future__ import annotations

import ipaddress
import os
import posixpath
import socket
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


def allowed_prefixes(location: str, extra: Iterable[str] = ()) -> list[str]:
    """The prefixes the image URIs of the file at ``location`` (a manifest or listing) may start
    with: its own folder unless that is on the web, then ``extra`` (see the module docstring)."""
    folder = _parent(location)
    prefixes = [] if split_uri(folder)[0] in WEB_SCHEMES else [_as_prefix(folder)]
    prefixes += [_as_prefix(p) for p in extra]
    return list(dict.fromkeys(prefixes))


def recorded_images(info: dict) -> str | None:
    """The image folder a manifest's metadata claims (``<source folder>/imgs/``): a hint for the
    user, never a permission."""
    source = info.get("source")
    if isinstance(source, str) and source and "\0" not in source:
        return _as_prefix(_join(_parent(source), IMAGE_FOLDER))
    return None


def _parent(uri: str) -> str:
    scheme, path = split_uri(uri)
    parent = posixpath.dirname(path.rstrip("/")) if scheme else os.path.dirname(os.path.abspath(path))
    return f"{scheme}://{parent}" if scheme else parent


def _join(base: str, name: str) -> str:
    return base.rstrip("/") + "/" + name


def check_image_uris(uris: Sequence[str], prefixes: Sequence[str], source: str, *, links_only: bool = False,
                     first: int = 0, hint: str = "") -> None:
    """Raise a :class:`DataError` naming the first row whose ``image_uri`` breaks the rule.

    ``links_only``: the URIs were built under the prefixes (the JSON readers); only where
    local symlinks lead is checked. ``first``: the row number of ``uris[0]`` in ``source``
    (a listing checked batch by batch). ``hint``: appended to the message.
    """
    if not prefixes:
        raise DataError(f"no folder is allowed for its image URIs (it is not on a local disk or object store); "
                        f"pass --allow-uri-prefix PREFIX (or set {ENV_ALLOW}) naming where its images are",
                        file=source)
    resolved_prefixes = [os.path.realpath(split_uri(p)[1]) + os.sep for p in prefixes if not split_uri(p)[0]]
    real_dirs: dict[str, str] = {}
    for row, uri in enumerate(uris):
        problem = None if links_only else _problem(uri, prefixes)
        scheme, path = split_uri(uri)
        if problem is None and not scheme:
            real = _realpath(path, real_dirs)
            if not any(real.startswith(p) for p in resolved_prefixes):
                problem = f"leads through a symlink to {real}, outside {_listing(prefixes)}"
        if problem == LINK_LOCAL:
            raise DataError(f"image_uri {uri!r} {problem}: never read", file=source, entry=first + row,
                            field="image_uri")
        if problem is not None:
            raise DataError(f"image_uri {uri!r} {problem}; pass --allow-uri-prefix PREFIX (or set {ENV_ALLOW}) "
                            f"if these images are meant to be read{hint}", file=source, entry=first + row,
                            field="image_uri")


def _problem(uri: str, prefixes: Sequence[str]) -> str | None:
    if "\0" in uri:
        return "contains a NUL byte"
    scheme, path = split_uri(uri)
    segments = (path[1:] if path.startswith("/") else path).split("/")
    if any(s in ("", ".", "..") for s in segments):
        return "is not a normalised path (empty, '.' or '..' segments)"
    if not scheme and not os.path.isabs(path):
        return "is a relative path"
    if scheme in WEB_SCHEMES and _is_link_local(path.split("/", 1)[0]):
        return LINK_LOCAL
    if not any(uri.startswith(p) if scheme else path.startswith(p) for p in prefixes):
        return f"is outside {_listing(prefixes)}"
    return None


LINK_LOCAL = "is a link-local address (where clouds serve instance credentials)"
METADATA_HOSTS = ("metadata.google.internal", "metadata", "instance-data", "instance-data.ec2.internal")


def _is_link_local(authority: str) -> bool:
    """Whether a web URI's host is link-local (169.254.0.0/16, fe80::/10: where clouds serve
    instance credentials) or a metadata service's name; user info and port ignored."""
    host = authority.rsplit("@", 1)[-1]
    host = host[1:host.index("]")] if host.startswith("[") and "]" in host else host.rsplit(":", 1)[0]
    host = host.lower().rstrip(".")
    if host in METADATA_HOSTS:
        return True
    try:  # inet_aton also reads the forms a fetch would resolve: 2852039166, 0xa9.0xfe.0xa9.0xfe
        address = ipaddress.ip_address(socket.inet_aton(host))
    except OSError:
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            return False
    mapped = getattr(address, "ipv4_mapped", None)
    return address.is_link_local or bool(mapped and mapped.is_link_local) or host == "fd00:ec2::254"


def _listing(prefixes: Sequence[str]) -> str:
    return "the allowed prefixes " + ", ".join(repr(p) for p in prefixes)


def _realpath(path: str, real_dirs: dict[str, str]) -> str:
    """``os.path.realpath(path)``, resolving each folder once (manifests list many files per folder)."""
    folder, name = os.path.split(path)
    if folder not in real_dirs:
        real_dirs[folder] = os.path.realpath(folder)
    candidate = os.path.join(real_dirs[folder], name)
    return os.path.realpath(candidate) if os.path.islink(candidate) else candidate
