"""`tpr-ray`: the command-line front end. Commands parse options and call the library."""

from __future__ import annotations

import logging

import click

from cli.crosseval import crosseval
from cli.data import data
from cli.evaluate import eval_command
from cli.reproduce import reproduce
from cli.options import clean_errors, parse_overrides, parse_size
from tpr_ray.errors import TprRayError


@click.group()
@click.option("-v", "--verbose", is_flag=True, help="Log at INFO level.")
def cli(verbose):
    """Text-based person retrieval on Ray: train, embed, evaluate."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("tpr_ray").setLevel(logging.INFO)  # shard commits and progress lines


cli.add_command(data)
cli.add_command(eval_command)
cli.add_command(crosseval)
cli.add_command(reproduce)


@cli.command()
@click.option("--method", required=True, help="baseline, cskt, pd or cfine (see `tpr-ray methods`).")
@click.option("--data", "data_uri", required=True, help="Dataset root (CUHK-PEDES, ICFG-PEDES, RSTPReid layout) or manifest .parquet; local path or URI.")
@click.option("--out", required=True, help="Ray Train storage: local folder or s3://bucket/prefix.")
@click.option("--name", help="Run name (default METHOD-DATASET); the run lives in OUT/NAME.")
@click.option("--model", default="ViT-B-16", show_default=True, help="open_clip architecture (tpr-tiny for tests).")
@click.option("--pretrained", default="openai", show_default=True, help="open_clip pretrained tag, local checkpoint file, or 'none'.")
@click.option("--image-size", default="384x128", show_default=True, help="Input H x W.")
@click.option("--epochs", type=int, help="Override the recipe's epochs.")
@click.option("--batch-size", type=int, help="Override the recipe's per-worker batch size.")
@click.option("--lr", type=float, help="Override the recipe's base learning rate.")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE", help="Override any recipe option, e.g. --set warmup_epochs=1.")
@click.option("--workers", default=1, show_default=True, help="Ray Train workers (one GPU each when GPUs are used).")
@click.option("--gpu/--no-gpu", default=None, help="Use GPUs (default: when the cluster has them).")
@click.option("--cpus-per-worker", default=1.0, show_default=True)
@click.option("--loader-workers", default=2, show_default=True, help="DataLoader processes per worker.")
@click.option("--max-steps", type=int, help="Stop after this many optimizer steps (smoke runs).")
@click.option("--seed", default=0, show_default=True)
@click.option("--resume", is_flag=True, help="Continue the run OUT/NAME from its latest checkpoint.")
@click.option("--init", "init_from", help="Start from this checkpoint's weights (same method), e.g. a PD stage-1 run.")
@click.option("--stage", type=int, default=1, show_default=True, help="Stage to begin with (PD: --stage 2 --init STAGE1).")
@click.option("--max-failures", default=0, show_default=True, help="Worker failures Ray Train recovers from.")
@click.option("--bad-images", type=click.Choice(["fail", "skip", "off"]), default="fail", show_default=True,
              help="Images that cannot be decoded (checked before training): stop and list them, leave them out, or do not check.")
@click.option("--mlflow", "mlflow_uri", metavar="URI", help="Also log params, metrics and the best checkpoint to this MLflow "
              "tracking URI (default: MLFLOW_TRACKING_URI; needs `pip install mlflow`). TensorBoard files are always in OUT/NAME/tensorboard.")
@click.option("--decoded-cache", metavar="auto|DIR", help="Decode the train split once (Ray Data) into a uint8 crop cache "
              "in DIR (local or s3://; 'auto': beside the manifest) and augment whole batches on the training device.")
@click.option("--decoded-stream", is_flag=True, help="With --decoded-cache: stream the cache through Ray Data instead "
              "of holding it in each worker's memory (datasets larger than a node).")
@click.option("--grad-checkpointing", is_flag=True, help="Recompute activations in backward: less GPU memory for large batches.")
@click.option("--address", help="Ray cluster address (default: RAY_ADDRESS, else a local cluster).")
@clean_errors
def train(method, data_uri, out, name, model, pretrained, image_size, epochs, batch_size, lr, sets, workers, gpu,
          cpus_per_worker, loader_workers, max_steps, seed, resume, init_from, stage, max_failures, bad_images, mlflow_uri, decoded_cache, decoded_stream, grad_checkpointing,
          address):
    """Train a method with Ray Train; prints the best checkpoint (selected on val).

    Watch it with `tensorboard --logdir OUT` (event files in OUT/NAME/tensorboard)."""
    from tpr_ray.train import TrainConfig, train as run_training

    overrides = parse_overrides(sets)
    for key, value in (("epochs", epochs), ("batch_size", batch_size), ("lr", lr)):
        if value is not None:
            overrides[key] = value
    cfg = TrainConfig(method=method, data=data_uri, out=out, name=name, model=model,
                      pretrained=None if pretrained.lower() == "none" else pretrained,
                      image_size=parse_size(image_size), overrides=overrides, num_workers=workers, use_gpu=gpu,
                      cpus_per_worker=cpus_per_worker, loader_workers=loader_workers, max_steps=max_steps,
                      seed=seed, resume=resume, init=init_from, start_stage=stage - 1,
                      max_failures=max_failures, bad_images=bad_images, mlflow=mlflow_uri,
                      grad_checkpointing=grad_checkpointing, decoded_cache=decoded_cache,
                      decoded_stream=decoded_stream)
    result = run_training(cfg, address=address)
    click.echo(f"run: {result.run_dir}")
    click.echo(f"best checkpoint (val R1 {result.best_metrics.get('val_R1', float('nan')):.2f}): {result.best_checkpoint}")


@cli.command()
@click.option("--checkpoint", required=True, help="Checkpoint directory, or a training run directory (uses its best).")
@click.option("--data", "data_uri", help="Dataset root or manifest .parquet (embeds --split and its captions).")
@click.option("--images", help="Or: a prefix or glob of image files, e.g. 's3://bucket/crops/**/*.jpg'.")
@click.option("--split", default="test", show_default=True, type=click.Choice(["train", "val", "test", "all"]))
@click.option("--out", required=True, help="Output folder or URI; gets gallery/ (and queries/).")
@click.option("--batch-size", type=int, help="Rows per model call (default 256 on GPU, 64 on CPU).")
@click.option("--actors", default=1, show_default=True, help="Model actors (one GPU each when GPUs are used).")
@click.option("--gpus-per-actor", type=float, help="Default: 1 when the cluster has GPUs, else 0.")
@click.option("--cpus-per-actor", default=0.5, show_default=True)
@click.option("--decode-cpus", default=0.5, show_default=True, help="CPUs reserved per decode task.")
@click.option("--rows-per-shard", default=10_000, show_default=True)
@click.option("--queries/--no-queries", default=True, show_default=True, help="Also embed the split's captions.")
@click.option("--max-reject-rate", default=0.01, show_default=True,
              help="Stop once more than this fraction of the images are unreadable.")
@click.option("--endpoint-url", help="S3-compatible endpoint (MinIO, Ceph); same as AWS_ENDPOINT_URL.")
@click.option("--address", help="Ray cluster address (default: RAY_ADDRESS, else a local cluster).")
@clean_errors
def embed(checkpoint, data_uri, images, split, out, batch_size, actors, gpus_per_actor, cpus_per_actor, decode_cpus,
          rows_per_shard, queries, max_reject_rate, endpoint_url, address):
    """Embed a gallery (and captions) into sharded Parquet tables with Ray Data; re-run to resume."""
    from tpr_ray.embed import EmbedConfig, embed as run_embed

    set_endpoint(endpoint_url)
    summary = run_embed(EmbedConfig(checkpoint=checkpoint, data=data_uri, images=images, out=out, split=split,
                                    batch_size=batch_size, actors=actors, gpus_per_actor=gpus_per_actor,
                                    cpus_per_actor=cpus_per_actor, decode_cpus=decode_cpus,
                                    rows_per_shard=rows_per_shard, queries=queries,
                                    max_reject_rate=max_reject_rate), address=address)
    for kind, info in summary.items():
        rate = info["rows_this_run"] / info["seconds"] if info["rows_this_run"] else 0.0
        click.echo(f"{kind}: {info['rows']} rows in {len(info['shards'])} shard(s), {info['rejected']} rejected, "
                   f"dim {info['dim']}; this run {info['rows_this_run']} rows at {rate:.1f}/s -> {out}/{kind}")


def set_endpoint(endpoint_url: str | None) -> None:
    """Point S3 clients (driver and the Ray workers it starts) at an S3-compatible store."""
    if endpoint_url:
        import os

        os.environ["AWS_ENDPOINT_URL"] = endpoint_url


@cli.group()
def index():
    """Build faiss indexes over embedding shards."""


@index.command("build")
@click.option("--embeddings", required=True, help="Output of `tpr-ray embed` (or its gallery/ folder).")
@click.option("--out", required=True, help="Index folder (local or URI).")
@click.option("--kind", type=click.Choice(["flat", "ivf", "hnsw"]), default="flat", show_default=True,
              help="flat = exact; ivf / hnsw = approximate, for large galleries (recall vs exact is measured).")
@click.option("--nlist", type=int, help="IVF cells (default about 4 sqrt(N)).")
@click.option("--nprobe", default=32, show_default=True, help="IVF cells searched per query.")
@click.option("--allow-incomplete", is_flag=True, help="Index a gallery whose embedding job has not finished.")
@click.option("--overwrite", is_flag=True, help="Replace the index already in OUT (the switch is atomic).")
@clean_errors
def index_build(embeddings, out, kind, nlist, nprobe, allow_incomplete, overwrite):
    """Index a gallery embedding table."""
    from tpr_ray.index import build_index
    from tpr_ray.tables import table_dir

    embeddings = table_dir(embeddings, "gallery")
    info = build_index(embeddings, out, kind=kind, nlist=nlist, nprobe=nprobe, allow_incomplete=allow_incomplete,
                       overwrite=overwrite)
    recall = {k: v for k, v in info.items() if k.startswith("recall")}
    click.echo(f"{kind} index of {info['ntotal']:,} x {info['dim']} vectors -> {out} in {info['seconds']:.1f}s"
               + "".join(f"; {k} {v:.4f}" for k, v in recall.items()))


@cli.command("search")
@click.argument("texts", nargs=-1)
@click.option("--index", "index_dir", required=True, help="Folder written by `tpr-ray index build`.")
@click.option("--k", default=10, show_default=True, type=click.IntRange(min=1))
@click.option("--checkpoint", help="Default: the checkpoint that produced the indexed embeddings.")
@click.option("--allow-other-checkpoint", is_flag=True, help="Embed queries with a checkpoint other than the index's.")
@click.option("--interactive", "-i", is_flag=True, help="Read one query per line from stdin (model loaded once).")
@click.option("--json", "json_out", help="Also write the results as JSON here.")
@clean_errors
def search_command(texts, index_dir, k, checkpoint, allow_other_checkpoint, interactive, json_out):
    """Rank the indexed gallery for each text description (given, or one per line on stdin)."""
    import sys

    from tpr_ray import storage
    from tpr_ray.index import Searcher

    if texts and interactive:
        raise click.UsageError("give query texts or --interactive, not both")
    if not texts and not interactive and sys.stdin.isatty():
        raise click.UsageError("give one or more query texts, or --interactive (queries read from stdin)")
    searcher = Searcher(index_dir, checkpoint, allow_other_checkpoint)
    # Without texts, queries come from stdin one per line, each answered as it arrives.
    batches = [list(texts)] if texts else ([line.strip()] for line in click.get_text_stream("stdin") if line.strip())
    texts, results = [], []
    for batch in batches:
        for text, hits in zip(batch, searcher.search(batch, k)):
            texts.append(text)
            results.append(hits)
            click.echo(f"query: {text}")
            for hit in hits:
                click.echo(f"  {hit['rank']:>3}  {hit['score']:.4f}  {hit.get('image_uri') or hit.get('image_id')}")
    if json_out:
        storage.write_json(json_out, [{"query": t, "results": h} for t, h in zip(texts, results)])
        click.echo(f"wrote {json_out}")


@cli.command()
@click.option("--out", default="demo_out", show_default=True, help="Working folder for data, run and embeddings.")
@click.option("--ids", default=200, show_default=True, help="Synthetic identities.")
@click.option("--epochs", default=20, show_default=True)
@click.option("--seed", default=0, show_default=True)
@clean_errors
def demo(out, ids, epochs, seed):
    """Synthesize data, train the baseline (tiny CLIP), embed and evaluate, on CPU in minutes."""
    from tpr_ray.demo import run_demo

    run_demo(out, n_ids=ids, epochs=epochs, seed=seed, echo=click.echo)


@cli.command()
def methods():
    """List the available methods and their default recipes."""
    from tpr_ray.methods import METHODS, get_method

    for name in METHODS:
        try:
            cls = get_method(name)
        except TprRayError as error:
            click.echo(f"{name}: not available ({error})")
            continue
        click.echo(f"{name}: {cls.__doc__.strip().splitlines()[0]}")
        click.echo("    " + ", ".join(f"{k}={v}" for k, v in cls.default_recipe.to_dict().items()))


if __name__ == "__main__":
    cli()
