import json

import pytest

from tpr_ray.methods import available
from tpr_ray.methods.published import PUBLISHED, published
from tpr_ray.workflows.reproduce import comparison, format_comparison


def test_every_method_has_published_numbers_and_pd_shows_the_baselines():
    assert set(PUBLISHED) == set(available())
    assert published("pd", "cuhk")[1] == published("baseline", "cuhk")[1]
    assert "no published numbers for PD" in published("pd", "cuhk")[0]
    assert published("cskt", "icfg")[1] == {"R1": 58.90, "R5": 77.31, "R10": 83.56, "mAP": 33.87}
    assert published("cfine", "rstp")[1]["mAP"] is None  # not reported by the paper


def test_comparison_is_ours_minus_the_papers_and_keeps_unknowns_empty():
    table = comparison({"R1": 60.0, "R5": 80.0, "R10": 85.0, "mAP": 30.0}, "cfine", "icfg")
    rows = {r["metric"]: r for r in table["rows"]}
    assert rows["R1"]["difference"] == pytest.approx(60.0 - 60.83)
    assert rows["mAP"]["published"] is None and rows["mAP"]["difference"] is None
    text = format_comparison(table, "cfine", "icfg")
    assert "R1        60.00   60.83   -0.83" in text and "mAP       30.00       -       -" in text


@pytest.mark.slow
def test_reproduce_smoke_runs_train_embed_eval_and_prints_the_comparison(ray_cluster, tmp_path):
    from click.testing import CliRunner

    from cli.main import cli

    result = CliRunner().invoke(cli, ["reproduce", "--method", "baseline", "--out", str(tmp_path), "--smoke",
                                      "--loader-workers", "0"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "baseline on cuhk (test, text-to-image, %)" in result.output
    report = json.loads((tmp_path / "reproduce.json").read_text())
    assert report["smoke"] and report["dataset"] == "cuhk" and set(report["metrics"]) == {"R1", "R5", "R10", "mAP"}
    assert [r["published"] for r in report["comparison"]["rows"]] == [68.19, 86.47, 91.47, 61.12]
    assert report["recipe"]["epochs"] == 1  # the smoke settings on top of the paper's recipe
