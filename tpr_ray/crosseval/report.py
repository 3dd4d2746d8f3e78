"""Reports of a cross-dataset evaluation: cell JSON, CSV, Markdown, heatmaps, HTML.

Everything is built from the cell records that :mod:`tpr_ray.crosseval` writes, so a
report can be redrawn from ``cells/*.json`` alone. A record holds ``method``, ``train``,
``test``, ``status`` (``ok``/``failed``), ``metrics`` (``R1``, ``R5``, ``R10``, ``mAP``,
``mINP`` in percent, ...), ``chance``, ``config``, ``checkpoint``, ``datasets``, ``time``,
``samples`` (queries with their top-K retrieved images) and, when failed, ``error``.

Heatmaps are drawn with PIL; the HTML page links its heatmaps and thumbnails by relative
paths, so the report folder can be copied or served as it is.
"""

from __future__ import annotations

import csv
import hashlib
import html
import io
import logging

from PIL import Image, ImageDraw, ImageFont

from tpr_ray.io import storage
from tpr_ray.evaluation.in_memory import metric_names, write_metrics_json

log = logging.getLogger(__name__)

# The protocol's metrics; a report shows whichever R@K the cells were evaluated with (see metric_columns).
METRICS = ("R1", "R5", "R10", "mAP", "mINP")
THUMB_HEIGHT = 128
# Anchors of the viridis colour map (0 % -> 100 %): perceptually even and readable in grey.
VIRIDIS = ((68, 1, 84), (59, 82, 139), (33, 145, 140), (94, 201, 98), (253, 231, 37))


def write_cell_json(record: dict, uri: str) -> None:
    """One cell's record as indented JSON (numpy values made plain), written atomically."""
    write_metrics_json(record, uri)


# --------------------------------------------------------------------------- tables


def metric_columns(records: list[dict]) -> list[str]:
    """The metrics the evaluated cells hold (``R{k}`` by k, then mAP and mINP); the protocol's if none."""
    present = {}
    for r in records:
        if r.get("status") == "ok":
            present.update(dict.fromkeys(r.get("metrics") or {}))
    return metric_names(present) or list(METRICS)


def matrix_rows(records: list[dict]) -> list[dict]:
    """One flat row per cell: names, status, the metrics, sizes, chance R1, identity."""
    columns = metric_columns(records)
    rows = []
    for r in records:
        metrics = r.get("metrics") or {}
        checkpoint = r.get("checkpoint") or {}
        datasets = r.get("datasets") or {}
        error = r.get("error") or {}
        rows.append({
            "method": r["method"], "train": r["train"], "test": r["test"], "in_domain": r["train"] == r["test"],
            "status": r["status"], **{m: metrics.get(m) for m in columns},
            "num_queries": metrics.get("num_queries"), "num_gallery": metrics.get("num_gallery"),
            "chance_R1": (r.get("chance") or {}).get("R1"),
            "checkpoint": checkpoint.get("uri"), "checkpoint_sha256": checkpoint.get("sha256"),
            "train_version": (datasets.get("train") or {}).get("version"),
            "test_version": (datasets.get("test") or {}).get("version"),
            "key": r.get("key"), "error": f"{error.get('stage', '')}: {error.get('message', '')}" if error else "",
        })
    return rows


def write_csv(records: list[dict], uri: str) -> None:
    rows = matrix_rows(records)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]) if rows else ["method", "train", "test"])
    writer.writeheader()
    for row in rows:
        writer.writerow({k: (f"{v:.4f}" if isinstance(v, float) else v) for k, v in row.items()})
    storage.write_bytes_atomic(uri, buffer.getvalue().encode())


def markdown_table(records: list[dict]) -> str:
    """The matrix as a Markdown table, one row per cell (in-domain cells marked *), with the
    R1 of a random ranking of the same test set for scale."""
    columns = metric_columns(records)
    lines = ["| method | train → test | " + " | ".join(columns) + " | chance R1 |",
             "|---|---|" + "---:|" * (len(columns) + 1)]
    for row in matrix_rows(records):
        pair = f"{row['train']} → {row['test']}" + (" *" if row["in_domain"] else "")
        if row["status"] == "ok":
            values = " | ".join(_number(row[m]) for m in columns)
            values += f" | {row['chance_R1']:.2f}" if row["chance_R1"] is not None else " |"
        else:
            values = f"failed ({_escape_md(row['error'][:120])})" + " |" * len(columns)
        lines.append(f"| {row['method']} | {pair} | {values} |")
    lines.append("")
    lines.append("\\* in-domain (trained and tested on the same dataset); text-to-image, percent.")
    return "\n".join(lines) + "\n"


def _number(value) -> str:
    return "" if value is None else f"{value:.2f}"


def _escape_md(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


# --------------------------------------------------------------------------- heatmaps


def colour(value: float) -> tuple[int, int, int]:
    """Viridis colour of a percentage (0 -> dark purple, 100 -> yellow)."""
    x = min(max(value / 100.0, 0.0), 1.0) * (len(VIRIDIS) - 1)
    i = min(int(x), len(VIRIDIS) - 2)
    t = x - i
    return tuple(round(a + (b - a) * t) for a, b in zip(VIRIDIS[i], VIRIDIS[i + 1]))


def heatmap_png(records: list[dict], method: str, uri: str, metric: str = "R1") -> None:
    """Rows: training set; columns: test set; colour and first line: ``metric``; second: mAP.

    Colours use a fixed 0-100 % scale so heatmaps of different methods compare at a glance;
    in-domain cells get a dark frame, failed cells are grey.
    """
    cells = {(r["train"], r["test"]): r for r in records if r["method"] == method}
    trains = list(dict.fromkeys(r["train"] for r in records if r["method"] == method))
    tests = list(dict.fromkeys(r["test"] for r in records if r["method"] == method))
    font, small, bold = _font(15), _font(12), _font(17)
    cell_w, cell_h, left, top, bottom = 130, 64, 110, 78, 64
    width, height = left + cell_w * max(len(tests), 1) + 20, top + cell_h * max(len(trains), 1) + bottom
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    draw.text((10, 8), f"{method}: {metric} (%), text-to-image", fill="black", font=bold)
    draw.text((left, 36), "columns: tested on", fill=(90, 90, 90), font=small)
    draw.text((10, top - 18), "rows: trained on", fill=(90, 90, 90), font=small)
    for j, test in enumerate(tests):
        draw.text((left + j * cell_w + cell_w // 2, top - 10), test, fill="black", font=font, anchor="ms")
    for i, train in enumerate(trains):
        y = top + i * cell_h
        draw.text((left - 10, y + cell_h // 2), train, fill="black", font=font, anchor="rm")
        for j, test in enumerate(tests):
            x = left + j * cell_w
            record = cells.get((train, test))
            box = (x + 2, y + 2, x + cell_w - 2, y + cell_h - 2)
            if record is None or record["status"] != "ok":
                draw.rectangle(box, fill=(200, 200, 200))
                draw.text((x + cell_w // 2, y + cell_h // 2), "failed" if record else "—", fill="black",
                          font=font, anchor="mm")
                continue
            value = float(record["metrics"][metric])
            fill = colour(value)
            text = "black" if sum(fill) > 380 else "white"
            draw.rectangle(box, fill=fill)
            if train == test:
                draw.rectangle(box, outline=(25, 25, 25), width=3)
            draw.text((x + cell_w // 2, y + cell_h // 2 - 9), f"{value:.1f}", fill=text, font=bold, anchor="mm")
            draw.text((x + cell_w // 2, y + cell_h // 2 + 13), f"mAP {float(record['metrics']['mAP']):.1f}",
                      fill=text, font=small, anchor="mm")
    # Colour bar: the fixed 0-100 scale.
    bar_y = height - bottom + 22
    bar_w = width - left - 30
    for k in range(bar_w):
        draw.line([(left + k, bar_y), (left + k, bar_y + 12)], fill=colour(100.0 * k / max(bar_w - 1, 1)))
    for tick in (0, 25, 50, 75, 100):
        x = left + round(tick / 100 * (bar_w - 1))
        draw.text((x, bar_y + 16), str(tick), fill="black", font=small, anchor="mt")
    _write_png(image, uri)


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType: the bitmap font (one size)
        return ImageFont.load_default()


def _write_png(image: Image.Image, uri: str) -> None:
    buffer = io.BytesIO()
    image.save(buffer, "PNG", optimize=True)
    storage.write_bytes_atomic(uri, buffer.getvalue())


# --------------------------------------------------------------------------- HTML


def thumbnail(image_uri: str, report_dir: str) -> str:
    """Copy a resized JPEG of an image into ``report_dir/thumbs/``; returns its relative path.

    Unreadable images get a grey placeholder, so the page never shows a broken image.
    """
    name = hashlib.sha1(image_uri.encode()).hexdigest()[:20] + ".jpg"
    target = storage.join(report_dir, "thumbs", name)
    if not storage.exists(target):
        try:
            with Image.open(io.BytesIO(storage.read_bytes(image_uri))) as source:
                image = source.convert("RGB")
            scale = THUMB_HEIGHT / image.height
            image = image.resize((max(1, round(image.width * scale)), THUMB_HEIGHT), Image.Resampling.BILINEAR)
        except Exception as exc:  # a missing image must not stop the report
            log.warning("no thumbnail for %s: %s", image_uri, exc)
            image = Image.new("RGB", (THUMB_HEIGHT // 3, THUMB_HEIGHT), (180, 180, 180))
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=85)
        storage.write_bytes_atomic(target, buffer.getvalue())
    return f"thumbs/{name}"


PAGE_STYLE = """
body { font-family: system-ui, sans-serif; margin: 24px; color: #222; }
table.matrix { border-collapse: collapse; margin: 8px 0 16px; }
table.matrix th, table.matrix td { border: 1px solid #ccc; padding: 4px 8px; text-align: right; }
table.matrix td.name { text-align: left; }
tr.in-domain td { font-weight: 600; }
tr.failed td { color: #a00; }
.heatmaps img { margin: 0 16px 16px 0; border: 1px solid #ddd; }
section.cell { border-top: 2px solid #ddd; margin-top: 24px; }
.query { margin: 12px 0 20px; }
.caption { font-style: italic; margin: 4px 0; }
.meta { color: #666; font-size: 13px; margin: 2px 0 6px; }
ol.hits { list-style: none; padding: 0; margin: 0; display: flex; gap: 6px; align-items: flex-start; }
ol.hits li { text-align: center; font-size: 12px; }
ol.hits img, .truth img { display: block; border: 4px solid #bbb; border-radius: 3px; }
li.correct img { border-color: #1a9850; }
li.wrong img { border-color: #d73027; }
li.correct span { color: #1a9850; font-weight: 700; }
li.wrong span { color: #d73027; }
.truth { display: inline-block; margin-right: 14px; text-align: center; font-size: 12px; vertical-align: top; }
.error { white-space: pre-wrap; background: #fff0f0; padding: 8px; font-size: 12px; }
"""

# Records, in the page itself, whether every image loaded (checked by the report's test).
LOAD_CHECK = """
window.addEventListener("load", function () {
  var images = Array.prototype.slice.call(document.images);
  var loaded = images.filter(function (img) { return img.complete && img.naturalWidth > 0; });
  document.body.setAttribute("data-images-loaded", loaded.length + "/" + images.length);
});
"""


def write_html(records: list[dict], report_dir: str, heatmaps: dict[str, str]) -> str:
    """The HTML report: matrix, heatmaps, and per cell sample queries with their top-K images."""
    e = html.escape
    parts = ["<!doctype html>", '<html lang="en"><head><meta charset="utf-8">',
             "<title>tpr-ray cross-dataset evaluation</title>", f"<style>{PAGE_STYLE}</style>",
             f"<script>{LOAD_CHECK}</script></head><body>",
             "<h1>Cross-dataset evaluation</h1>"]
    ok = sum(r["status"] == "ok" for r in records)
    parts.append(f"<p>{len(records)} cells ({ok} evaluated, {len(records) - ok} failed). Text-to-image retrieval, "
                 "percent; rows in bold are in-domain. Thumbnails: green frame = same person as the query "
                 "(correct), red = another person.</p>")

    columns = metric_columns(records)
    parts.append('<table class="matrix"><tr><th>method</th><th>train</th><th>test</th>'
                 + "".join(f"<th>{m}</th>" for m in columns) + "<th>chance R1</th></tr>")
    for row in matrix_rows(records):
        classes = " ".join(c for c, on in (("in-domain", row["in_domain"]), ("failed", row["status"] != "ok")) if on)
        cells = "".join(f"<td>{_number(row[m])}</td>" for m in columns) if row["status"] == "ok" else \
            f'<td colspan="{len(columns)}" class="name">failed: {e(row["error"][:200])}</td>'
        chance = f"{row['chance_R1']:.2f}" if row["chance_R1"] is not None else ""
        parts.append(f'<tr class="{classes}"><td class="name">{e(row["method"])}</td><td class="name">'
                     f'{e(row["train"])}</td><td class="name">{e(row["test"])}</td>{cells}<td>{chance}</td></tr>')
    parts.append("</table>")

    if heatmaps:
        parts.append('<h2>Heatmaps</h2><div class="heatmaps">')
        for method, path in heatmaps.items():
            parts.append(f'<img src="{e(path)}" alt="{e(method)} R1 heatmap: rows trained on, columns tested on">')
        parts.append("</div>")

    parts.append("<h2>Retrieved images</h2>")
    for record in records:
        title = f"{record['method']}: {record['train']} → {record['test']}"
        parts.append(f'<section class="cell"><h3>{e(title)}</h3>')
        if record["status"] != "ok":
            error = record.get("error") or {}
            parts.append(f'<p class="error">failed in {e(str(error.get("stage")))}: {e(str(error.get("type")))}: '
                         f'{e(str(error.get("message")))}</p></section>')
            continue
        m = record["metrics"]
        values = " · ".join(f"{name} {m[name]:.2f}" for name in metric_names(m))
        parts.append(f'<p class="meta">{values} · {m.get("num_queries")} queries, {m.get("num_gallery")} images</p>')
        for sample in record.get("samples") or []:
            parts.append(_query_html(sample, report_dir))
        parts.append("</section>")
    parts.append("</body></html>")
    uri = storage.join(report_dir, "index.html")
    storage.write_bytes_atomic(uri, "\n".join(parts).encode())
    return uri


def _query_html(sample: dict, report_dir: str) -> str:
    e = html.escape
    ranks = sample.get("positive_ranks") or []
    shown = ", ".join(str(r) for r in ranks[:8]) + (" …" if len(ranks) > 8 else "")
    out = ['<div class="query">', f'<p class="caption">“{e(sample["caption"])}”</p>',
           f'<p class="meta">query {sample["query_id"]} · person {sample["person_id"]} · '
           f'{len(ranks)} correct images, at ranks {e(shown)}</p><div>']
    if sample.get("image_uri"):
        out.append(f'<div class="truth"><img src="{e(thumbnail(sample["image_uri"], report_dir))}" '
                   f'alt="the image this caption describes" height="{THUMB_HEIGHT}">described image</div>')
    out.append('<ol class="hits" style="display:inline-flex">')
    for hit in sample["hits"]:
        mark, kind = ("✓", "correct") if hit["correct"] else ("✗", "wrong")
        alt = f"rank {hit['rank']}, person {hit['person_id']}, {kind}"
        out.append(f'<li class="{kind}"><img src="{e(thumbnail(hit["image_uri"], report_dir))}" alt="{e(alt)}" '
                   f'title="{e(hit["image_id"])} score {hit["score"]:.3f}" height="{THUMB_HEIGHT}">'
                   f'<span>{hit["rank"]} {mark}</span></li>')
    out.append("</ol></div></div>")
    return "".join(out)


# --------------------------------------------------------------------------- all of it


def write_report(records: list[dict], report_dir: str, metric: str = "R1") -> dict:
    """Write matrix.csv, matrix.md, heatmap-<method>.png and index.html; returns their paths."""
    storage.makedirs(report_dir)
    records = sorted(records, key=lambda r: (r["method"], r["train"], r["test"]))
    if metric not in metric_columns(records):  # e.g. --k 5,10: colour by the first metric there is
        metric = metric_columns(records)[0]
    paths = {"csv": storage.join(report_dir, "matrix.csv"), "markdown": storage.join(report_dir, "matrix.md")}
    write_csv(records, paths["csv"])
    storage.write_bytes_atomic(paths["markdown"], markdown_table(records).encode())
    heatmaps = {}
    for method in dict.fromkeys(r["method"] for r in records):
        name = f"heatmap-{method}.png"
        heatmap_png(records, method, storage.join(report_dir, name), metric)
        heatmaps[method] = name
        paths[f"heatmap-{method}"] = storage.join(report_dir, name)
    paths["html"] = write_html(records, report_dir, heatmaps)
    return paths
