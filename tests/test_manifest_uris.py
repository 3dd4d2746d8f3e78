"""Parquet manifests may only point at their dataset's images (issue 12 item 16)."""

import json
import os

import pytest
from click.testing import CliRunner

from cli.data import data
from tpr_ray.data.loading import load_manifest
from tpr_ray.data.manifest import build_manifest, read_manifest, write_manifest
from tpr_ray.data.uris import ENV_ALLOW
from tpr_ray.errors import DataError


def manifest_with(tmp_path, uris, source="/data/cuhk/reid_raw.json", name="m.parquet"):
    """A manifest file listing ``uris`` (one person, train split) whose recorded source is ``source``."""
    columns = {"image_id": [f"{k}.jpg" for k in range(len(uris))], "person_id": [1] * len(uris),
               "split": ["train"] * len(uris), "image_uri": list(uris), "captions": [["a caption."]] * len(uris),
               "dataset": ["cuhk"] * len(uris)}
    info = {"dataset": "cuhk", "version": "0" * 16} | ({"source": source} if source else {})
    path = str(tmp_path / name)
    write_manifest(build_manifest(columns, info), path)
    return path


@pytest.mark.parametrize("uri, problem", [
    ("http://169.254.169.254/latest/meta-data/iam/x.jpg", "is outside"),
    ("https://example.com/imgs/1.jpg", "is outside"),
    ("s3://another-bucket/imgs/1.jpg", "is outside"),
    ("/etc/passwd", "is outside"),
    ("/data/cuhk/imgs/../../../etc/passwd", "not a normalised path"),
    ("/data/cuhk/imgs/a\0.jpg", "NUL byte"),
    ("imgs/1.jpg", "relative path"),
    ("/data/cuhk/imgs-other/1.jpg", "is outside"),
])
def test_image_uris_outside_the_dataset_are_refused(tmp_path, uri, problem):
    path = manifest_with(tmp_path, ["/data/cuhk/imgs/ok.jpg", uri])
    with pytest.raises(DataError, match=problem) as error:
        read_manifest(path)
    message = str(error.value)
    assert path in message and "entry 1" in message and "field 'image_uri'" in message
    assert "--allow-uri-prefix" in message
    with pytest.raises(DataError):
        load_manifest(path)  # the front door applies the same check


def test_the_recorded_dataset_bucket_is_allowed_and_others_are_not(tmp_path):
    source = "s3://data-bucket/cuhk/reid_raw.json"
    ok = manifest_with(tmp_path, ["s3://data-bucket/cuhk/imgs/a/1.jpg"], source=source)
    assert read_manifest(ok).num_rows == 1
    other = manifest_with(tmp_path, ["s3://other-bucket/cuhk/imgs/1.jpg"], source=source, name="o.parquet")
    with pytest.raises(DataError, match="'s3://other-bucket/cuhk/imgs/1.jpg' is outside"):
        read_manifest(other)
    # The recorded folder is <root>/imgs/: the rest of the bucket stays out.
    with pytest.raises(DataError, match="is outside"):
        read_manifest(manifest_with(tmp_path, ["s3://data-bucket/secrets/1.jpg"], source=source, name="s.parquet"))


def test_a_web_source_never_allows_web_images(tmp_path):
    path = manifest_with(tmp_path, ["http://169.254.169.254/imgs/1.jpg"], source="http://169.254.169.254/x.json")
    with pytest.raises(DataError, match="records no dataset folder"):
        read_manifest(path)


def test_explicit_prefixes_allow_more(tmp_path, monkeypatch):
    path = manifest_with(tmp_path, ["/data/cuhk/imgs/1.jpg", "s3://mirror/cuhk/2.jpg", "https://cdn.example/3.jpg"])
    with pytest.raises(DataError, match="s3://mirror"):
        read_manifest(path)
    assert read_manifest(path, allow_uri_prefixes=["s3://mirror/cuhk", "https://cdn.example/"]).num_rows == 3
    monkeypatch.setenv(ENV_ALLOW, "s3://mirror/cuhk/,https://cdn.example")
    assert read_manifest(path).num_rows == 3
    # A prefix is a folder: s3://mirror/cu does not allow s3://mirror/cuhk/...
    with pytest.raises(DataError):
        read_manifest(path, allow_uri_prefixes=["s3://mirror/cu", "https://cdn.example/"])


def test_manifest_without_a_recorded_dataset_needs_a_prefix(tmp_path):
    path = manifest_with(tmp_path, ["/data/x/imgs/1.jpg"], source=None)
    with pytest.raises(DataError, match="records no dataset folder"):
        read_manifest(path)
    assert read_manifest(path, allow_uri_prefixes=["/data/x"]).num_rows == 1


def dataset_folder(tmp_path, files):
    root = tmp_path / "CUHK"
    (root / "imgs").mkdir(parents=True)
    entries = [{"split": "train", "captions": ["a caption."], "file_path": f, "id": 1} for f in files]
    (root / "reid_raw.json").write_text(json.dumps(entries))
    return root


def test_symlinks_out_of_the_image_folder_are_refused(tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("private")
    root = dataset_folder(tmp_path, ["good.jpg", "evil.jpg"])
    (root / "imgs" / "good.jpg").write_bytes(b"jpg")
    os.symlink(secret, root / "imgs" / "evil.jpg")
    with pytest.raises(DataError, match="evil.jpg' leads through a symlink to .*secret.txt"):
        load_manifest(str(root))  # the JSON reader
    # The same folder's manifest, written by an older version without the check, is refused on read.
    columns = {"image_id": ["good.jpg", "evil.jpg"], "person_id": [1, 1], "split": ["train", "train"],
               "image_uri": [str(root / "imgs" / "good.jpg"), str(root / "imgs" / "evil.jpg")],
               "captions": [["a."], ["b."]], "dataset": ["cuhk", "cuhk"]}
    path = str(tmp_path / "m.parquet")
    write_manifest(build_manifest(columns, {"dataset": "cuhk", "source": str(root / "reid_raw.json")}), path)
    with pytest.raises(DataError, match="entry 1, field 'image_uri'.*symlink"):
        read_manifest(path)
    assert read_manifest(path, allow_uri_prefixes=[str(tmp_path)]).num_rows == 2


def test_a_symlinked_image_folder_and_links_inside_it_are_fine(tmp_path):
    storage_dir = tmp_path / "big-disk" / "cuhk-imgs"
    (storage_dir / "p1").mkdir(parents=True)
    (storage_dir / "p1" / "1.jpg").write_bytes(b"jpg")
    os.symlink(storage_dir / "p1" / "1.jpg", storage_dir / "p1" / "2.jpg")
    root = tmp_path / "CUHK"
    root.mkdir()
    os.symlink(storage_dir, root / "imgs")
    entries = [{"split": "train", "captions": ["a."], "file_path": f"p1/{k}.jpg", "id": 1} for k in (1, 2)]
    (root / "reid_raw.json").write_text(json.dumps(entries))
    table = load_manifest(str(root))
    path = str(tmp_path / "m.parquet")
    write_manifest(table, path)
    assert read_manifest(path).num_rows == 2


def test_data_stats_takes_allow_uri_prefix(tmp_path):
    path = manifest_with(tmp_path, ["/data/cuhk/imgs/1.jpg", "s3://mirror/2.jpg"])
    refused = CliRunner().invoke(data, ["stats", path])
    assert refused.exit_code != 0 and "s3://mirror/2.jpg" in refused.output and "Traceback" not in refused.output
    allowed = CliRunner().invoke(data, ["stats", path, "--allow-uri-prefix", "s3://mirror"])
    assert allowed.exit_code == 0, allowed.output
