"""benchmarks/gpu_suite.py: runs without Ray, reports what it promises, and evaluates exactly.

The suite is written for a GPU machine that has torch but no Ray, so the end-to-end test runs
its ``--smoke`` mode in a subprocess where importing Ray (or anything else that machine lacks)
fails. Its evaluator is checked against tpr_ray.evaluation.metrics on data full of exact ties.
"""

import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from tpr_ray.errors import DataError
from tpr_ray.methods import METHODS
from tpr_ray.evaluation.metrics import retrieval_metrics, stable_descending_order

ROOT = Path(__file__).resolve().parents[1]
SUITE = ROOT / "benchmarks" / "gpu_suite.py"
# What the GPU machine lacks (it has torch, torchvision, numpy, PIL, click; open_clip travels as
# a wheel), plus the table readers (pyarrow, fsspec), which it has but the suite's torch-only
# parts of tpr_ray (methods, backbone, losses, metrics, optim, evaluation kernels) must not need.
ABSENT_ON_GPU_MACHINE = ("ray", "faiss", "s3fs", "botocore", "boto3", "moto", "pyarrow", "fsspec")


def load_suite():
    spec = importlib.util.spec_from_file_location("gpu_suite", SUITE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


suite = load_suite()


def tie_heavy(seed, num_queries=30, num_gallery=200, persons=20, dim=3):
    """Embeddings in {-1, 0, 1}: integer scores (exact in float32 on any device) and many ties."""
    rng = np.random.default_rng(seed)
    queries = rng.integers(-1, 2, (num_queries, dim)).astype(np.float32)
    gallery = rng.integers(-1, 2, (num_gallery, dim)).astype(np.float32)
    gallery_pids = np.concatenate([np.arange(persons), rng.integers(0, persons, num_gallery - persons)])
    query_pids = rng.integers(0, persons, num_queries)
    return queries, gallery, query_pids, gallery_pids


def run_exact(queries, gallery, query_pids, gallery_pids, **kwargs):
    return suite.exact_eval(torch.from_numpy(queries), torch.from_numpy(gallery), torch.from_numpy(query_pids),
                            torch.from_numpy(gallery_pids), **kwargs)


@pytest.mark.parametrize("seed,block", [(0, 7), (1, 30), (2, 1)])
def test_exact_eval_equals_tpr_ray_metrics_with_ties(seed, block):
    queries, gallery, query_pids, gallery_pids = tie_heavy(seed)
    scores = queries @ gallery.T
    assert len(np.unique(scores)) <= 7  # ties everywhere: the tie rule decides most ranks

    out = run_exact(queries, gallery, query_pids, gallery_pids, top_k=10, block=block)

    reference = retrieval_metrics(scores, query_pids, gallery_pids)
    assert out["metrics"] == reference
    order = stable_descending_order(scores)[:, :10]
    np.testing.assert_array_equal(out["top_positions"].numpy(), order)
    np.testing.assert_array_equal(out["top_scores"].numpy(), np.take_along_axis(scores, order, axis=1))


@pytest.mark.parametrize("shard_rows", [50, 200])
def test_library_streaming_kernels_as_the_suite_runs_them_equal_tpr_ray_metrics(shard_rows):
    queries, gallery, query_pids, gallery_pids = tie_heavy(4)
    scores = queries @ gallery.T
    out = suite.library_eval(queries, gallery, query_pids, gallery_pids, shard_rows=shard_rows, top_k=10, block=7)
    assert out["metrics"] == retrieval_metrics(scores, query_pids, gallery_pids)
    np.testing.assert_array_equal(out["top_positions"], stable_descending_order(scores)[:, :10])


def test_exact_eval_queries_without_positives_follow_tpr_ray_metrics():
    queries, gallery, query_pids, gallery_pids = tie_heavy(3)
    query_pids[:4] = 999  # nobody in the gallery
    with pytest.raises(DataError, match="no positive"):
        run_exact(queries, gallery, query_pids, gallery_pids)
    out = run_exact(queries, gallery, query_pids, gallery_pids, skip_queries_without_positives=True)
    reference = retrieval_metrics(queries @ gallery.T, query_pids, gallery_pids, skip_queries_without_positives=True)
    assert out["metrics"] == reference and reference["num_queries_skipped"] == 4


def test_tie_rule_by_hand():
    scores = torch.tensor([[0.5, 0.75, 0.5, 0.75, 0.25]])
    # position 2 (0.5): both 0.75s score higher and position 0 ties earlier -> 3 ahead, rank 4;
    # position 3 (0.75): position 1 ties earlier -> 1 ahead.
    assert suite.count_ahead(scores, torch.tensor([[2, 3]])).tolist() == [[3, 1]]
    values, positions = suite.top_k_stable(scores, 3)
    assert positions.tolist() == [[1, 3, 0]] and values.tolist() == [[0.75, 0.75, 0.5]]


def test_mfu_is_gflop_times_rate_over_peak():
    peaks = {"name": "test", "bf16": 1.0, "fp32": None, "source": "test"}  # 1 TFLOP/s
    record = {"gflop_per_sample": 2.0, "samples_per_s": 100.0}
    suite.Suite.add_ceiling(type("S", (), {"peaks": peaks})(), record, "train")
    assert record["mfu"] == pytest.approx(0.2)  # 2 GFLOP x 100/s = 0.2 TFLOP/s of 1
    assert record["ceiling_per_s"] == pytest.approx(500.0)
    assert suite.chip_peaks(torch.device("cpu"), None, None)["bf16"] is None
    assert suite.chip_peaks(torch.device("cpu"), 400.0, None)["bf16"] == 400.0


def test_time_budget_skips_and_interrupts_cells(tmp_path):
    s = suite.Settings.smoke()
    run = suite.Suite(s, torch.device("cpu"), suite.chip_peaks(torch.device("cpu"), None, None),
                      str(tmp_path / "out.json"), smoke=True)
    run.budget.deadline = time.monotonic() + 0.5
    config = {"method": "baseline", "batch": 4, "mode": "eager"}
    too_big = run.cell("train", config, 10.0, lambda: {"samples_per_s": 1.0})
    assert too_big["status"] == "skipped" and "time budget" in too_big["reason"]
    tick = time.monotonic()
    overran = run.cell("train", config, 0.0, lambda: time.sleep(5) or {})
    assert overran["status"] == "skipped" and "interrupted" in overran["reason"]
    assert time.monotonic() - tick < 2.0

    def compile_that_wraps_the_alarm():  # as inductor does: InductorError from CellTimeout
        try:
            time.sleep(5)
        except suite.CellTimeout as exc:
            raise RuntimeError("compile failed") from exc

    run.budget.deadline = time.monotonic() + 0.3
    wrapped = run.cell("train", config, 0.0, compile_that_wraps_the_alarm)
    assert wrapped["status"] == "skipped" and "interrupted" in wrapped["reason"]
    saved = json.loads((tmp_path / "out.json").read_text())
    assert saved["skipped"] == 3 and len(saved["cells"]) == 3


BLOCK_AND_RUN = f"""
import importlib.abc, runpy, sys
ABSENT = {ABSENT_ON_GPU_MACHINE!r}
class Absent(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in ABSENT:
            raise ImportError(f"{{name}} is blocked: the GPU suite must run without it")
sys.meta_path.insert(0, Absent())
sys.argv = [{str(SUITE)!r}] + sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.mark.slow  # the whole suite at tiny sizes: about 15 s on an idle 2-core machine
def test_smoke_run_without_ray_reports_every_cell(tmp_path):
    out = tmp_path / "suite.json"
    proc = subprocess.run([sys.executable, "-c", BLOCK_AND_RUN, "--smoke", "--out", str(out)],
                          check=False, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["smoke"] and report["skipped"] == 0
    assert {"device", "torch", "open_clip", "peak_bf16_tflops", "precision"} <= set(report["environment"])
    cells = report["cells"]
    assert all(c["status"] == "ok" for c in cells), [c for c in cells if c["status"] != "ok"]

    def find(**match):
        return [c for c in cells if all(c.get(k) == v for k, v in match.items())]

    for name in METHODS:
        for batch in (4, 8):
            (train,) = find(what="train", method=name, batch=batch, mode="eager")
            assert train["samples_per_s"] > 0 and train["gflop_per_sample"] > 0 and train["step_ms"] > 0
            assert "peak_gib" in train and "mfu" in train and train["stage"]
        for batch in (8, 16):
            (embed,) = find(what="embed", method=name, batch=batch)
            assert embed["samples_per_s"] > 0 and embed["gflop_per_sample"] > 0
        (text,) = find(what="text", method=name)
        assert text["samples_per_s"] > 0 and text["tokenize_per_s_cpu"] > 0
    first, second = find(what="train", mode="compile")
    assert (first["method"], first["batch"], second["batch"]) == ("baseline", 4, 8)
    assert first["samples_per_s"] > 0 and second["samples_per_s"] > 0
    assert first["graphs"] == second["graphs"] == 1  # one graph, reused by the second batch size

    (check,) = find(what="eval_check")
    assert check["equal"] and check["queries_tied_at_k"] > 0
    (evaluation,) = find(what="eval")
    assert {"R1", "R5", "R10", "mAP", "mINP"} <= set(evaluation["metrics"])
    assert evaluation["metrics"]["num_queries"] == 96 and evaluation["top_k_shape"] == [96, 10]
    assert evaluation["seconds"] > 0 and evaluation["gflop_per_sample"] > 0
    (library,) = find(what="eval_library")
    assert library["metrics"]["num_queries"] == 96 and library["shards"] == 5
    assert isinstance(library["same_as_suite"], bool) and "_top" not in evaluation
    assert "suite and library equal to tpr_ray.evaluation.metrics: True" in proc.stdout
