"""`tpr-ray crosseval`: the methods x training sets x test sets matrix, with a report."""

from __future__ import annotations

import click

from .options import (address_option, block_size_option, cli_errors, collect_overrides, ks_option, method_names,
                      mlflow_option, parse_size, recipe_options, train_resource_options)


def _names(value: str) -> tuple[str, ...]:
    names = tuple(part.strip() for part in value.split(",") if part.strip())
    if not names:
        raise click.BadParameter("give at least one name")
    return names


@click.command("crosseval")
@click.option("--methods", default="baseline", show_default=True, callback=lambda c, p, v: _names(v),
              help=f"Comma-separated methods ({', '.join(method_names())}).")
@click.option("--train", "train_sets", default="cuhk,icfg,rstp", show_default=True,
              callback=lambda c, p, v: _names(v),
              help="Training sets: registry names, built-in synthetic names (cuhk, icfg, rstp) or folders/URIs.")
@click.option("--test", "test_sets", default="cuhk,icfg,rstp", show_default=True, callback=lambda c, p, v: _names(v),
              help="Test sets (their test split), named like --train.")
@click.option("--out", default="crosseval_out", show_default=True,
              help="Output folder or URI: runs, embeddings, cells/*.json and report/.")
@click.option("--registry", help='Dataset registry JSON: {"datasets": {"cuhk": {"root": "/data/CUHK-PEDES"}, ...}}.')
@click.option("--model", help="open_clip architecture (default: tpr-tiny when every training set is synthetic, "
                               "else ViT-B-16).")
@click.option("--pretrained", default="default", show_default=True,
              help="open_clip tag, local file or 'none' (default: none for tpr-tiny, else openai).")
@click.option("--image-size", default="384x128", show_default=True, help="Input H x W.")
@recipe_options
@click.option("--max-steps", type=click.IntRange(min=1), help="Stop each training after this many steps (smoke runs).")
@train_resource_options
@click.option("--ids", type=click.IntRange(min=2), default=200, show_default=True,
              help="Identities of each built-in synthetic dataset.")
@click.option("--seed", default=0, show_default=True)
@ks_option
@click.option("--top", "top_k", type=click.IntRange(min=1), default=10, show_default=True,
              help="Retrieved images shown per sample query.")
@click.option("--samples", type=click.IntRange(min=0), default=6, show_default=True,
              help="Sample queries per cell in the HTML report.")
@block_size_option
@click.option("--rows-per-shard", type=click.IntRange(min=1), default=10_000, show_default=True,
              help="Embedding shard size.")
@click.option("--max-parallel", type=click.IntRange(min=1),
              help="Jobs at a time (default: as many as the cluster's CPUs/GPUs fit).")
@click.option("--allow-uri-prefix", "allow_uri_prefixes", multiple=True, metavar="PREFIX",
              help="Also read manifest images under PREFIX (by default only the dataset's own imgs/ folder).")
@mlflow_option
@address_option
@cli_errors
def crosseval(methods, train_sets, test_sets, out, registry, model, pretrained, image_size, epochs, batch_size, lr,
              sets, max_steps, workers, cpus_per_worker, gpu, loader_workers, ids, seed, ks, top_k, samples,
              block_size, rows_per_shard, max_parallel, allow_uri_prefixes, mlflow_uri, address):
    """Train every method on every training set, test on every test set, report the matrix.

    Finished cells are skipped on a re-run, checkpoints and embeddings of the same
    configuration are reused, and a failing cell is reported with its error while the
    others go on; the exit status is 1 when any cell failed (after the report is written).
    With no dataset options the three built-in synthetic styles are used
    with the tiny model, which finishes on 2 CPU cores in a few minutes.
    """
    from tpr_ray.io import storage
    from tpr_ray.crosseval import CrossEvalConfig, crosseval as run_matrix

    overrides = collect_overrides(sets, epochs, batch_size, lr)
    cfg = CrossEvalConfig(out=out, methods=methods, train=train_sets, test=test_sets, registry=registry, model=model,
                          pretrained=pretrained, image_size=parse_size(image_size), overrides=overrides,
                          max_steps=max_steps, num_workers=workers, cpus_per_worker=cpus_per_worker, use_gpu=gpu,
                          loader_workers=loader_workers, seed=seed, synthetic_ids=ids, ks=ks, top_k=top_k,
                          samples=samples, block_size=block_size, rows_per_shard=rows_per_shard,
                          max_parallel=max_parallel, allow_uri_prefixes=allow_uri_prefixes, mlflow=mlflow_uri)
    result = run_matrix(cfg, address=address)

    counts = result.counts
    click.echo(f"{len(result.cells)} cells: {counts['ok']} evaluated, {counts['skipped']} already done, "
               f"{counts['failed']} failed; {counts['trained']} trained, {counts['reused_checkpoints']} checkpoints "
               f"reused, {counts['embedded']} test sets embedded")
    click.echo(open_text(result.report["markdown"]))
    for cell in result.cells:
        if cell["status"] != "ok":
            error = cell["error"]
            click.echo(f"FAILED {cell['method']} {cell['train']} -> {cell['test']} in {error['stage']}: "
                       f"{error['type']}: {error['message']}")
    click.echo(f"report: {result.report['html']}")
    if counts["failed"]:
        # After the report, so the cells that did finish are there; scripts and CI see the failure.
        click.echo(f"{counts['failed']} of {len(result.cells)} cells failed; their errors are in "
                   f"{storage.join(out, 'cells')} and the report", err=True)
        click.get_current_context().exit(1)


def open_text(uri: str) -> str:
    from tpr_ray.io import storage
    return storage.read_bytes(uri).decode()
