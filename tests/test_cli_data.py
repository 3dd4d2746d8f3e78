"""`tpr-ray data synth | prepare | stats` through Click's test runner."""

import json

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
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "data_captions.json").write_text(json.dumps(entries))
    return tmp_path


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
