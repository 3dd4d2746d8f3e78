"""`tpr-ray eval`: score query embeddings against gallery embeddings and report metrics."""

from __future__ import annotations

import click

from .options import block_size_option, cli_errors, ks_option
from tpr_ray import storage
from tpr_ray.evaluate import evaluate_embeddings, format_metrics_table, write_metrics_json

# Above this many gallery rows `eval` streams the gallery shard by shard (bounded memory)
# unless told otherwise; the in-memory evaluator holds the gallery and a chunk x gallery matrix.
STREAMING_ABOVE_ROWS = 500_000


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

    if streaming is None:
        streaming = _gallery_rows(gallery_uri) > STREAMING_ABOVE_ROWS
    if streaming:
        metrics = _evaluate_streaming(gallery_uri, queries_uri, ks, allow_mismatch, skip_queries_without_positives,
                                      allow_incomplete, block_size, address)
    else:
        metrics = evaluate_embeddings(gallery_uri, queries_uri, ks, allow_mismatch=allow_mismatch,
                                      skip_queries_without_positives=skip_queries_without_positives,
                                      chunk_size=block_size, allow_incomplete=allow_incomplete)

    skipped = metrics["num_queries_skipped"]
    click.echo(f"gallery {gallery_uri}: {metrics['num_gallery']} images; "
               f"queries {queries_uri}: {metrics['num_queries']} captions"
               + (f" ({skipped} skipped, no positive)" if skipped else ""))
    click.echo(f"method {metrics['method']}, model {metrics['model']}, checkpoint {metrics['checkpoint']}")
    click.echo(format_metrics_table(metrics, chance=metrics["chance"]))
    if out_uri:
        write_metrics_json(metrics, out_uri)
        click.echo(f"wrote {out_uri}")


def _gallery_rows(gallery_uri: str) -> int:
    from tpr_ray.tables import check_row_count, list_shards, read_sidecar

    info = read_sidecar(gallery_uri)
    return info["rows"] if "rows" in info else check_row_count({"uri": gallery_uri}, list_shards(gallery_uri))


def _evaluate_streaming(gallery_uri, queries_uri, ks, allow_mismatch, skip, allow_incomplete, block_size,
                        address) -> dict:
    from tpr_ray.streaming_eval import StreamingSettings, evaluate_tables

    if address:
        from tpr_ray.ray_utils import init_ray

        init_ray(None if address == "auto" else address)
    settings = StreamingSettings(ks=ks, block_size=block_size, use_ray=bool(address),
                                 skip_queries_without_positives=skip)
    return evaluate_tables(gallery_uri, queries_uri, settings=settings, allow_mismatch=allow_mismatch,
                           allow_incomplete=allow_incomplete).metrics
