"""`tpr-ray data synth | prepare | stats` through Click's test runner."""

import json

import pytest
from click.testing import CliRunner

from cli.data import data, format_stats
from tpr_ray.data import read_manifest, split_stats


def run(*args):
    return CliRunner().invoke(data, [str(a) for a in args])


def test_synth_prepare_stats(tmp_path):
    root, manifest = tmp_path / "rstp", tmp_path / "m.parquet"
    result = run("synth", "--style", "rstp", "--ids", 20, "--seed", 1, "--out", root)
    assert result.exit_code == 0, result.output
    assert f"wrote a synthetic rstp dataset to {root}" in result.output
    assert "train" in result.output and "total" in result.output

    result = run("prepare", root, "--out", manifest)
    assert result.exit_code == 0, result.output
    assert read_manifest(str(manifest)).num_rows == 100

    from_folder, from_manifest = run("stats", root), run("stats", manifest)
    assert from_folder.exit_code == 0 and from_folder.output == from_manifest.output
    assert "total" in from_manifest.output and "100" in from_manifest.output


def test_format_stats_aligns_columns():
    stats = {"train": {"ids": 11003, "images": 34054, "captions": 68126},
             "test": {"ids": 1000, "images": 3074, "captions": 6156}}
    lines = format_stats(stats).splitlines()
    assert lines[1].split() == ["train", "11,003", "34,054", "68,126"]
    assert lines[-1].split() == ["total", "12,003", "37,128", "74,282"]
    assert len({len(line) for line in lines}) == 1


def bad_rstp(tmp_path):
    entries = [{"id": 0, "img_path": "0000_c1_0001.jpg", "captions": ["a man."], "split": "train"},
               {"id": "1", "img_path": "0001_c1_0001.jpg", "captions": ["a woman."], "split": "train"}]
    (tmp_path / "imgs").mkdir(parents=True, exist_ok=True)
    (tmp_path / "data_captions.json").write_text(json.dumps(entries))
    for entry in entries:  # the images exist: only the annotations are bad
        jpeg(tmp_path / "imgs" / entry["img_path"])
    return tmp_path


def jpeg(path, size=(32, 64)):
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (200, 30, 30)).save(path, format="JPEG")
    return path


def test_bad_data_is_a_clean_error(tmp_path):
    result = run("prepare", bad_rstp(tmp_path), "--out", tmp_path / "m.parquet")
    assert result.exit_code == 1
    assert "Error: file" in result.output and "entry 1, field 'id'" in result.output
    assert isinstance(result.exception, SystemExit)  # a ClickException, not a crash


def test_skip_bad_writes_rejects_next_to_manifest(tmp_path):
    root = bad_rstp(tmp_path / "data")
    result = run("prepare", root, "--out", tmp_path / "m.parquet", "--skip-bad")
    assert result.exit_code == 0, result.output
    assert "rejected 1 entries" in result.output
    assert json.loads((tmp_path / "m.rejects.jsonl").read_text())["field"] == "id"
    assert split_stats(read_manifest(str(tmp_path / "m.parquet")))["train"]["images"] == 1

    result = run("stats", root, "--skip-bad")
    assert result.exit_code == 0 and "skipped 1 bad entries" in result.output


def test_usage_errors(tmp_path):
    result = run("prepare", tmp_path, "--out", tmp_path / "m.parquet", "--rejects", tmp_path / "r.jsonl")
    assert result.exit_code == 2 and "--skip-bad" in result.output
    result = run("synth", "--style", "cuhk", "--ids", 3, "--out", tmp_path / "x")
    assert result.exit_code == 1 and "at least 6 identities" in result.output
    result = run("stats", tmp_path / "missing")
    assert result.exit_code == 1 and "not found" in result.output


def rstp_folder(tmp_path, names):
    entries = [{"id": k, "img_path": name, "captions": [f"person {k}."], "split": "train"}
               for k, name in enumerate(names)]
    (tmp_path / "imgs").mkdir(parents=True, exist_ok=True)
    (tmp_path / "data_captions.json").write_text(json.dumps(entries))
    return tmp_path


def test_prepare_refuses_entries_whose_image_file_is_missing(tmp_path):
    root = rstp_folder(tmp_path / "data", ["a.jpg", "b.jpg", "sub/c.jpg"])
    jpeg(root / "imgs" / "a.jpg")
    result = run("prepare", root, "--out", tmp_path / "m.parquet")
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "2 of 3 image files are missing or unreadable: entry 1 imgs/b.jpg: missing; " \
           "entry 2 imgs/sub/c.jpg: missing" in result.output
    assert not (tmp_path / "m.parquet").exists()

    result = run("prepare", root, "--out", tmp_path / "m.parquet", "--skip-bad")
    assert result.exit_code == 0, result.output
    assert "rejected 2 entries" in result.output
    rejects = [json.loads(line) for line in (tmp_path / "m.rejects.jsonl").read_text().splitlines()]
    assert [(r["entry"], r["field"], r["reason"]) for r in rejects] == [
        (1, "img_path", "image file imgs/b.jpg is missing"), (2, "img_path", "image file imgs/sub/c.jpg is missing")]
    assert read_manifest(str(tmp_path / "m.parquet")).column("image_id").to_pylist() == ["a.jpg"]


def broken_images(root):
    """A good JPEG plus four kinds of bad file."""
    imgs = root / "imgs"
    jpeg(imgs / "good.jpg")
    (imgs / "empty.jpg").write_bytes(b"")
    (imgs / "text.jpg").write_text("not an image")
    whole = jpeg(imgs / "whole.jpg", size=(256, 512)).read_bytes()
    (imgs / "truncated.jpg").write_bytes(whole[: len(whole) // 3])
    return ["good.jpg", "empty.jpg", "text.jpg", "truncated.jpg", "missing.jpg"]


def test_check_images_lists_every_unreadable_file(tmp_path):
    root = rstp_folder(tmp_path / "data", [])
    names = broken_images(root)
    rstp_folder(root, names)
    plain = run("prepare", root, "--out", tmp_path / "m.parquet")
    assert plain.exit_code == 1 and "1 of 5 image files" in plain.output  # existence only without the flag

    checked = run("prepare", root, "--out", tmp_path / "m.parquet", "--check-images")
    assert checked.exit_code == 1
    for entry, name in enumerate(names[1:], 1):
        assert f"entry {entry} imgs/{name}: " in checked.output
    assert "4 of 5 image files are missing or unreadable" in checked.output
    assert "entry 4 imgs/missing.jpg: missing" in checked.output and "imgs/good.jpg" not in checked.output

    skipped = run("prepare", root, "--out", tmp_path / "m.parquet", "--check-images", "--skip-bad")
    assert skipped.exit_code == 0, skipped.output
    assert read_manifest(str(tmp_path / "m.parquet")).column("image_id").to_pylist() == ["good.jpg"]
    reasons = [json.loads(line)["reason"] for line in (tmp_path / "m.rejects.jsonl").read_text().splitlines()]
    assert [r.split(":")[0] for r in reasons] == [
        "image file imgs/empty.jpg is unreadable", "image file imgs/text.jpg is unreadable",
        "image file imgs/truncated.jpg is unreadable", "image file imgs/missing.jpg is missing"]


def test_a_fetch_failure_is_retried_and_never_recorded_as_bad(tmp_path, monkeypatch):
    from tpr_ray.io import storage
    from tpr_ray.data import check

    good = str(jpeg(tmp_path / "good.jpg"))
    monkeypatch.setattr(check.time, "sleep", lambda s: None)
    real_read, failures = storage.read_bytes, {"left": 2}

    def flaky(uri):
        if failures["left"] > 0:
            failures["left"] -= 1
            raise PermissionError("403 Forbidden: the token expired")
        return real_read(uri)

    monkeypatch.setattr(storage, "read_bytes", flaky)
    assert check.undecodable([good], use_ray=False) == {}  # two failures, then it reads

    failures["left"] = 10
    with pytest.raises(OSError, match=r"could not read .*good.jpg after 3 attempts \(PermissionError"):
        check.undecodable([good], use_ray=False)


@pytest.mark.slow
def test_check_images_on_ray_tasks(ray_cluster, tmp_path):
    from tpr_ray.data import check

    root = tmp_path / "data"
    names = broken_images(root)
    uris = [str(root / "imgs" / name) for name in names]
    on_ray = check.undecodable(uris, use_ray=True)
    assert on_ray == check.undecodable(uris, use_ray=False)
    assert sorted(on_ray) == [1, 2, 3, 4] and on_ray[4] == "missing"
