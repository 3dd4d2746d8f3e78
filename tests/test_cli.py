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


# --- one CLI style (issue 14 item 5, issue 15 item 7) ---------------------------------

def _commands(group=cli, path=()):
    for name, command in group.commands.items():
        yield path + (name,), command
        if hasattr(command, "commands"):
            yield from _commands(command, path + (name,))


def _option(command, flag):
    return next((p for p in command.params if flag in getattr(p, "opts", ())), None)


def test_version_and_short_help():
    import tpr_ray

    assert tpr_ray.__version__ in run(["--version"])
    for path, _ in _commands():
        help_text = run([*path, "-h"])
        assert "Usage:" in help_text and "Example:" in help_text, path


def test_shared_options_have_one_default():
    train, crosseval = cli.commands["train"], cli.commands["crosseval"]
    for flag in ("--loader-workers", "--workers", "--cpus-per-worker", "--epochs", "--set", "--address"):
        assert _option(train, flag).default == _option(crosseval, flag).default, flag
    assert _option(cli.commands["eval"], "--block-size").default == _option(crosseval, "--block-size").default


def test_one_name_per_concept():
    for path, command in _commands():
        assert _option(command, "--chunk-size") is None, path
        assert _option(command, "--top-k") is None, path
        k = _option(command, "--k")
        if k is not None:  # cut-offs of R@K, a list, everywhere
            assert k.callback is not None and k.default == "1,5,10", path
    assert _option(cli.commands["search"], "--top") is not None


def test_method_help_lists_the_registry():
    from tpr_ray.methods import METHODS

    help_text = run(["train", "-h"])
    assert all(name in help_text for name in METHODS)


def test_verbose_changes_the_project_log_level(monkeypatch):
    import logging

    monkeypatch.setenv("TPR_RAY_VERBOSE", "0")  # and removed again after the test
    run(["methods"])
    assert logging.getLogger("tpr_ray").getEffectiveLevel() == logging.INFO
    run(["-v", "methods"])
    assert logging.getLogger("tpr_ray").getEffectiveLevel() == logging.DEBUG


def test_errors_inside_ray_tasks_are_unwrapped():
    from cli.options import describe
    from tpr_ray.errors import DataError

    original = DataError("image is not readable", file="s3://b/x.jpg", field="image_uri")

    class RayTaskError(Exception):  # the shape of ray.exceptions.RayTaskError(DataError)
        cause = original

    class RayTaskError_DataError(RayTaskError, DataError):
        pass

    wrapped = RayTaskError_DataError("Traceback (most recent call last):\n  File ...\nDataError: ...")
    wrapped.cause = original

    class WorkerGroupError(Exception):  # Ray Train: one failure per worker
        pass

    train_error = WorkerGroupError("Training failed due to worker errors:\n[Rank 0]\nTraceback ...")
    train_error.worker_failures = {0: wrapped}
    assert describe(train_error) == str(original)
    assert "\n" not in describe(RuntimeError("first\nsecond"))


def test_fake_aws_credentials_only_where_s3_is_used():
    from tests.helpers import S3_ENV

    assert all(os.environ.get(key) != value for key, value in S3_ENV.items())
