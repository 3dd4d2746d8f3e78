"""`tpr-ray data ...`: make synthetic datasets, turn dataset folders into manifests, inspect them."""

from __future__ import annotations

import posixpath

import click

from .options import cli_errors
from tpr_ray.data import STYLES, load_manifest, manifest_info, read_dataset, split_stats, synthesize, write_manifest
from tpr_ray.data.uris import env_prefixes


def format_stats(stats: dict) -> str:
    """Aligned ids / images / captions per split plus a total line."""
    header = ("split", "ids", "images", "captions")
    rows = [(split, s["ids"], s["images"], s["captions"]) for split, s in stats.items()]
    rows.append(("total", *(sum(row[i] for row in rows) for i in (1, 2, 3))))
    cells = [header] + [(name, *(f"{n:,}" for n in numbers)) for name, *numbers in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(4)]
    return "\n".join(
        "  ".join([row[0].ljust(widths[0])] + [cell.rjust(w) for cell, w in zip(row[1:], widths[1:])]) for row in cells
    )


@click.group("data")
def data():
    """Synthesize, prepare and inspect datasets (CUHK-PEDES, ICFG-PEDES, RSTPReid formats)."""


@data.command("synth")
@click.option("--style", type=click.Choice(STYLES), required=True, help="Which dataset's format and look to imitate.")
@click.option("--ids", "n_ids", type=click.IntRange(min=1), required=True, help="Number of identities.")
@click.option("--seed", type=int, default=0, show_default=True, help="Same seed, same bytes.")
@click.option("--out", "out_dir", required=True, metavar="DIR", help="New or empty folder (path or URI).")
@cli_errors
def synth_command(style, n_ids, seed, out_dir):
    """Write a synthetic dataset in a real dataset's on-disk format."""
    synthesize(style, n_ids, seed, out_dir)
    click.echo(f"wrote a synthetic {style} dataset to {out_dir}")
    click.echo(format_stats(split_stats(read_dataset(out_dir, fmt=style))))


@data.command("prepare")
@click.argument("data_uri", metavar="DATA")
@click.option("--out", "out_uri", required=True, metavar="FILE", help="Manifest to write (.parquet, path or URI).")
@click.option("--skip-bad", is_flag=True, help="Leave out bad entries (listed in the rejects file) instead of failing.")
@click.option("--rejects", "rejects_uri", metavar="FILE",
              help="Where --skip-bad lists the bad entries (.parquet or JSON lines) [default: next to --out].")
@click.option("--check-images", is_flag=True,
              help="Also decode every image (in parallel; as Ray tasks above 20,000 images) and list the "
                   "unreadable ones. Without it, only that each image file exists is checked.")
@click.option("--address", help="Ray cluster for --check-images on large datasets (default: RAY_ADDRESS, else local).")
@cli_errors
def prepare_command(data_uri, out_uri, skip_bad, rejects_uri, check_images, address):
    """Read the dataset folder DATA (format auto-detected) and write its manifest.

    Entries whose image file is missing (or, with --check-images, does not decode) are bad
    entries: the command lists them and fails, or leaves them out with --skip-bad.
    """
    if rejects_uri and not skip_bad:
        raise click.UsageError("--rejects only applies with --skip-bad")
    if skip_bad and not rejects_uri:
        rejects_uri = posixpath.splitext(out_uri)[0] + ".rejects.jsonl"
    table = read_dataset(data_uri, on_error="skip" if skip_bad else "raise", rejects_uri=rejects_uri,
                         check="decode" if check_images else "exists", address=address)
    write_manifest(table, out_uri)
    info = manifest_info(table)
    click.echo(f"wrote {table.num_rows:,} images of {info['dataset']} to {out_uri}")
    click.echo(format_stats(split_stats(table)))
    if skip_bad:
        click.echo(f"rejected {info['rejected']:,} entries, listed in {rejects_uri}")


@data.command("stats")
@click.argument("data_uri", metavar="DATA")
@click.option("--skip-bad", is_flag=True, help="Count only good entries of a dataset folder instead of failing.")
@click.option("--allow-uri-prefix", "allow_uri_prefixes", multiple=True, metavar="PREFIX",
              help="Also accept manifest images under PREFIX (by default only the dataset's own imgs/ folder).")
@cli_errors
def stats_command(data_uri, skip_bad, allow_uri_prefixes):
    """Identities, images and captions per split of a dataset folder or manifest DATA."""
    table = load_manifest(data_uri, on_error="skip" if skip_bad else "raise",
                          allow_uri_prefixes=[*env_prefixes(), *allow_uri_prefixes])
    click.echo(format_stats(split_stats(table)))
    rejected = manifest_info(table).get("rejected")
    if rejected:
        click.echo(f"skipped {rejected:,} bad entries")
