"""`tpr-ray reproduce`: a method's paper recipe on a dataset, compared with the paper."""

from __future__ import annotations

import click

from .options import CONTEXT_SETTINGS, LOADER_WORKERS, address_option, cli_errors, method_names, parse_overrides


@click.command("reproduce", context_settings=CONTEXT_SETTINGS)
@click.option("--method", required=True, type=click.Choice(method_names()), help="Method to reproduce.")
@click.option("--data", "data_uri", help="Dataset folder (CUHK-PEDES, ICFG-PEDES, RSTPReid) or manifest .parquet.")
@click.option("--out", required=True, help="Working folder (local or URI): runs/, embeddings/, reproduce.json.")
@click.option("--smoke", is_flag=True, help="A few steps of the tiny model on synthetic data (unless --data): checks the chain.")
@click.option("--model", default="ViT-B-16", show_default=True, help="open_clip architecture.")
@click.option("--pretrained", default="openai", show_default=True, help="Pretrained tag or local file.")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE", help="Override a recipe option (the paper's by default).")
@click.option("--workers", type=click.IntRange(min=1), default=1, show_default=True, help="Ray Train workers (one GPU each when GPUs are used).")
@click.option("--gpu/--no-gpu", default=None, help="Use GPUs (default: when the cluster has them).")
@click.option("--loader-workers", type=click.IntRange(min=0), default=LOADER_WORKERS, show_default=True, help="DataLoader processes per worker.")
@click.option("--seed", default=0, show_default=True)
@address_option
@cli_errors
def reproduce(method, data_uri, out, smoke, model, pretrained, sets, workers, gpu, loader_workers, seed, address):
    """Train METHOD with its paper's recipe, embed and evaluate the test split, and print the
    result next to the published R@1/R@5/R@10/mAP.

    Example: tpr-ray reproduce --method cskt --data /data/CUHK-PEDES --out repro/cskt-cuhk
    """
    from tpr_ray.workflows.reproduce import ReproduceConfig, reproduce as run

    run(ReproduceConfig(method=method, data=data_uri, out=out, smoke=smoke, model=model,
                        pretrained=None if pretrained.lower() == "none" else pretrained,
                        overrides=parse_overrides(sets), workers=workers, use_gpu=gpu,
                        loader_workers=loader_workers, seed=seed), address=address, echo=click.echo)
