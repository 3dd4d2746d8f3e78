import json
import os

import pytest
from click.testing import CliRunner

from cli.main import cli


def run(args):
    result = CliRunner().invoke(cli, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def test_unknown_method_is_a_clean_error(tmp_path):
    result = CliRunner().invoke(cli, ["train", "--method", "nope", "--data", str(tmp_path), "--out", str(tmp_path)])
    assert result.exit_code != 0
    assert "unknown method 'nope'" in result.output and "Traceback" not in result.output


def test_bad_recipe_override_is_a_clean_error(tmp_path):
    result = CliRunner().invoke(cli, ["train", "--method", "baseline", "--data", str(tmp_path), "--out",
                                      str(tmp_path), "--set", "lrr=1"])
    assert result.exit_code != 0 and "unknown recipe option 'lrr'" in result.output


def test_methods_lists_the_baseline_recipe():
    out = run(["methods"])
    assert "baseline:" in out and "lr=1e-05" in out and "batch_size=64" in out


@pytest.mark.slow
def test_train_embed_eval_from_the_command_line(ray_cluster, tmp_path):
    data = str(tmp_path / "rstp")
    run(["data", "synth", "--style", "rstp", "--ids", "12", "--seed", "1", "--out", data])
    out = run(["train", "--method", "baseline", "--data", data, "--out", str(tmp_path / "runs"), "--name", "cli",
               "--model", "tpr-tiny", "--pretrained", "none", "--batch-size", "8", "--epochs", "1",
               "--max-steps", "2", "--loader-workers", "0", "--set", "warmup_epochs=0"])
    assert "best checkpoint" in out
    run(["embed", "--checkpoint", str(tmp_path / "runs" / "cli"), "--data", data, "--out", str(tmp_path / "emb")])
    out = run(["eval", "--embeddings", str(tmp_path / "emb"), "--out", str(tmp_path / "metrics.json")])
    assert "chance" in out
    metrics = json.load(open(tmp_path / "metrics.json"))
    assert metrics["method"] == "baseline" and metrics["num_gallery"] > 0
    assert os.path.isdir(tmp_path / "emb" / "queries")
