import json

import pytest

from tpr_ray.methods import available
from tpr_ray.methods.published import PUBLISHED, published
from tpr_ray.workflows.reproduce import SMOKE_NOTE, SMOKE_STEPS, comparison, format_comparison


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


def test_a_smoke_table_says_it_is_not_comparable_to_the_paper():
    table = comparison({"R1": 1.0, "R5": 2.0, "R10": 3.0, "mAP": 4.0}, "pd", "cuhk")
    assert format_comparison(table, "pd", "cuhk", SMOKE_NOTE).splitlines()[0] == (
        "[smoke, synthetic: not comparable to the paper]")
    assert "not comparable" not in format_comparison(table, "pd", "cuhk")


@pytest.mark.slow
def test_reproduce_smoke_runs_every_stage_then_embeds_evaluates_and_prints_the_comparison(ray_cluster, tmp_path):
    """PD (two stages) covers the one-stage methods' chain too; the smoke step limit is per stage,
    so stage 2 ("finetune") trains after stage 1 ("prompts")."""
    from click.testing import CliRunner

    from cli.main import cli
    from tpr_ray.model.checkpoint import read_config

    result = CliRunner().invoke(cli, ["reproduce", "--method", "pd", "--out", str(tmp_path), "--smoke",
                                      "--loader-workers", "0"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "pd on cuhk (test, text-to-image, %)" in result.output
    assert f"[{SMOKE_NOTE}]" in result.output
    report = json.loads((tmp_path / "reproduce.json").read_text())
    assert report["smoke"] and report["dataset"] == "cuhk" and set(report["metrics"]) == {"R1", "R5", "R10", "mAP"}
    assert report["note"] == SMOKE_NOTE
    assert [r["published"] for r in report["comparison"]["rows"]] == [68.19, 86.47, 91.47, 61.12]
    assert report["recipe"]["epochs"] == 1 and report["recipe"]["stage1_epochs"] == 1  # smoke settings
    latest = read_config(report["latest_checkpoint"])
    assert latest["stage_name"] == "finetune", latest  # the last checkpoint is stage 2's
    assert latest["global_step"] == 2 * SMOKE_STEPS
