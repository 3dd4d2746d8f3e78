"""`tpr-ray`: the command-line front end. Commands parse options and call the library."""

from __future__ import annotations

import functools
import logging
import os

import click

import tpr_ray
from .checks import ExistingUri, model_and_weights
from .crosseval import crosseval
from .data import data
from .evaluate import eval_command
from .reproduce import reproduce
from .options import (CONTEXT_SETTINGS, OneLineGroup, address_option, cli_errors, collect_overrides,
                         is_verbose, method_names, mlflow_option, parse_size, recipe_options, set_verbose, top_option,
                         train_resource_options)
from tpr_ray.errors import TprRayError


@click.group(cls=OneLineGroup, context_settings=CONTEXT_SETTINGS)
@click.version_option(tpr_ray.__version__, "--version", prog_name="tpr-ray")
@click.option("-v", "--verbose", is_flag=True,
              help="Show everything: the project's debug lines, Ray's logs, tracebacks.")
def cli(verbose):
    """Text-based person retrieval on Ray: train, embed, index, search and evaluate.

    \b
    Try it:  tpr-ray demo        (synthetic data, tiny model, a few minutes on CPU)
    Then:    tpr-ray COMMAND -h  (every command's options, with an example)
    """
    set_verbose(verbose)
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    # The project's own progress lines are INFO; -v adds its DEBUG lines.
    logging.getLogger("tpr_ray").setLevel(logging.DEBUG if verbose else logging.INFO)


cli.add_command(data)
cli.add_command(eval_command)
cli.add_command(crosseval)
cli.add_command(reproduce)


@cli.command()
@click.option("--method", required=True, help=f"One of: {', '.join(method_names())} (see `tpr-ray methods`).")
@click.option("--data", "data_uri", required=True, type=ExistingUri(),
              help="Dataset root (CUHK-PEDES, ICFG-PEDES, RSTPReid layout) or manifest .parquet; local path or URI.")
@click.option("--out", required=True, help="Ray Train storage: local folder or s3://bucket/prefix.")
@click.option("--name", help="Run name (default METHOD-DATASET); the run lives in OUT/NAME.")
@click.option("--model", default="ViT-B-16", show_default=True, help="open_clip architecture (tpr-tiny for tests).")
@click.option("--pretrained", default="openai", show_default=True,
              help="open_clip pretrained tag, local checkpoint file, or 'none'.")
@click.option("--image-size", default="384x128", show_default=True, help="Input H x W.")
@recipe_options
@train_resource_options
@click.option("--max-steps", type=click.IntRange(min=1), help="Stop after this many optimizer steps (smoke runs).")
@click.option("--seed", default=0, show_default=True)
@click.option("--resume", is_flag=True, help="Continue the run OUT/NAME from its latest checkpoint.")
@click.option("--init", "init_from", help="Start from this checkpoint's weights (same method), e.g. a PD stage-1 run.")
@click.option("--stage", type=click.IntRange(min=1), default=1, show_default=True,
              help="Stage to begin with (PD: --stage 2 --init STAGE1).")
@click.option("--max-failures", type=click.IntRange(min=0), default=0, show_default=True,
              help="Worker failures Ray Train recovers from.")
@click.option("--bad-images", type=click.Choice(["fail", "skip", "off"]), default="fail", show_default=True,
              help="Images that cannot be decoded (checked before training): stop and list them, leave them out, "
                   "or do not check.")
@mlflow_option
@click.option("--decoded-cache", metavar="auto|DIR",
              help="Decode the train split once (Ray Data) into a uint8 crop cache in DIR (local or s3://; 'auto': "
                   "beside the manifest) and augment whole batches on the training device.")
@click.option("--decoded-stream", is_flag=True,
              help="With --decoded-cache: stream the cache through Ray Data instead of holding it in each worker's "
                   "memory (datasets larger than a node).")
@click.option("--grad-checkpointing", is_flag=True,
              help="Recompute activations in backward: less GPU memory for large batches.")
@address_option
@cli_errors
def train(method, data_uri, out, name, model, pretrained, image_size, epochs, batch_size, lr, sets, workers,
          cpus_per_worker, gpu, loader_workers, max_steps, seed, resume, init_from, stage, max_failures, bad_images,
          mlflow_uri, decoded_cache, decoded_stream, grad_checkpointing, address):
    """Train a method with Ray Train; prints the best checkpoint (selected on val).

    Watch it with `tensorboard --logdir OUT` (event files in OUT/NAME/tensorboard)."""
    from tpr_ray.methods import get_method
    from tpr_ray.training.config import TrainConfig
    from tpr_ray.training.driver import train as run_training

    overrides = collect_overrides(sets, epochs, batch_size, lr)
    get_method(method).default_recipe.override(**overrides)  # a typo fails before weights are looked for
    pretrained = None if pretrained.lower() == "none" else pretrained
    model_and_weights(model, pretrained)
    cfg = TrainConfig(method=method, data=data_uri, out=out, name=name, model=model,
                      pretrained=pretrained,
                      image_size=parse_size(image_size), overrides=overrides, num_workers=workers, use_gpu=gpu,
                      cpus_per_worker=cpus_per_worker, loader_workers=loader_workers, max_steps=max_steps,
                      seed=seed, resume=resume, init=init_from, start_stage=stage - 1,
                      max_failures=max_failures, bad_images=bad_images, mlflow=mlflow_uri,
                      grad_checkpointing=grad_checkpointing, decoded_cache=decoded_cache,
                      decoded_stream=decoded_stream)
    result = run_training(cfg, address=address)
    click.echo(f"run: {result.run_dir}")
    val_r1 = result.best_metrics.get("val_R1", float("nan"))
    click.echo(f"best checkpoint (val R1 {val_r1:.2f}): {result.best_checkpoint}")


@cli.command()
@click.option("--checkpoint", required=True, type=ExistingUri(),
              help="Checkpoint directory, or a training run directory (uses its best).")
@click.option("--data", "data_uri", type=ExistingUri(),
              help="Dataset root or manifest .parquet (embeds --split and its captions).")
@click.option("--images", help="Or: a prefix or glob of image files, e.g. 's3://bucket/crops/**/*.jpg', or a "
                                "Parquet listing of them (image_uri [, image_id, person_id]; streamed, for "
                                "galleries too large to list).")
@click.option("--split", default="test", show_default=True, type=click.Choice(["train", "val", "test", "all"]))
@click.option("--out", required=True, help="Output folder or URI; gets gallery/ (and queries/).")
@click.option("--batch-size", type=int, help="Rows per model call (default 256 on GPU, 64 on CPU).")
@click.option("--actors", type=click.IntRange(min=1), default=1, show_default=True,
              help="Model actors (one GPU each when GPUs are used).")
@click.option("--gpus-per-actor", type=float, help="Default: 1 when the cluster has GPUs, else 0.")
@click.option("--cpus-per-actor", default=0.5, show_default=True)
@click.option("--decode-cpus", default=0.5, show_default=True, help="CPUs reserved per decode task.")
@click.option("--rows-per-shard", default=10_000, show_default=True)
@click.option("--queries/--no-queries", default=True, show_default=True, help="Also embed the split's captions.")
@click.option("--max-reject-rate", default=0.01, show_default=True,
              help="Stop once more than this fraction of the images are unreadable.")
@click.option("--stall-minutes", type=click.FloatRange(min=0), default=10.0, show_default=True,
              help="Warn with what Ray is waiting for when no shard is committed for this long (0: never).")
@click.option("--endpoint-url", is_eager=True, callback=lambda ctx, param, value: set_endpoint(value),
              help="S3-compatible endpoint (MinIO, Ceph); same as AWS_ENDPOINT_URL.")
@click.option("--allow-uri-prefix", "allow_uri_prefixes", multiple=True, metavar="PREFIX",
              help="Also accept images of a manifest or listing under PREFIX (by default only under the folder the "
                   "manifest or listing is in; also TPR_RAY_ALLOW_URI_PREFIX).")
@address_option
@cli_errors
def embed(checkpoint, data_uri, images, split, out, batch_size, actors, gpus_per_actor, cpus_per_actor, decode_cpus,
          rows_per_shard, queries, max_reject_rate, stall_minutes, endpoint_url, allow_uri_prefixes, address):
    """Embed a gallery (and captions) into sharded Parquet tables with Ray Data; re-run to resume."""
    from tpr_ray.data.uris import env_prefixes
    from tpr_ray.embedding.pipeline import EmbedConfig, embed as run_embed

    summary = run_embed(EmbedConfig(checkpoint=checkpoint, data=data_uri, images=images, out=out, split=split,
                                    batch_size=batch_size, actors=actors, gpus_per_actor=gpus_per_actor,
                                    cpus_per_actor=cpus_per_actor, decode_cpus=decode_cpus,
                                    rows_per_shard=rows_per_shard, queries=queries,
                                    max_reject_rate=max_reject_rate, stall_minutes=stall_minutes,
                                    allow_uri_prefixes=(*env_prefixes(), *allow_uri_prefixes)), address=address)
    for kind, info in summary.items():
        rate = info["rows_this_run"] / info["seconds"] if info["rows_this_run"] else 0.0
        click.echo(f"{kind}: {info['rows']} rows in {len(info['shards'])} shard(s), {info['rejected']} rejected, "
                   f"dim {info['dim']}; this run {info['rows_this_run']} rows at {rate:.1f}/s -> {out}/{kind}")


def set_endpoint(endpoint_url: str | None) -> None:
    """Point S3 clients (driver and the Ray workers it starts) at an S3-compatible store."""
    if endpoint_url:
        import os

        os.environ["AWS_ENDPOINT_URL"] = endpoint_url


@cli.group(cls=OneLineGroup)
def index():
    """Build faiss indexes over embedding shards."""


@index.command("build")
@click.option("--embeddings", required=True, type=ExistingUri(),
              help="Output of `tpr-ray embed` (or its gallery/ folder).")
@click.option("--out", required=True, help="Index folder (local or URI).")
@click.option("--kind", type=click.Choice(["flat", "ivf", "hnsw", "ivfpq"]), default="flat", show_default=True,
              help="flat = exact; ivf / hnsw = approximate, in memory; ivfpq = approximate, built shard by shard "
                   "on Ray and searched memory-mapped, for galleries larger than memory (recall vs exact is measured).")
@click.option("--nlist", type=int, help="IVF cells (default: ivf about 4 sqrt(N); ivfpq the power of two below it).")
@click.option("--nprobe", default=32, show_default=True, help="IVF cells searched per query.")
@click.option("--memory-budget", default="4G", show_default=True,
              help="ivfpq: the most the index may take (codes, ids, centroids), e.g. 512M, 16G; PQ m is chosen to fit.")
@click.option("--opq", is_flag=True, help="ivfpq: learn a rotation before PQ (better recall, slower training).")
@click.option("--allow-incomplete", is_flag=True, help="Index a gallery whose embedding job has not finished.")
@click.option("--overwrite", is_flag=True, help="Replace the index already in OUT (the switch is atomic).")
@cli_errors
def index_build(embeddings, out, kind, nlist, nprobe, memory_budget, opq, allow_incomplete, overwrite):
    """Index a gallery embedding table. An ivfpq build that stopped continues where it stopped when re-run."""
    from tpr_ray.index.faiss_index import build_index
    from tpr_ray.tables import table_dir

    embeddings = table_dir(embeddings, "gallery")
    info = build_index(embeddings, out, kind=kind, nlist=nlist, nprobe=nprobe, allow_incomplete=allow_incomplete,
                       overwrite=overwrite, memory_budget=memory_budget, opq=opq)
    recall = {k: v for k, v in info.items() if k.startswith("recall")}
    click.echo(f"{kind} index of {info['ntotal']:,} x {info['dim']} vectors -> {out} in {info['seconds']:.1f}s"
               + "".join(f"; {k} {v:.4f}" for k, v in recall.items()))


@cli.command("search")
@click.argument("texts", nargs=-1)
@click.option("--index", "index_dir", required=True, type=ExistingUri(),
              help="Folder written by `tpr-ray index build`.")
@top_option
@click.option("--checkpoint", help="Default: the checkpoint that produced the indexed embeddings.")
@click.option("--allow-other-checkpoint", is_flag=True, help="Embed queries with a checkpoint other than the index's.")
@click.option("--interactive", "-i", is_flag=True, help="Read one query per line from stdin (model loaded once).")
@click.option("--json", "json_out", help="Also write the results as JSON here.")
@cli_errors
def search_command(texts, index_dir, top, checkpoint, allow_other_checkpoint, interactive, json_out):
    """Rank the indexed gallery for each text description (given, or one per line on stdin)."""
    import sys

    from tpr_ray.io import storage
    from tpr_ray.index.faiss_index import Searcher, check_queries

    check_queries(texts)  # before the index and the model load
    if texts and interactive:
        raise click.UsageError("give query texts or --interactive, not both")
    if not texts and not interactive and sys.stdin.isatty():
        raise click.UsageError("give one or more query texts, or --interactive (queries read from stdin)")
    searcher = Searcher(index_dir, checkpoint, allow_other_checkpoint)
    # Without texts, queries come from stdin one per line, each answered as it arrives.
    batches = [list(texts)] if texts else ([line.strip()] for line in click.get_text_stream("stdin") if line.strip())
    texts, results = [], []
    for batch in batches:
        for text, hits in zip(batch, searcher.search(batch, top)):
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
@click.option("--ids", type=click.IntRange(min=2), default=200, show_default=True, help="Synthetic identities.")
@click.option("--epochs", type=click.IntRange(min=1), default=20, show_default=True)
@click.option("--seed", default=0, show_default=True)
@cli_errors
def demo(out, ids, epochs, seed):
    """Synthesize data, train the baseline (tiny CLIP), embed and evaluate, on CPU in minutes."""
    from tpr_ray.workflows.demo import run_demo

    run_demo(out, n_ids=ids, epochs=epochs, seed=seed, echo=click.echo)


@cli.command()
def methods():
    """List the available methods and their default recipes."""
    from tpr_ray.methods import get_method

    for name in method_names():
        try:
            cls = get_method(name)
        except TprRayError as error:
            click.echo(f"{name}: not available ({error})")
            continue
        click.echo(f"{name}: {cls.__doc__.strip().splitlines()[0]}")
        click.echo("    " + ", ".join(f"{k}={v}" for k, v in cls.default_recipe.to_dict().items()))


EXAMPLES = {
    "train": "tpr-ray train --method pd --data /data/CUHK-PEDES --out runs --epochs 60 --gpu",
    "embed": "tpr-ray embed --checkpoint runs/pd-CUHK-PEDES --data /data/CUHK-PEDES --out emb/cuhk",
    "eval": "tpr-ray eval --embeddings emb/cuhk --k 1,5,10 --out emb/cuhk/metrics.json",
    "index": "tpr-ray index build --embeddings emb/cuhk --out idx/cuhk",
    "index build": "tpr-ray index build --embeddings emb/cuhk --out idx/cuhk --kind hnsw",
    "search": 'tpr-ray search --index idx/cuhk --top 5 "a woman in a red coat with a black backpack"',
    "crosseval": "tpr-ray crosseval --methods baseline,pd --train cuhk,icfg --test cuhk,icfg,rstp --out xeval",
    "demo": "tpr-ray demo --out demo_out",
    "methods": "tpr-ray methods",
    "data": "tpr-ray data synth --style cuhk --ids 50 --out data/cuhk-synth",
    "data synth": "tpr-ray data synth --style icfg --ids 100 --seed 1 --out data/icfg-synth",
    "data prepare": "tpr-ray data prepare /data/CUHK-PEDES --out /data/cuhk.parquet --skip-bad",
    "data stats": "tpr-ray data stats /data/cuhk.parquet",
}


# Commands whose --out is a folder of their own get their log file there; the others (whose
# --out may have to be new, or is a file) log to a folder in the system's temp directory.
LOG_IN_OUT = {"train", "embed", "demo", "crosseval"}


def _log_file(path: str, params: dict) -> str:
    import getpass
    import tempfile

    from tpr_ray.io import storage
    name = "tpr-ray-" + path.replace(" ", "-") + ".log"
    out = params.get("out")
    if path in LOG_IN_OUT and out and not storage.is_remote(out):
        return os.path.join(os.path.abspath(out), name)
    return os.path.join(tempfile.gettempdir(), f"tpr-ray-{getpass.getuser()}", name)


def _quiet(callback, path: str):
    """Unless -v: Ray's, Ray Train's, Ray Data's and open_clip's lines go to a log file."""

    @functools.wraps(callback)
    def run(*args, **kwargs):
        if not is_verbose():
            from tpr_ray.io.cluster import quiet_console

            quiet_console(_log_file(path, kwargs))
        return callback(*args, **kwargs)

    return run


def _polish(command: click.Command, path: str = "") -> None:
    """-h and an example for every command, including those defined in other modules; a quiet
    console for every command that does work."""
    command.context_settings = {**CONTEXT_SETTINGS, **command.context_settings}
    if path in EXAMPLES and not command.epilog:
        command.epilog = f"\b\nExample:\n  {EXAMPLES[path]}"
    subcommands = getattr(command, "commands", None)
    if subcommands is None and command.callback is not None and path != "methods":
        command.callback = _quiet(command.callback, path)
    for name, sub in (subcommands or {}).items():
        _polish(sub, f"{path} {name}".strip())


_polish(cli)

if __name__ == "__main__":
    cli()
