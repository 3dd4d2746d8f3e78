import dataclasses
import glob
import json
import os
import re

import pytest
from click.testing import CliRunner

from cli.crosseval import crosseval as crosseval_command
from tpr_ray.crosseval import CrossEvalConfig, backbone_choice, cells, config_key, crosseval
from tpr_ray.crosseval.scheduler import Job, Runner
from tpr_ray.data import registry as data_registry
from tpr_ray.data.registry import Dataset, load_registry, resolve_dataset
from tpr_ray.errors import ConfigError, DataError

# --------------------------------------------------------------------------- datasets


def test_registry_maps_names_to_roots_and_synthetic_styles(tmp_path):
    registry = tmp_path / "datasets.json"
    registry.write_text(json.dumps({"datasets": {
        "cuhk": {"root": "CUHK-PEDES"}, "rstp": "s3://bucket/RSTPReid",
        "small icfg": {"synthetic": "icfg", "ids": 60, "seed": 3}}}))
    found = load_registry(str(registry))
    assert found["cuhk"].root == str(tmp_path / "CUHK-PEDES")  # relative to the registry file
    assert found["rstp"].root == "s3://bucket/RSTPReid"
    assert (found["small icfg"].name, found["small icfg"].synthetic, found["small icfg"].ids) == ("small_icfg", "icfg", 60)

    assert resolve_dataset("cuhk", found).root == str(tmp_path / "CUHK-PEDES")
    builtin = resolve_dataset("icfg", {}, synthetic_ids=50, seed=2)
    assert (builtin.synthetic, builtin.ids, builtin.seed, builtin.root) == ("icfg", 50, 2, None)
    by_path = resolve_dataset(str(tmp_path / "My-Data"), {})
    assert (by_path.name, by_path.root) == ("My-Data", str(tmp_path / "My-Data"))
    with pytest.raises(ConfigError, match="unknown dataset 'cuhkk'"):
        resolve_dataset("cuhkk", found)


@pytest.mark.parametrize("entry, message", [
    ({"root": "a", "synthetic": "cuhk"}, "exactly one of"),
    ({"synthetic": "market"}, "unknown synthetic style"),
    ({"root": "a", "split": "test"}, "unknown keys"),
])
def test_bad_registry_entries_name_the_entry(tmp_path, entry, message):
    registry = tmp_path / "datasets.json"
    registry.write_text(json.dumps({"datasets": {"mine": entry}}))
    with pytest.raises(DataError, match=message) as error:
        load_registry(str(registry))
    assert "mine" in str(error.value) and str(registry) in str(error.value)


def test_missing_registry_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="registry .* not found"):
        load_registry(str(tmp_path / "nope.json"))


def test_config_key_ignores_key_order():
    assert config_key({"a": 1, "b": [1, 2]}) == config_key({"b": [1, 2], "a": 1})
    assert config_key({"a": 1}) != config_key({"a": 2})


def test_synthetic_data_gets_the_tiny_model_and_real_data_vit():
    synthetic = [resolve_dataset("cuhk", {})]
    model, pretrained, base = backbone_choice(CrossEvalConfig(out="x"), synthetic)
    assert (model, pretrained, base["lr"]) == ("tpr-tiny", None, 1e-3)
    real = [Dataset("cuhk", root="/data/CUHK-PEDES")]
    assert backbone_choice(CrossEvalConfig(out="x"), real) == ("ViT-B-16", "openai", {})


# --------------------------------------------------------------------------- orchestration, jobs faked


class FakeJobs:
    """Stand-ins for train / embed / eval that record their calls and write what the real
    ones leave behind (best.json, embedding sidecars)."""

    def __init__(self, fail_train=(), fail_eval=()):
        self.calls = []
        self.fail_train, self.fail_eval = fail_train, fail_eval

    def train(self, config, address):
        self.calls.append(("train", config.name))
        if any(config.name.startswith(f"baseline-{name}-") for name in self.fail_train):
            raise RuntimeError(f"CUDA out of memory while training {config.name}")
        run_dir = os.path.join(config.out, config.name)
        os.makedirs(run_dir, exist_ok=True)
        with open(os.path.join(run_dir, "best.json"), "w") as f:
            json.dump({"checkpoint": run_dir + "/ckpt"}, f)
        return fake_identity(run_dir) | {"seconds": 1.0, "reused": False}

    def embed(self, config, address):
        self.calls.append(("embed", config.out))
        for kind in ("gallery", "queries"):
            os.makedirs(os.path.join(config.out, kind), exist_ok=True)
            with open(os.path.join(config.out, kind, "_tpr_ray.json"), "w") as f:
                json.dump({"complete": True, "checkpoint": config.checkpoint}, f)
        return {"dir": config.out, "seconds": 2.0, "reused": False}

    def eval(self, config, address):
        self.calls.append(("eval", config.embed_dir))
        if any(f"/{name}-" in config.embed_dir for name in self.fail_eval):
            raise DataError("person id 3 has no image in the gallery")
        r1 = float(len(config.embed_dir) % 50)
        return {"metrics": {"R1": r1, "R5": r1 + 1, "R10": r1 + 2, "mAP": r1 / 2, "mINP": r1 / 4, "num_queries": 8,
                            "num_gallery": 4}, "chance": {"R1": 25.0}, "samples": [], "seconds": 0.5}


def fake_identity(run_dir):
    return {"run_dir": run_dir, "uri": run_dir + "/ckpt", "sha256": "0" * 64}


@pytest.fixture()
def fake(monkeypatch, tmp_path):
    jobs = FakeJobs(fail_train=("icfg",), fail_eval=("rstp",))
    monkeypatch.setattr(cells, "JOBS", {"train": jobs.train, "embed": jobs.embed, "eval": jobs.eval})
    monkeypatch.setattr(cells, "checkpoint_identity", fake_identity)
    monkeypatch.setattr(data_registry, "dataset_version", lambda d: {**d.describe(), "version": "v-" + d.name})
    registry = tmp_path / "datasets.json"
    registry.write_text(json.dumps({"datasets": {name: {"root": f"/data/{name}"} for name in ("cuhk", "icfg", "rstp")}}))
    return jobs, str(registry)


def matrix_config(tmp_path, registry, **changes):
    return CrossEvalConfig(**{"out": str(tmp_path / "out"), "methods": ["baseline", "nope"], "train": ["cuhk", "icfg"],
                              "test": ["cuhk", "rstp"], "registry": registry, "use_ray": False, **changes})


def cell_status(result):
    return {(c["method"], c["train"], c["test"]): (c["status"], (c.get("error") or {}).get("stage"))
            for c in result.cells}


def test_failures_stay_in_their_cells(fake, tmp_path):
    jobs, registry = fake
    result = crosseval(matrix_config(tmp_path, registry))

    assert cell_status(result) == {
        ("baseline", "cuhk", "cuhk"): ("ok", None), ("baseline", "cuhk", "rstp"): ("failed", "eval"),
        ("baseline", "icfg", "cuhk"): ("failed", "train"), ("baseline", "icfg", "rstp"): ("failed", "train"),
        **{("nope", t, s): ("failed", "plan") for t in ("cuhk", "icfg") for s in ("cuhk", "rstp")}}
    failed = {(c["method"], c["train"], c["test"]): c["error"] for c in result.cells if c["status"] == "failed"}
    assert "unknown method 'nope'" in failed[("nope", "cuhk", "cuhk")]["message"]
    assert failed[("baseline", "icfg", "cuhk")]["message"].startswith("CUDA out of memory while training baseline-icfg-")
    assert failed[("baseline", "icfg", "cuhk")]["type"] == "RuntimeError"
    assert failed[("baseline", "cuhk", "rstp")]["type"] == "DataError"
    assert "Traceback" in failed[("baseline", "cuhk", "rstp")]["traceback"]
    assert result.counts == {"ok": 1, "failed": 7, "skipped": 0, "trained": 1, "reused_checkpoints": 0, "embedded": 2}
    # Every cell has its JSON, named by method, datasets and config hash; the report covers all.
    files = sorted(os.listdir(tmp_path / "out" / "cells"))
    assert len(files) == 8 and all(re.fullmatch(r"(baseline|nope)__\w+__\w+-[0-9a-f]{12}\.json", f) for f in files)
    for name in ("matrix.csv", "matrix.md", "heatmap-baseline.png", "heatmap-nope.png", "index.html"):
        assert os.path.getsize(tmp_path / "out" / "report" / name) > 0


def test_rerun_skips_finished_cells_and_reuses_checkpoints_and_embeddings(fake, tmp_path):
    jobs, registry = fake
    cfg = matrix_config(tmp_path, registry, methods=["baseline"], train=["cuhk"], test=["cuhk", "icfg"])
    first = crosseval(cfg)
    assert first.counts["ok"] == 2 and [c[0] for c in jobs.calls] == ["train", "embed", "embed", "eval", "eval"]

    jobs.calls.clear()
    again = crosseval(cfg)
    assert jobs.calls == [] and again.counts["skipped"] == 2
    assert [c["time"] for c in again.cells] == [c["time"] for c in first.cells]  # records untouched

    # A lost cell result: the checkpoint and the embeddings are reused, only evaluation runs.
    os.remove(glob.glob(str(tmp_path / "out" / "cells" / "baseline__cuhk__icfg-*.json"))[0])
    third = crosseval(cfg)
    assert [c[0] for c in jobs.calls] == ["eval"]
    assert third.counts == {"ok": 1, "failed": 0, "skipped": 1, "trained": 0, "reused_checkpoints": 1, "embedded": 0}
    assert third.cells[1]["checkpoint"]["reused"] and third.cells[1]["embeddings"]["reused"]

    # A new recipe is a new configuration: new keys, a new training.
    jobs.calls.clear()
    crosseval(dataclasses.replace(cfg, overrides={"epochs": 3}))
    assert [c[0] for c in jobs.calls] == ["train", "embed", "embed", "eval", "eval"]


def test_jobs_larger_than_the_cluster_fail_their_cells(fake, tmp_path):
    jobs, registry = fake
    runner = Runner(cells.run_job, False, cpus=2, gpus=0, max_parallel=None)
    answers = []
    runner.submit(Job("train", None, cpus=4, gpus=0, done=answers.append))
    assert not answers[0]["ok"] and "needs 4 CPU" in answers[0]["error"]["message"]


def test_runner_admits_jobs_by_declared_cpus():
    runner = Runner(cells.run_job, False, cpus=2, gpus=0, max_parallel=None)
    for cpus in (1, 1, 1):
        runner.queue.append(Job("eval", None, cpus=cpus, gpus=0, done=lambda a: None))
    runner._admit()
    assert len(runner.in_flight) == 2 and len(runner.queue) == 1


def test_jobs_receive_their_config_objects_and_declare_what_those_ask_for(fake, tmp_path, monkeypatch):
    from tpr_ray.embedding.pipeline import EmbedConfig
    from tpr_ray.training.config import TrainConfig

    jobs, registry = fake
    submitted = []
    submit = Runner.submit
    monkeypatch.setattr(Runner, "submit", lambda self, job: (submitted.append(job), submit(self, job))[1])
    result = crosseval(matrix_config(tmp_path, registry, methods=["baseline"], train=["cuhk"], test=["cuhk"],
                                     num_workers=2, cpus_per_worker=1.5, loader_workers=3,
                                     mlflow="file:///tmp/mlruns"))
    assert result.counts["ok"] == 1
    by_kind = {job.kind: job for job in submitted}
    train = by_kind["train"]
    assert isinstance(train.config, TrainConfig)
    assert (train.config.num_workers, train.config.cpus_per_worker, train.config.loader_workers) == (2, 1.5, 3)
    assert train.config.mlflow == "file:///tmp/mlruns"  # one MLflow run per training cell
    # Run inline there are no cluster resources to look at: the jobs decide about GPUs themselves.
    assert (train.cpus, train.gpus) == (3.0, 0.0) and train.config.use_gpu is None
    embed = by_kind["embed"]
    assert isinstance(embed.config, EmbedConfig) and embed.config.checkpoint.endswith("/ckpt")
    assert (embed.cpus, embed.gpus) == (embed.config.cpus_per_actor + embed.config.decode_cpus, 0.0)
    assert isinstance(by_kind["eval"].config, cells.EvalJob)
    assert by_kind["eval"].config.settings.ks == (1, 5, 10)


def test_declared_resources_follow_the_config():
    from tpr_ray.embedding.pipeline import EmbedConfig
    from tpr_ray.training.config import TrainConfig

    embed = EmbedConfig(checkpoint="c", out="o", actors=3, cpus_per_actor=2.0, decode_cpus=1.0, gpus_per_actor=1.0)
    assert cells.embed_resources(embed) == (7.0, 3.0)
    train = TrainConfig(method="baseline", data="d", out="o", num_workers=4, cpus_per_worker=2.0, use_gpu=True)
    assert cells.train_resources(train) == (8.0, 4.0)
    from tpr_ray.evaluation.streaming import StreamingSettings

    streaming = StreamingSettings(ks=(1,), cpus_per_task=2.0, gpus_per_task=0.5)
    assert cells.eval_resources(cells.EvalJob("e", streaming)) == (2.0, 0.5)


def files_under(folder):
    return {os.path.relpath(os.path.join(d, f), folder) for d, _, names in os.walk(folder) for f in names}


@pytest.mark.parametrize("method", ["../../x", "..", "a/b", "/tmp/x", "x\0y"])
def test_method_names_that_are_paths_are_refused(fake, tmp_path, method):
    jobs, registry = fake
    with pytest.raises(ConfigError, match="not a plain name"):
        crosseval(matrix_config(tmp_path, registry, methods=["baseline", method]))
    assert jobs.calls == [] and files_under(tmp_path) == {"datasets.json"}


def test_cli_refuses_a_method_name_that_is_a_path(fake, tmp_path):
    jobs, registry = fake
    result = CliRunner().invoke(crosseval_command, ["--methods", "../../x", "--train", "cuhk", "--test", "cuhk",
                                                    "--registry", registry, "--out", str(tmp_path / "out")])
    assert result.exit_code != 0 and "'../../x' is not a plain name" in result.output
    assert files_under(tmp_path) == {"datasets.json"}


def test_dataset_names_stay_inside_the_output(fake, tmp_path):
    jobs, registry = fake
    names = {"..": "/data/a", "../../evil": "/data/b", ".hidden/../x": "/data/c", "ok": "/data/d"}
    with open(registry, "w") as f:
        json.dump({"datasets": {name: {"root": root} for name, root in names.items()}}, f)
    result = crosseval(matrix_config(tmp_path, registry, methods=["baseline"], train=list(names), test=[".."]))
    assert result.counts["ok"] == 4
    written = files_under(tmp_path)
    assert all(path == "datasets.json" or path.startswith("out" + os.sep) for path in written), written
    assert all(".." not in path.split(os.sep) for path in written)
    assert {c["train"] for c in result.cells} == {"data", "evil", "hidden_.._x", "ok"}


def test_safe_names_are_single_path_components():
    for name in ("..", ".", "", "../x", "a/../b", "x\0", "C:\\evil", ".bashrc"):
        cleaned = data_registry.safe_name(name)
        assert cleaned not in ("", ".", "..") and not cleaned.startswith(".") and "/" not in cleaned, (name, cleaned)
        assert data_registry.child_path("/out", cleaned) == os.path.join("/out", cleaned)
    for bad in ("..", ".", "", "a/b", "a\\b", "a\0b"):
        with pytest.raises(ConfigError, match="cannot be used as a file or folder name"):
            data_registry.child_path("/out", bad)


@pytest.fixture()
def inline(monkeypatch):
    """The CLI's matrix run in this process, one job at a time (no Ray)."""
    from tpr_ray.crosseval import matrix

    monkeypatch.setattr(matrix, "_make_runner", lambda cfg, address: Runner(cells.run_job, False, float("inf"),
                                                                             float("inf"), 1))


def test_cli_exits_non_zero_after_writing_the_report_when_a_cell_failed(fake, inline, tmp_path):
    jobs, registry = fake
    out = tmp_path / "out"
    args = ["--methods", "baseline", "--train", "cuhk,icfg", "--test", "cuhk", "--registry", registry,
            "--out", str(out)]
    result = CliRunner().invoke(crosseval_command, args)
    assert result.exit_code == 1, result.output
    assert "FAILED baseline icfg -> cuhk in train: RuntimeError: CUDA out of memory" in result.output
    assert "1 of 2 cells failed" in result.output and "report: " in result.output
    assert (out / "report" / "index.html").stat().st_size > 0 and len(os.listdir(out / "cells")) == 2

    # Without failures the exit code is 0 (the finished cell is skipped on the re-run).
    ok = CliRunner().invoke(crosseval_command, [*args[:2], "--train", "cuhk", *args[4:]])
    assert ok.exit_code == 0, ok.output
    assert "1 cells: 0 evaluated, 1 already done, 0 failed" in ok.output


def test_every_progress_line_names_its_cell_or_run(fake, tmp_path, caplog):
    jobs, registry = fake
    caplog.set_level("INFO", logger="tpr_ray.crosseval")
    result = crosseval(matrix_config(tmp_path, registry, train=["cuhk", "icfg"], test=["cuhk", "rstp"]))
    lines = [r.getMessage() for r in caplog.records if r.name.startswith("tpr_ray.crosseval")]
    run_names = [os.path.basename(c["checkpoint"]["run_dir"]) for c in result.cells if c["checkpoint"]]
    for line in lines:
        names_a_run = any(name in line for name in run_names) or "baseline-icfg-" in line
        names_a_cell = re.search(r"(baseline|nope):? (cuhk|icfg) -> (cuhk|rstp)", line)
        assert names_a_run or names_a_cell, line
    done = [line for line in lines if line.startswith("cell ")]
    assert len(done) == 8 and done[-1].startswith("cell 8/8 ")
    assert any(re.match(r"cell \d/8 baseline cuhk -> cuhk: ok, R1 \d", line) for line in done)
    assert any("baseline icfg -> rstp: FAILED in train: RuntimeError: CUDA out of memory" in line for line in done)


def test_allowed_uri_prefixes_reach_the_jobs_and_only_them(fake, tmp_path, monkeypatch):
    from tpr_ray.data.uris import ENV_ALLOW

    jobs, registry = fake
    monkeypatch.delenv(ENV_ALLOW, raising=False)
    seen = []
    monkeypatch.setitem(cells.JOBS, "train", lambda config, address: (
        seen.append(os.environ.get(ENV_ALLOW)), jobs.train(config, address))[1])
    crosseval(matrix_config(tmp_path, registry, methods=["baseline"], train=["cuhk"], test=["cuhk"],
                            allow_uri_prefixes=("s3://mirror/cuhk",)))
    assert seen == ["s3://mirror/cuhk"] and ENV_ALLOW not in os.environ


# --------------------------------------------------------------------------- end to end on Ray


@pytest.mark.slow
def test_synthetic_matrix_on_ray(ray_cluster, tmp_path):
    from tpr_ray.evaluation.in_memory import evaluate_embeddings

    out = str(tmp_path / "matrix")
    cfg = CrossEvalConfig(out=out, methods=["baseline"], train=["cuhk", "rstp"], test=["cuhk", "rstp"],
                          synthetic_ids=30, max_steps=2, loader_workers=0, overrides={"epochs": 1}, samples=3)
    result = crosseval(cfg)

    assert result.counts == {"ok": 4, "failed": 0, "skipped": 0, "trained": 2, "reused_checkpoints": 0, "embedded": 4}
    for cell in result.cells:
        assert cell["status"] == "ok", cell.get("error")
        # The streaming evaluator's numbers are the in-memory evaluator's.
        expected = evaluate_embeddings(cell["embeddings"]["dir"] + "/gallery", cell["embeddings"]["dir"] + "/queries")
        for key in ("R1", "R5", "R10", "mAP", "mINP", "num_queries", "num_gallery"):
            assert cell["metrics"][key] == pytest.approx(expected[key], abs=1e-9)
        assert cell["checkpoint"]["sha256"] and cell["datasets"]["test"]["version"]
        assert cell["config"]["train"]["model"] == "tpr-tiny" and cell["config"]["recipe"]["lr"] == 1e-3
        assert len(cell["samples"]) == 3 and all(len(s["hits"]) == min(10, cell["metrics"]["num_gallery"])
                                                 for s in cell["samples"])
    assert len({c["checkpoint"]["uri"] for c in result.cells}) == 2

    # A re-run from the command line finds everything done.
    rerun = CliRunner().invoke(crosseval_command, ["--methods", "baseline", "--train", "cuhk,rstp", "--test",
                                                   "cuhk,rstp", "--out", out, "--ids", "30", "--max-steps", "2",
                                                   "--loader-workers", "0", "--epochs", "1", "--samples", "3"],
                               catch_exceptions=False)
    assert rerun.exit_code == 0, rerun.output
    assert "4 cells: 0 evaluated, 4 already done, 0 failed; 0 trained" in rerun.output
    assert "| baseline | cuhk → cuhk * |" in rerun.output

    # A test set that cannot be read fails its cells only; a lost cell is re-evaluated
    # with the existing checkpoint and embeddings.
    registry = tmp_path / "datasets.json"
    registry.write_text(json.dumps({"datasets": {"broken": {"root": str(tmp_path / "missing")}}}))
    os.remove(glob.glob(os.path.join(out, "cells", "baseline__rstp__cuhk-*.json"))[0])
    third = crosseval(dataclasses.replace(cfg, test=["cuhk", "broken"], registry=str(registry)))
    status = cell_status(third)
    assert status[("baseline", "cuhk", "broken")] == ("failed", "plan")
    assert status[("baseline", "rstp", "cuhk")] == ("ok", None)
    assert third.counts["trained"] == 0 and third.counts["embedded"] == 0 and third.counts["skipped"] == 1
