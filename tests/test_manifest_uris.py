"""Parquet manifests may only point at images in their own folder or an allowed prefix (issue 12 item 16,
issue 19 item 4)."""

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


DATASET = ["/data/cuhk/imgs"]  # the dataset's images, allowed explicitly in the tests below


@pytest.mark.parametrize("uri, problem", [
    ("http://169.254.169.254/latest/meta-data/iam/x.jpg", "link-local"),
    ("https://example.com/imgs/1.jpg", "is outside"),
    ("s3://another-bucket/imgs/1.jpg", "is outside"),
    ("/etc/passwd", "is outside"),
    ("file:///etc/passwd", "is outside"),
    ("/data/cuhk/imgs/../../../etc/passwd", "not a normalised path"),
    ("/data/cuhk/imgs/a\0.jpg", "NUL byte"),
    ("imgs/1.jpg", "relative path"),
    ("/data/cuhk/imgs-other/1.jpg", "is outside"),
])
def test_image_uris_outside_the_dataset_are_refused(tmp_path, uri, problem):
    path = manifest_with(tmp_path, ["/data/cuhk/imgs/ok.jpg", uri])
    with pytest.raises(DataError, match=problem) as error:
        read_manifest(path, allow_uri_prefixes=DATASET)
    message = str(error.value)
    assert path in message and "entry 1" in message and "field 'image_uri'" in message
    assert ("never read" if problem == "link-local" else "--allow-uri-prefix") in message
    with pytest.raises(DataError):
        load_manifest(path, allow_uri_prefixes=DATASET)  # the front door applies the same check


def test_a_manifests_recorded_source_does_not_widen_what_it_may_read(tmp_path):
    """The source a manifest records is its own claim: a manifest from elsewhere naming the
    user's home (or another bucket) as its dataset must not open it."""
    home = manifest_with(tmp_path, ["/home/user/imgs/id_rsa.jpg"], source="/home/user/reid_raw.json")
    with pytest.raises(DataError, match="'/home/user/imgs/id_rsa.jpg' is outside") as error:
        read_manifest(home)
    print(f"\nrecorded source: {error.value}")
    assert "says its images are in /home/user/imgs/" in str(error.value)  # named as a hint only
    bucket = manifest_with(tmp_path, ["s3://victim/cuhk/imgs/1.jpg"], source="s3://victim/cuhk/reid_raw.json",
                           name="b.parquet")
    with pytest.raises(DataError, match="is outside"):
        read_manifest(bucket)
    assert read_manifest(bucket, allow_uri_prefixes=["s3://victim/cuhk/imgs"]).num_rows == 1


def test_images_in_the_manifests_own_folder_are_allowed(tmp_path):
    folder = tmp_path / "CUHK"
    (folder / "imgs").mkdir(parents=True)
    inside = manifest_with(folder, [str(folder / "imgs" / "1.jpg")], source="/somewhere/else/reid_raw.json")
    assert read_manifest(inside).num_rows == 1
    bucket = "memory://data-bucket/cuhk"
    columns = {"image_id": ["1.jpg"], "person_id": [1], "split": ["train"], "image_uri": [f"{bucket}/imgs/a/1.jpg"],
               "captions": [["a."]], "dataset": ["cuhk"]}
    write_manifest(build_manifest(columns, {"dataset": "cuhk"}), f"{bucket}/m.parquet")
    assert read_manifest(f"{bucket}/m.parquet").num_rows == 1
    other = {**columns, "image_uri": ["memory://other-bucket/cuhk/imgs/1.jpg"]}
    write_manifest(build_manifest(other, {"dataset": "cuhk"}), f"{bucket}/o.parquet")
    with pytest.raises(DataError, match="'memory://other-bucket/cuhk/imgs/1.jpg' is outside"):
        read_manifest(f"{bucket}/o.parquet")


def test_a_file_uri_inside_the_allowed_folder_is_accepted(tmp_path):
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "1.jpg").write_bytes(b"jpg")
    path = manifest_with(tmp_path, [f"file://{tmp_path}/imgs/1.jpg"])
    assert read_manifest(path).num_rows == 1
    outside = manifest_with(tmp_path / "imgs", ["file:///etc/passwd"], name="o.parquet")
    with pytest.raises(DataError, match="'file:///etc/passwd' is outside"):
        read_manifest(outside)


@pytest.mark.parametrize("uri", ["http://169.254.169.254/imgs/1.jpg", "http://2852039166/imgs/1.jpg",
                                 "http://[fe80::1]/imgs/1.jpg", "http://metadata.google.internal/imgs/1.jpg",
                                 "https://user@169.254.169.254:80/imgs/1.jpg"])
def test_link_local_addresses_are_refused_even_when_allowed(tmp_path, uri):
    path = manifest_with(tmp_path, [uri])
    with pytest.raises(DataError, match="link-local"):
        read_manifest(path, allow_uri_prefixes=[uri.rsplit("/", 2)[0]])


def test_web_images_need_an_explicit_prefix_whatever_the_manifest_records(tmp_path):
    path = manifest_with(tmp_path, ["https://cdn.example/imgs/1.jpg"], source="https://cdn.example/x.json")
    with pytest.raises(DataError, match="is outside"):
        read_manifest(path)
    assert read_manifest(path, allow_uri_prefixes=["https://cdn.example/"]).num_rows == 1


def test_explicit_prefixes_allow_more(tmp_path, monkeypatch):
    path = manifest_with(tmp_path, ["/data/cuhk/imgs/1.jpg", "s3://mirror/cuhk/2.jpg", "https://cdn.example/3.jpg"])
    with pytest.raises(DataError, match="/data/cuhk/imgs/1.jpg"):
        read_manifest(path)
    assert read_manifest(path, allow_uri_prefixes=["/data/cuhk", "s3://mirror/cuhk", "https://cdn.example/"]
                         ).num_rows == 3
    monkeypatch.setenv(ENV_ALLOW, "/data/cuhk/imgs,s3://mirror/cuhk/,https://cdn.example")
    assert read_manifest(path).num_rows == 3
    # A prefix is a folder: s3://mirror/cu does not allow s3://mirror/cuhk/...
    with pytest.raises(DataError):
        read_manifest(path, allow_uri_prefixes=["/data/cuhk", "s3://mirror/cu", "https://cdn.example/"])


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
    path = str(root / "m.parquet")
    write_manifest(build_manifest(columns, {"dataset": "cuhk", "source": str(root / "reid_raw.json")}), path)
    with pytest.raises(DataError, match="entry 1, field 'image_uri'.*symlink"):
        read_manifest(path)
    assert read_manifest(path, allow_uri_prefixes=[str(tmp_path)]).num_rows == 2
    # A file:// URI is judged by where it leads too.
    as_file = {**columns, "image_uri": [f"file://{u}" for u in columns["image_uri"]]}
    write_manifest(build_manifest(as_file, {"dataset": "cuhk"}), path)
    with pytest.raises(DataError, match="entry 1, field 'image_uri'.*symlink"):
        read_manifest(path)


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
    path = manifest_with(tmp_path, [f"{tmp_path}/imgs/1.jpg", "s3://mirror/2.jpg"])
    refused = CliRunner().invoke(data, ["stats", path])
    assert refused.exit_code != 0 and "s3://mirror/2.jpg" in refused.output and "Traceback" not in refused.output
    allowed = CliRunner().invoke(data, ["stats", path, "--allow-uri-prefix", "s3://mirror"])
    assert allowed.exit_code == 0, allowed.output
