"""Every user mistake ends in one line on stderr, before Ray starts, without a traceback."""

import json
import os
import subprocess
import sys

import pytest
from click.testing import CliRunner

from cli.main import cli


@pytest.fixture(autouse=True)
def ray_starts(monkeypatch):
    """Records whether a command got as far as starting (or joining) Ray."""
    from tpr_ray.io import cluster as ray_utils
    calls = []
    monkeypatch.setattr(ray_utils, "init_ray", lambda *a, **k: calls.append(a) or (_ for _ in ()).throw(
        AssertionError("the mistake was found only after Ray started")))
    return calls


def fails_in_one_line(args, expect):
    result = CliRunner().invoke(cli, args)
    lines = result.stderr.strip().splitlines()
    assert result.exit_code != 0, result.output
    assert len(lines) <= 3 and "Traceback" not in result.output, result.output
    assert "Ray started" not in result.output
    for fragment in expect:
        assert fragment in result.stderr, result.stderr
    return result.stderr


@pytest.fixture
def dataset(tmp_path):
    path = tmp_path / "CUHK-PEDES"
    path.mkdir()
    return str(path)


def train_args(dataset, tmp_path, *extra):
    return ["train", "--method", "baseline", "--data", dataset, "--out", str(tmp_path / "runs"), *extra]


def test_missing_data_path(tmp_path):
    fails_in_one_line(train_args(str(tmp_path / "nope"), tmp_path), ["--data", "nope", "does not exist"])


def test_tiny_model_with_default_pretrained_weights(dataset, tmp_path):
    err = fails_in_one_line(train_args(dataset, tmp_path, "--model", "tpr-tiny"),
                            ["tpr-tiny", "--pretrained none"])
    assert "openai" not in err.split("--pretrained none")[1]  # no advice to fetch a file that does not exist


def test_unknown_pretrained_tag_lists_the_real_ones(dataset, tmp_path):
    fails_in_one_line(train_args(dataset, tmp_path, "--model", "RN50", "--pretrained", "nonsense"),
                      ["'nonsense'", "openai"])


def test_init_from_another_method(dataset, tmp_path):
    ckpt = tmp_path / "cskt-run" / "checkpoint_000001"
    ckpt.mkdir(parents=True)
    (ckpt / "config.json").write_text(json.dumps({"method": "cskt"}))
    fails_in_one_line(train_args(dataset, tmp_path, "--model", "tpr-tiny", "--pretrained", "none",
                                 "--init", str(ckpt)), ["cskt checkpoint", "--method is baseline"])


@pytest.mark.parametrize("flag", ["--epochs", "--batch-size"])
def test_non_positive_counts(dataset, tmp_path, flag):
    fails_in_one_line(train_args(dataset, tmp_path, flag, "0"), [flag, "x>=1"])


def test_embed_without_actors(dataset, tmp_path):
    fails_in_one_line(["embed", "--checkpoint", dataset, "--data", dataset, "--out", str(tmp_path / "e"),
                       "--actors", "0"], ["--actors"])


def test_search_for_no_results(tmp_path):
    fails_in_one_line(["search", "a man", "--index", str(tmp_path), "--top", "0"], ["--top"])


def test_unknown_option_is_one_line(tmp_path):
    fails_in_one_line(["search", "a man", "--index", str(tmp_path), "--k", "3"], ["--k"])


def test_object_storage_without_credentials(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "none"), AWS_CONFIG_FILE=str(tmp_path / "none"),
               AWS_EC2_METADATA_DISABLED="true", PYTHONPATH=os.getcwd())
    proc = subprocess.run([sys.executable, "-m", "cli.main", "train", "--method", "baseline", "--data",
                           "s3://tpr-no-such-bucket/CUHK-PEDES", "--out", str(tmp_path / "runs")],
                          env=env, capture_output=True, text=True, timeout=120)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode != 0 and len(lines) <= 3 and "Traceback" not in proc.stderr, proc.stderr
    assert "credentials" in proc.stderr and "AWS_ENDPOINT_URL" in proc.stderr, proc.stderr


@pytest.mark.slow
def test_error_inside_a_ray_task_is_the_projects_message(ray_cluster):
    import ray

    from cli.options import describe
    from tpr_ray.errors import DataError

    @ray.remote
    def read_shard():
        raise DataError("not a Parquet file", file="s3://b/emb/part-00003.parquet")

    with pytest.raises(Exception) as caught:
        ray.get(read_shard.remote())
    assert describe(caught.value) == "file s3://b/emb/part-00003.parquet: not a Parquet file"


# --- issue 19 item 4: checkpoints are checked before Ray starts -------------------------------

BROKEN = {"config not JSON": "config.json: not valid JSON", "unknown method": "unknown method 'nope'",
          "embed_dim wrong": "field 'embed_dim' is 512", "weights truncated": "model.pt: does not load",
          "weights of another shape": "model.pt: weight 'clip.text_projection' has shape (64, 32)"}


@pytest.mark.parametrize("how", BROKEN)
def test_embed_with_a_broken_checkpoint(dataset, tmp_path, how):
    from tests.test_checkpoint import _corrupt

    _corrupt(tmp_path / "ckpt", how)
    err = fails_in_one_line(["embed", "--checkpoint", str(tmp_path / "ckpt"), "--data", dataset, "--out",
                             str(tmp_path / "e")], ["checkpoint file", BROKEN[how]])
    print(f"\nembed, {how}: {err.strip()}")


def test_train_init_and_search_with_a_broken_checkpoint(dataset, tmp_path):
    import numpy as np

    from tests.test_checkpoint import _corrupt
    from tests.test_tables import write_table
    from tpr_ray.index.faiss_index import build_index

    _corrupt(tmp_path / "ckpt", "weights of another shape")
    err = fails_in_one_line(train_args(dataset, tmp_path, "--model", "tpr-tiny", "--pretrained", "none",
                                       "--init", str(tmp_path / "ckpt")), ["model.pt: weight 'clip.text_projection'"])
    print(f"\ntrain --init: {err.strip()}")
    vectors = np.eye(4, dtype=np.float32)
    gallery = write_table(tmp_path / "emb" / "gallery", "gallery", np.arange(4), vectors, [0, 4])
    build_index(gallery, str(tmp_path / "index"))
    err = fails_in_one_line(["search", "a man", "--index", str(tmp_path / "index"), "--checkpoint",
                             str(tmp_path / "ckpt"), "--allow-other-checkpoint"],
                            ["model.pt: weight 'clip.text_projection'"])
    print(f"\nsearch: {err.strip()}")


@pytest.fixture
def empty_weights_cache(tmp_path, monkeypatch):
    """No pretrained weights cached on this machine (the hub cache and open_clip's URL cache)."""
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    return tmp_path / "hf-cache"


def test_pretrained_tag_offline_and_not_cached(dataset, tmp_path, empty_weights_cache, monkeypatch):
    from tpr_ray.methods import weights_cache
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(weights_cache, "reachable", lambda *a, **k: pytest.fail("probed the network while offline"))
    err = fails_in_one_line(train_args(dataset, tmp_path, "--model", "ViT-B-16", "--pretrained", "openai"),
                            ["--pretrained openai", str(empty_weights_cache), "HF_HUB_OFFLINE=1",
                             "--pretrained /path/to", "with network"])
    assert err.splitlines()[0].startswith("Error: --pretrained openai")


def test_pretrained_tag_without_network(dataset, tmp_path, empty_weights_cache, monkeypatch):
    from tpr_ray.methods import weights_cache
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    probes = []
    monkeypatch.setattr(weights_cache, "reachable", lambda url, *a, **k: probes.append(url) or False)
    fails_in_one_line(train_args(dataset, tmp_path, "--model", "RN50", "--pretrained", "openai"),
                      ["--pretrained openai", "RN50", "cannot be reached", str(empty_weights_cache)])
    assert probes == ["https://huggingface.co/timm/resnet50_clip.openai"]


def test_cached_pretrained_weights_need_no_network(empty_weights_cache, monkeypatch):
    from tpr_ray.methods import weights_cache
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    snapshot = empty_weights_cache / "models--timm--resnet50_clip.openai" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (snapshot / "open_clip_model.safetensors").write_bytes(b"weights")
    (empty_weights_cache / "models--timm--resnet50_clip.openai" / "refs").mkdir()
    (empty_weights_cache / "models--timm--resnet50_clip.openai" / "refs" / "main").write_text("abc123")
    weights_cache.check_weights_obtainable("RN50", "openai")  # no error, no probe


def test_the_reachability_probe_gives_up_quickly():
    import socket
    import time

    from tpr_ray.methods import weights_cache
    with socket.socket() as silent:  # accepts the connection, never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        start = time.monotonic()
        assert not weights_cache.reachable(f"http://127.0.0.1:{silent.getsockname()[1]}/x", timeout=0.5)
        assert time.monotonic() - start < 3


@pytest.mark.parametrize("mistake", ["--decoded-stream", "a used run name"])
def test_the_error_is_the_first_line(dataset, tmp_path, mistake):
    """A random-init run prints a recipe note; a mistake found before work comes before it."""
    extra = [mistake] if mistake.startswith("--") else []
    if mistake == "a used run name":
        checkpoint = tmp_path / "runs" / "baseline-CUHK-PEDES" / "checkpoint_000000"
        checkpoint.mkdir(parents=True)
        (checkpoint / "config.json").write_text("{}")
    args = train_args(dataset, tmp_path, "--model", "tpr-tiny", "--pretrained", "none", *extra)
    result = subprocess.run([sys.executable, "-m", "cli.main", *args], capture_output=True, text=True, timeout=120,
                            cwd=os.path.dirname(os.path.dirname(__file__)))
    assert result.returncode != 0
    assert result.stderr.splitlines()[0].startswith("Error: "), result.stderr
    assert "random-init backbone" not in result.stderr


def interrupted(monkeypatch, module: str, function: str):
    import importlib

    def ctrl_c(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(importlib.import_module(module), function, ctrl_c)


@pytest.mark.parametrize("command, module, function, hint", [
    (["train", "--method", "baseline", "--model", "tpr-tiny", "--pretrained", "none"], "tpr_ray.training.driver",
     "train", "interrupted; rerun the same command with --resume"),
    (["embed", "--checkpoint", "{dataset}", "--data", "{dataset}"], "tpr_ray.embedding.pipeline", "embed",
     "interrupted; rerun the same command to continue"),
    (["index", "build", "--embeddings", "{dataset}"], "tpr_ray.index.faiss_index", "build_index",
     "interrupted; rerun the same command to continue"),
])
def test_ctrl_c_is_one_line_and_exit_130(dataset, tmp_path, monkeypatch, command, module, function, hint):
    interrupted(monkeypatch, module, function)
    if command[0] == "train":
        command = [*command, "--data", dataset]
    args = [part.format(dataset=dataset) for part in command] + ["--out", str(tmp_path / "out")]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 130, result.output
    assert result.stderr.strip() == hint, result.stderr
    assert "Traceback" not in result.output


def test_ctrl_c_in_a_ray_job_entry_point(dataset, tmp_path, monkeypatch, capsys):
    from cli.main import embed
    from cli.options import run_command
    interrupted(monkeypatch, "tpr_ray.embedding.pipeline", "embed")
    monkeypatch.setattr(sys, "argv", ["embed", "--checkpoint", dataset, "--data", dataset, "--out", str(tmp_path)])
    with pytest.raises(SystemExit) as stop:
        run_command(embed, "python -m jobs.embed")
    assert stop.value.code == 130
    assert capsys.readouterr().err.strip() == "interrupted; rerun the same command to continue"
