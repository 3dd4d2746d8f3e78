"""`tpr-ray eval`: score query embeddings against gallery embeddings and report metrics."""

from __future__ import annotations

import click

from .options import block_size_option, cli_errors, ks_option
from tpr_ray.io import storage
from tpr_ray.evaluation.evaluate import STREAMING_ABOVE_ROWS, evaluate
from tpr_ray.evaluation.in_memory import format_metrics_table, write_metrics_json


@click.command("eval")
@click.option("--embeddings", "embeddings_dir", metavar="DIR",
              help="Output of `tpr-ray embed`: a folder (or URI) holding gallery/ and queries/.")
@click.option("--gallery", "gallery_uri", metavar="DIR", help="Gallery embedding table (instead of DIR/gallery).")
@click.option("--queries", "queries_uri", metavar="DIR", help="Query embedding table (instead of DIR/queries).")
@click.option("--out", "out_uri", metavar="FILE", help="Write the metrics as JSON here (local path or URI).")
@ks_option
@click.option("--allow-mismatch", is_flag=True,
              help="Evaluate even if gallery and queries come from different models or checkpoints.")
@click.option("--skip-queries-without-positives", is_flag=True,
              help="Leave out queries whose person has no gallery image (otherwise an error).")
@click.option("--allow-incomplete", is_flag=True,
              help="Evaluate tables whose embedding job has not finished (only the shards done so far).")
@block_size_option
@click.option("--streaming/--in-memory", default=None,
              help=f"Stream the gallery shard by shard in bounded memory (default: above {STREAMING_ABOVE_ROWS:,} "
                   "gallery rows); same metrics.")
@click.option("--address", help="With --streaming: run the shard tasks on this Ray cluster ('auto': RAY_ADDRESS).")
@cli_errors
def eval_command(embeddings_dir, gallery_uri, queries_uri, out_uri, ks, allow_mismatch,
                 skip_queries_without_positives, allow_incomplete, block_size, streaming, address):
    """Text-to-image R@K, mAP and mINP of an embedding run (IRRA protocol)."""
    if embeddings_dir is None and (gallery_uri is None or queries_uri is None):
        raise click.UsageError("give --embeddings DIR, or both --gallery and --queries")
    gallery_uri = gallery_uri or storage.join(embeddings_dir, "gallery")
    queries_uri = queries_uri or storage.join(embeddings_dir, "queries")

    mode = "auto" if streaming is None else ("streaming" if streaming else "in-memory")
    metrics = evaluate(gallery_uri, queries_uri, ks, mode=mode, allow_mismatch=allow_mismatch,
                       skip_queries_without_positives=skip_queries_without_positives,
                       allow_incomplete=allow_incomplete, block_size=block_size, address=address)

    skipped = metrics["num_queries_skipped"]
    click.echo(f"gallery {gallery_uri}: {metrics['num_gallery']} images; "
               f"queries {queries_uri}: {metrics['num_queries']} captions"
               + (f" ({skipped} skipped, no positive)" if skipped else ""))
    click.echo(f"method {metrics['method']}, model {metrics['model']}, checkpoint {metrics['checkpoint']}")
    click.echo(format_metrics_table(metrics, chance=metrics["chance"]))
    if out_uri:
        write_metrics_json(metrics, out_uri)
        click.echo(f"wrote {out_uri}")

