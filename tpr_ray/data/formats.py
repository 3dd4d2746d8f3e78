"""Readers for the three dataset formats, each turning an annotation JSON into a manifest.

The formats differ only in file names and field names, so each is a small `DatasetFormat`
record and one validating reader serves all three. Every entry is checked; a bad entry
either stops the read with a `DataError` naming file, entry index and field, or (with
`on_error="skip"`) is left out and listed in a rejects file, never dropped silently.
"""

from __future__ import annotations

import io
import json
import logging
import posixpath
import re
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.core import url_to_fs
from fsspec.implementations.local import LocalFileSystem

from tpr_ray.io import storage
from tpr_ray.data.check import CHECKS, describe, missing_files, undecodable
from tpr_ray.data.manifest import SPLITS, build_manifest, file_version
from tpr_ray.data.uris import IMAGE_FOLDER, check_image_uris
from tpr_ray.errors import ConfigError, DataError

log = logging.getLogger(__name__)

@dataclass(frozen=True)
class DatasetFormat:
    """Where a format keeps its annotations and what it calls the image path field."""

    name: str
    title: str
    annotation_files: tuple[str, ...]  # in order of preference
    path_field: str
    files_without_split: tuple[str, ...] = ()


FORMATS = {
    "cuhk": DatasetFormat(
        "cuhk", "CUHK-PEDES", ("reid_raw.json", "caption_all.json"), "file_path", ("caption_all.json",)
    ),
    "icfg": DatasetFormat("icfg", "ICFG-PEDES", ("ICFG-PEDES.json", "ICFG_PEDES.json"), "file_path"),
    "rstp": DatasetFormat("rstp", "RSTPReid", ("data_captions.json",), "img_path"),
}


def cuhk_standard_split(person_id: int) -> str | None:
    """The standard CUHK-PEDES split by identity, for `caption_all.json`, which has no split field.

    The original release's reid_raw.json assigns ids 1..11003 to train, 11004..12003 to val
    and 12004..13003 to test; every published result uses that partition.
    """
    if 1 <= person_id <= 11003:
        return "train"
    if 11004 <= person_id <= 12003:
        return "val"
    if 12004 <= person_id <= 13003:
        return "test"
    return None


# ---------------------------------------------------------------------------------------
# Finding the annotation file


def detect_format(root: str) -> str:
    """"cuhk", "icfg" or "rstp", from which annotation file the dataset folder holds."""
    names = _list_names(root)
    found = [fmt.name for fmt in FORMATS.values() if any(f in names for f in fmt.annotation_files)]
    if len(found) == 1:
        return found[0]
    looked_for = ", ".join(f for fmt in FORMATS.values() for f in fmt.annotation_files)
    if not found:
        raise DataError(f"no annotation file found; looked for {looked_for}", file=root)
    raise DataError(f"annotation files of several formats ({', '.join(found)}); pass the format explicitly", file=root)


def _list_names(root: str) -> set[str]:
    fs, path = url_to_fs(root)
    try:
        return {posixpath.basename(p.rstrip("/")) for p in fs.ls(path, detail=False)}
    except (FileNotFoundError, NotADirectoryError):
        raise DataError("dataset folder not found", file=root) from None


def annotation_uri(root: str, fmt: str) -> str:
    """The URI of the annotation file `fmt` reads in `root` (the preferred one when several exist)."""
    names = _list_names(root)
    spec = _format(fmt)
    for name in spec.annotation_files:
        if name in names:
            return f"{_absolute(root)}/{name}"
    raise DataError(f"no {spec.title} annotation file; looked for {', '.join(spec.annotation_files)}", file=root)


def _format(fmt: str) -> DatasetFormat:
    if fmt not in FORMATS:
        raise ConfigError(f"unknown dataset format {fmt!r}; choose one of {sorted(FORMATS)}")
    return FORMATS[fmt]


# ---------------------------------------------------------------------------------------
# Reading


def read_dataset(
    root: str, *, fmt: str | None = None, on_error: str = "raise", rejects_uri: str | None = None,
    check: str = "none", check_on_ray: bool | None = None, address: str | None = None,
) -> pa.Table:
    """Read a dataset folder (local path or fsspec URI) into a manifest table.

    on_error="raise" stops at the first bad entry; "skip" leaves bad entries out, writes
    them to `rejects_uri` (Parquet if it ends in .parquet, else JSON lines) and records
    their number as "rejected" in the manifest metadata.

    check="exists" also requires each entry's image file to exist, "decode" to decode (see
    tpr_ray.data.check; `check_on_ray`/`address` choose where); a missing or unreadable
    image is a bad entry, except that in raise mode all of them are listed at once.
    """
    if on_error not in ("raise", "skip"):
        raise ConfigError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    if check not in CHECKS:
        raise ConfigError(f"check must be one of {', '.join(CHECKS)}, got {check!r}")
    if rejects_uri is not None and on_error != "skip":
        raise ConfigError("a rejects file only makes sense with on_error='skip'")
    fmt = fmt or detect_format(root)
    spec = _format(fmt)
    source = annotation_uri(root, fmt)
    data = storage.read_bytes(source)
    entries = _parse_json(data, source)
    reader = _EntryReader(spec, source, posixpath.basename(source), on_error)
    for index, entry in enumerate(entries):
        reader.add(index, entry)
    image_root = f"{_absolute(root)}/{IMAGE_FOLDER}"
    if check != "none":
        reader.require_images(image_root, decode=check == "decode", use_ray=check_on_ray, address=address)
    rows = reader.rows()
    if rejects_uri is not None:
        write_rejects(reader.rejects, rejects_uri)
    if reader.rejects:
        log.warning("skipped %d bad entries of %s (listed in %s)",
                    len(reader.rejects), source, rejects_uri or "no rejects file")
    if not rows:
        raise DataError(f"no usable entries ({len(reader.rejects)} rejected)", file=source)
    columns = {
        "image_id": [r["path"] for r in rows],
        "person_id": [r["id"] for r in rows],
        "split": [r["split"] for r in rows],
        "image_uri": [image_root + "/" + r["path"] for r in rows],
        "captions": [r["captions"] for r in rows],
        "dataset": [fmt] * len(rows),
    }
    # The paths were checked not to escape imgs/; on a local disk a symlink still could.
    check_image_uris(columns["image_uri"], [image_root], source, links_only=True)
    info = {"dataset": fmt, "source": source, "version": file_version(data), "rejected": len(reader.rejects)}
    return build_manifest(columns, info)


def _parse_json(data: bytes, source: str) -> list:
    try:
        # utf-8-sig is as strict as utf-8 and also accepts a leading byte-order mark.
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        message = f"not valid UTF-8: byte offset {err.start} ({err.reason}); re-save the file as UTF-8"
        raise DataError(message, file=source) from None
    try:
        entries = json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(f"not valid JSON: {err.msg} at line {err.lineno}, column {err.colno}", file=source) from None
    if not isinstance(entries, list):
        raise DataError(f"expected a JSON list of entries, got a JSON {type(entries).__name__}", file=source)
    return entries


def _absolute(root: str) -> str:
    """`root` as an absolute location: a plain path for local data, a full URI otherwise.

    Manifests outlive the working directory they were made in, so relative paths won't do.
    """
    fs, path = url_to_fs(root)
    path = path.rstrip("/")
    return path if isinstance(fs, LocalFileSystem) else fs.unstrip_protocol(path)


def write_rejects(rejects: list[dict], uri: str) -> None:
    """Write reject records (file, entry, field, reason) as Parquet or JSON lines."""
    if uri.endswith(".parquet"):
        schema = pa.schema(
            [("file", pa.string()), ("entry", pa.int64()), ("field", pa.string()), ("reason", pa.string())]
        )
        buffer = io.BytesIO()
        pq.write_table(pa.Table.from_pylist(rejects, schema=schema), buffer)
        payload = buffer.getvalue()
    else:
        payload = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rejects).encode()
    storage.write_bytes_atomic(uri, payload)


# ---------------------------------------------------------------------------------------
# Validating entries


class _BadEntry(Exception):
    def __init__(self, field: str | None, reason: str):
        super().__init__(reason)
        self.field = field
        self.reason = reason


class _EntryReader:
    """Validates entries one by one and keeps the good ones, or raises at the first bad one.

    Cross-entry rules (an image listed twice, a person in two splits) are checked here too;
    on a conflict of person ids for one image both entries are rejected, since neither
    label can be trusted.
    """

    def __init__(self, spec: DatasetFormat, source: str, file_name: str, on_error: str):
        self.spec = spec
        self.source = source
        self.derive_split = file_name in spec.files_without_split
        self.on_error = on_error
        self.rejects: list[dict] = []
        self._rows: dict[int, dict] = {}  # entry index -> row, in file order
        self._by_path: dict[str, int] = {}  # image path -> first entry index
        self._conflicted: set[str] = set()
        self._split_of: dict[int, tuple[str, int]] = {}  # person id -> (split, entry index)

    def rows(self) -> list[dict]:
        return list(self._rows.values())

    def add(self, index: int, entry) -> None:
        try:
            row = self._parse(entry)
            self._check_against_others(index, row)
        except _BadEntry as bad:
            self._reject(index, bad)
            return
        self._rows[index] = row
        self._by_path[row["path"]] = index
        self._split_of.setdefault(row["id"], (row["split"], index))

    def require_images(self, image_root: str, *, decode: bool, use_ray: bool | None, address: str | None) -> None:
        """Entries whose image file is missing (or, with ``decode``, does not decode) are bad."""
        indices = list(self._rows)
        paths = [self._rows[i]["path"] for i in indices]
        missing = missing_files(image_root, paths)
        problems = {i: "missing" for i, path in zip(indices, paths) if path in missing}
        if decode:
            present = [i for i in indices if i not in problems]
            found = undecodable([f"{image_root}/{self._rows[i]['path']}" for i in present], use_ray=use_ray,
                                address=address)
            problems.update({present[k]: reason for k, reason in found.items()})
        if not problems:
            return
        listed = [(i, f"{IMAGE_FOLDER}/{self._rows[i]['path']}", problems[i]) for i in sorted(problems)]
        if self.on_error == "raise":
            raise describe(listed, len(indices), self.source)
        for index, path, reason in listed:
            self._rows.pop(index)
            self.rejects.append({"file": self.source, "entry": index, "field": self.spec.path_field,
                                 "reason": f"image file {path} is {reason}"})
        self.rejects.sort(key=lambda r: r["entry"])

    def _reject(self, index: int, bad: _BadEntry) -> None:
        if self.on_error == "raise":
            raise DataError(bad.reason, file=self.source, entry=index, field=bad.field)
        self.rejects.append({"file": self.source, "entry": index, "field": bad.field or "", "reason": bad.reason})

    def _parse(self, entry) -> dict:
        if not isinstance(entry, dict):
            raise _BadEntry(None, f"expected a JSON object, got a JSON {type(entry).__name__}")
        person_id = _parse_id(_field(entry, "id"))
        path = _parse_path(_field(entry, self.spec.path_field), self.spec.path_field)
        captions = _parse_captions(_field(entry, "captions"))
        if self.derive_split and "split" not in entry:
            split = cuhk_standard_split(person_id)
            if split is None:
                reason = f"id {person_id} is outside 1..13003, so the standard CUHK-PEDES split is unknown"
                raise _BadEntry("id", reason)
        else:
            split = _parse_split(_field(entry, "split"))
        return {"id": person_id, "path": path, "captions": captions, "split": split}

    def _check_against_others(self, index: int, row: dict) -> None:
        path, field = row["path"], self.spec.path_field
        if path in self._conflicted:
            raise _BadEntry(field, f"image {path!r} is listed by several entries with different ids")
        first = self._by_path.get(path)
        if first is not None:
            first_row = self._rows[first]
            if first_row["id"] == row["id"]:
                raise _BadEntry(field, f"image {path!r} is already listed by entry {first}; merge the two entries")
            self._drop_conflicting(first, path, row["id"])
            reason = f"image {path!r} is listed by entry {first} with id {first_row['id']} and here with id {row['id']}"
            raise _BadEntry(field, reason)
        seen = self._split_of.get(row["id"])
        if seen is not None and seen[0] != row["split"]:
            reason = (f"person {row['id']} is in split {seen[0]!r} at entry {seen[1]} and {row['split']!r} here; "
                      "a person belongs to one split")
            raise _BadEntry("split", reason)

    def _drop_conflicting(self, first: int, path: str, other_id: int) -> None:
        """In skip mode the first entry of a conflicting pair goes out too (raise mode stops anyway)."""
        if self.on_error != "skip":
            return
        self._rows.pop(first)
        self._conflicted.add(path)
        del self._by_path[path]
        reason = f"image {path!r} is also listed with id {other_id}; kept neither"
        self._reject(first, _BadEntry(self.spec.path_field, reason))
        self.rejects.sort(key=lambda r: r["entry"])


def _field(entry: dict, name: str):
    if name not in entry:
        raise _BadEntry(name, f"missing field (entry has {sorted(entry)})")
    return entry[name]


def _parse_id(value) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        hint = " (write it without quotes)" if isinstance(value, str) and value.strip().isdigit() else ""
        raise _BadEntry("id", f"id must be a JSON integer, got {type(value).__name__} {value!r}{hint}")
    if not 0 <= value < 2**63:
        raise _BadEntry("id", f"id {value} is out of range (0 .. 2**63-1)")
    return value


_DRIVE = re.compile(r"^[A-Za-z]:")


def _parse_path(value, field: str) -> str:
    """The image path, normalised, guaranteed to stay inside the image folder."""
    if not isinstance(value, str) or not value.strip():
        raise _BadEntry(field, f"image path must be a non-empty string, got {value!r}")
    _check_text(value, field)
    if value.startswith("/") or _DRIVE.match(value) or "://" in value:
        raise _BadEntry(field, f"image path {value!r} is absolute; it must be relative to {IMAGE_FOLDER}/")
    if "\\" in value:
        raise _BadEntry(field, f"image path {value!r} contains a backslash; use '/' between folders")
    if ".." in value.split("/"):
        raise _BadEntry(field, f"image path {value!r} contains '..' and could escape {IMAGE_FOLDER}/")
    path = posixpath.normpath(value)
    if path == "." or value.endswith("/"):
        raise _BadEntry(field, f"image path {value!r} names a folder, not an image")
    return path


def _parse_captions(value) -> list[str]:
    if not isinstance(value, list) or not value:
        raise _BadEntry("captions", f"captions must be a non-empty list of strings, got {value!r:.80}")
    for k, caption in enumerate(value):
        if not isinstance(caption, str) or not caption.strip():
            raise _BadEntry("captions", f"caption {k} must be a non-empty string, got {caption!r:.80}")
        _check_text(caption, "captions")
    return list(value)


def _parse_split(value) -> str:
    if value not in SPLITS:
        raise _BadEntry("split", f"split must be one of {', '.join(SPLITS)}; got {value!r}")
    return value


def _check_text(value: str, field: str) -> None:
    """Reject lone surrogates: JSON escapes like \\ud800 decode to strings UTF-8 cannot hold."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as err:
        raise _BadEntry(field, f"text has a lone surrogate {value[err.start]!r} at character {err.start}") from None
