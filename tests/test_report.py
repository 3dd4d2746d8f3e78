import csv
import json
import os
import re
import shutil
import subprocess

import numpy as np
import pytest
from PIL import Image

from tpr_ray.crosseval.report import (
    METRICS,
    colour,
    heatmap_png,
    markdown_table,
    write_cell_json,
    write_report,
)

CORRECT_FRAME = (0x1A, 0x98, 0x50)
WRONG_FRAME = (0xD7, 0x30, 0x27)


def make_images(folder, count):
    """Small pedestrian-shaped crops in distinct colours (what the report thumbnails)."""
    folder.mkdir(parents=True, exist_ok=True)
    uris = []
    for i in range(count):
        image = Image.new("RGB", (128, 384), (40 + 20 * i % 200, 90, 200 - 15 * i % 180))
        path = folder / f"img{i:02d}.{'png' if i % 2 else 'jpg'}"
        image.save(path)
        uris.append(str(path))
    return uris


def make_record(method, train, test, r1, uris, status="ok"):
    record = {"key": f"{method}-{train}-{test}", "method": method, "train": train, "test": test,
              "in_domain": train == test, "status": status, "checkpoint": {"uri": f"runs/{method}-{train}/ckpt",
                                                                          "sha256": "ab" * 32},
              "datasets": {"train": {"name": train, "version": "v-" + train}, "test": {"name": test, "version": "v-" + test}},
              "config": {}, "time": {}, "samples": []}
    if status != "ok":
        record.update(metrics=None, chance=None,
                      error={"stage": "train", "type": "ConfigError", "message": "no | such recipe option 'x'"})
        return record
    record["metrics"] = {"R1": r1, "R5": min(100.0, r1 + 20), "R10": min(100.0, r1 + 30), "mAP": r1 - 5,
                         "mINP": r1 - 10, "num_queries": 40, "num_gallery": 20}
    record["chance"] = {"R1": 5.0}
    record["samples"] = [{
        "query_index": q, "query_id": q, "caption": f"A person <{q}> in a red coat & black boots.", "person_id": q,
        "image_id": f"img{q:02d}", "image_uri": uris[q], "positive_ranks": [1, 4],
        "hits": [{"rank": k + 1, "image_id": f"img{k:02d}", "image_uri": uris[(q + k) % len(uris)],
                  "person_id": q if k in (0, 3) else 99, "score": 0.9 - 0.05 * k, "correct": k in (0, 3)}
                 for k in range(10)]} for q in range(2)]
    return record


@pytest.fixture()
def records(tmp_path):
    uris = make_images(tmp_path / "imgs", 12)
    return [make_record("baseline", "cuhk", "cuhk", 62.5, uris), make_record("baseline", "cuhk", "icfg", 31.25, uris),
            make_record("baseline", "icfg", "cuhk", 20.0, uris), make_record("baseline", "icfg", "icfg", 55.0, uris),
            make_record("pd", "cuhk", "cuhk", 70.0, uris), make_record("pd", "cuhk", "icfg", 0.0, uris, "failed")]


def test_csv_and_markdown_hold_every_cell(records, tmp_path):
    paths = write_report(records, str(tmp_path / "report"))
    with open(paths["csv"]) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 6
    first = rows[0]
    assert (first["method"], first["train"], first["test"], first["status"]) == ("baseline", "cuhk", "cuhk", "ok")
    assert float(first["R1"]) == 62.5 and float(first["mINP"]) == 52.5 and first["checkpoint_sha256"] == "ab" * 32
    failed = [r for r in rows if r["status"] == "failed"][0]
    assert failed["R1"] == "" and "train: no | such recipe option" in failed["error"]

    table = open(paths["markdown"]).read()
    assert table.startswith("| method | train → test | R1 | R5 | R10 | mAP | mINP | chance R1 |")
    assert "| baseline | cuhk → cuhk * | 62.50 | 82.50 | 92.50 | 57.50 | 52.50 | 5.00 |" in table
    assert "| baseline | cuhk → icfg | 31.25 |" in table
    assert "| pd | cuhk → icfg | failed (train: no \\| such recipe option 'x') |" in table
    assert markdown_table(records) == table


def test_heatmap_colours_cells_by_r1_on_a_fixed_scale(records, tmp_path):
    path = tmp_path / "heat.png"
    heatmap_png(records, "baseline", str(path))
    image = np.asarray(Image.open(path).convert("RGB"))
    # Layout: cells of 130 x 64 from (110, 78); rows cuhk, icfg; columns cuhk, icfg.
    for (row, column), r1 in {(0, 0): 62.5, (0, 1): 31.25, (1, 0): 20.0, (1, 1): 55.0}.items():
        y, x = 78 + row * 64 + 8, 110 + column * 130 + 12
        assert tuple(image[y, x]) == colour(r1), (row, column)
    assert colour(0) == (68, 1, 84) and colour(100) == (253, 231, 37)

    heatmap_png(records, "pd", str(path))  # one ok cell and one failed (grey) cell
    image = np.asarray(Image.open(path).convert("RGB"))
    assert tuple(image[78 + 8, 110 + 130 + 12]) == (200, 200, 200)


def test_cell_json_round_trips(records, tmp_path):
    records[0]["metrics"]["R1"] = np.float64(62.5)  # numpy values are written as plain numbers
    for record in records:
        write_cell_json(record, str(tmp_path / "cells" / f"{record['key']}.json"))
    back = sorted((json.loads(p.read_text()) for p in (tmp_path / "cells").glob("*.json")),
                  key=lambda r: (r["method"], r["train"], r["test"]))
    assert [(r["method"], r["train"], r["test"]) for r in back] == sorted(
        (r["method"], r["train"], r["test"]) for r in records)
    assert back[0]["metrics"]["R1"] == 62.5


def test_html_links_thumbnails_and_marks_correct_hits(records, tmp_path):
    paths = write_report(records, str(tmp_path / "report"))
    page = open(paths["html"]).read()
    assert "A person &lt;0&gt; in a red coat &amp; black boots." in page  # captions are escaped
    sources = re.findall(r'<img src="([^"]+)"', page)
    assert "heatmap-baseline.png" in sources and "heatmap-pd.png" in sources
    thumbs = [s for s in sources if s.startswith("thumbs/")]
    # 5 ok cells x 2 queries x (10 hits + the described image)
    assert len(thumbs) == 5 * 2 * 11
    for source in set(sources):
        assert os.path.getsize(tmp_path / "report" / source) > 0
    with Image.open(tmp_path / "report" / thumbs[0]) as thumb:
        assert thumb.height == 128
    assert page.count('class="correct"') == 5 * 2 * 2 and page.count('class="wrong"') == 5 * 2 * 8
    assert "failed in train: ConfigError" in page
    for metric in METRICS:
        assert f"<th>{metric}</th>" in page


# --------------------------------------------------------------------------- a real browser

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def chromium():
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    message = "chromium is not installed (Debian: apt-get update && apt-get install -y chromium)"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


def run_chromium(tmp_path, *args):
    profile = tmp_path / "chromium-profile"
    result = subprocess.run([chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


def images_loaded(tmp_path, page: str) -> tuple[int, int]:
    """(loaded, total) images as the page's own load check recorded them in the DOM."""
    dom = run_chromium(tmp_path, "--dump-dom", f"file://{page}")
    found = re.search(r'data-images-loaded="(\d+)/(\d+)"', dom)
    assert found, "the page's load check did not run"
    return int(found.group(1)), int(found.group(2))


@pytest.mark.slow
def test_report_opens_in_chromium_with_every_image_loaded(records, tmp_path):
    paths = write_report(records, str(tmp_path / "report"))
    loaded, total = images_loaded(tmp_path, paths["html"])
    assert total == 5 * 2 * 11 + 2 and loaded == total

    # The check itself notices a broken image.
    os.remove(tmp_path / "report" / "heatmap-pd.png")
    assert images_loaded(tmp_path, paths["html"]) == (total - 1, total)

    shot = tmp_path / "shot.png"
    run_chromium(tmp_path, f"--screenshot={shot}", "--window-size=1200,1400", f"file://{paths['html']}")
    pixels = np.asarray(Image.open(shot).convert("RGB")).reshape(-1, 3)
    assert Image.open(shot).size == (1200, 1400)
    # Rendered, not blank: the heatmap colours and both frame colours are on screen.
    colours = {tuple(p) for p in np.unique(pixels, axis=0)}
    assert CORRECT_FRAME in colours and WRONG_FRAME in colours
    assert colour(62.5) in colours


def test_report_columns_follow_the_cut_offs_of_the_results(records, tmp_path):
    """crosseval --k 1,5,20: no R10 anywhere, R20 in every table (R10 used to be hard-coded)."""
    for record in records:
        if record["status"] == "ok":
            metrics = record["metrics"]
            metrics["R20"] = metrics.pop("R10") + 1
    paths = write_report(records, str(tmp_path / "report"))
    header = open(paths["markdown"]).read().splitlines()[0]
    assert header == "| method | train → test | R1 | R5 | R20 | mAP | mINP | chance R1 |"
    rows = list(csv.DictReader(open(paths["csv"])))
    assert "R20" in rows[0] and "R10" not in rows[0]
    assert float(rows[0]["R20"]) == records[0]["metrics"]["R20"]
    page = open(paths["html"]).read()
    assert "<th>R20</th>" in page and "R10" not in page and f"R20 {records[0]['metrics']['R20']:.2f}" in page
    for record in records:  # --k 5,20: no R1 to colour the heatmaps by either
        if record["status"] == "ok":
            del record["metrics"]["R1"]
            record["chance"] = {"R5": 25.0}
    paths = write_report(records, str(tmp_path / "report2"))
    assert open(paths["markdown"]).read().splitlines()[0].startswith("| method | train → test | R5 | R20 |")
    assert os.path.getsize(paths["heatmap-baseline"]) > 0
