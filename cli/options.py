"""What every command shares: option groups (one definition, one default), the error decorator,
and the one-line error display.

A user mistake ends the command with one line on stderr, the project's own message, and a
non-zero exit code; the traceback appears only with ``-v`` (or TPR_RAY_VERBOSE=1).
"""

from __future__ import annotations

import functools
import os
import sys

import click

from tpr_ray.errors import TprRayError

CONTEXT_SETTINGS = {"help_option_names": ["-h", "--help"], "max_content_width": 110}
LOADER_WORKERS = 2  # DataLoader processes per training worker, in train and crosseval alike
BLOCK_SIZE = 1024  # queries scored at a time, in eval and crosseval alike


# --- verbosity -------------------------------------------------------------------

def set_verbose(verbose: bool) -> None:
    if verbose:
        os.environ["TPR_RAY_VERBOSE"] = "1"  # Ray workers started from here inherit it


def is_verbose() -> bool:
    return os.environ.get("TPR_RAY_VERBOSE") == "1"


# --- errors ----------------------------------------------------------------------

_CREDENTIAL_ERRORS = ("NoCredentialsError", "PartialCredentialsError", "InvalidAccessKeyId",
                      "SignatureDoesNotMatch", "ExpiredToken", "ExpiredTokenException")


def _causes(error: BaseException):
    """The error and everything it wraps: chained exceptions, Ray task errors (``.cause``) and
    Ray Train's failures per worker (``.worker_failures``), breadth first."""
    queue, seen = [error], set()
    while queue:
        current = queue.pop(0)
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        queue += [getattr(current, "cause", None), current.__cause__, current.__context__]
        failures = getattr(current, "worker_failures", None)
        if isinstance(failures, dict):
            queue += list(failures.values())


def _is_ray_wrapper(error: BaseException) -> bool:
    # ray.get re-raises a task's DataError as a class deriving from both RayTaskError and
    # DataError, whose text is the remote traceback; its ``.cause`` is the original.
    return any(cls.__name__ == "RayTaskError" for cls in type(error).__mro__)


def one_line(text: str) -> str:
    return " ".join(part.strip() for part in str(text).strip().splitlines() if part.strip())


def describe(error: BaseException) -> str:
    """The one line a user sees for ``error``."""
    causes = list(_causes(error))
    for cause in causes:
        if isinstance(cause, TprRayError) and not _is_ray_wrapper(cause):
            return one_line(cause)
    for cause in causes:
        if type(cause).__name__ in _CREDENTIAL_ERRORS or "InvalidAccessKeyId" in str(cause)[:300]:
            return ("object storage refused the request (missing or invalid credentials): set AWS_PROFILE or "
                    "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, and for MinIO / Ceph also --endpoint-url or "
                    "AWS_ENDPOINT_URL")
    innermost = causes[-1] if causes else error
    return f"{type(innermost).__name__}: {one_line(innermost)[:300]} (run with -v for the traceback)"


INTERRUPTED_EXIT_CODE = 130  # 128 + SIGINT, what a shell reports for Ctrl-C
RERUN_TO_CONTINUE = "rerun the same command to continue"
# How each long command continues after Ctrl-C (by the function's name); others just stop.
HOW_TO_CONTINUE = {"train": "rerun the same command with --resume", "embed": RERUN_TO_CONTINUE,
                   "index_build": RERUN_TO_CONTINUE, "crosseval": RERUN_TO_CONTINUE,
                   "reproduce": RERUN_TO_CONTINUE}


class Interrupted(click.ClickException):
    """Ctrl-C: one line that says how to continue, exit code 130."""

    exit_code = INTERRUPTED_EXIT_CODE

    def __init__(self, how_to_continue: str | None = None):
        super().__init__(f"interrupted; {how_to_continue}" if how_to_continue else "interrupted")


def cli_errors(command):
    """The one decorator every command uses: its errors become one line (tracebacks with -v)."""
    how_to_continue = HOW_TO_CONTINUE.get(command.__name__)

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except KeyboardInterrupt:
            if is_verbose():
                raise
            raise Interrupted(how_to_continue) from None
        except (click.ClickException, click.exceptions.Exit, click.Abort):
            raise
        except Exception as error:
            if is_verbose():
                raise
            raise click.ClickException(describe(error)) from error

    return wrapper


def run_one_line(main, *args, **kwargs):
    """Run a Click ``main`` (non-standalone) and turn whatever ends it into an exit code,
    printing at most one line: Click's own usage errors lose their usage block too."""
    try:
        result = main(*args, standalone_mode=False, **kwargs)
    except click.exceptions.Exit as stop:
        sys.exit(stop.exit_code)
    except click.Abort:  # Ctrl-C outside a command's own work (Click has printed a newline)
        click.echo("interrupted", err=True)
        sys.exit(INTERRUPTED_EXIT_CODE)
    except Interrupted as stop:
        click.echo(stop.message, err=True)
        sys.exit(stop.exit_code)
    except click.ClickException as error:
        message = one_line(error.format_message())
        ctx = getattr(error, "ctx", None)
        if isinstance(error, click.UsageError) and ctx is not None:
            message += f" (see `{ctx.command_path} -h`)"
        click.echo(f"Error: {message}", err=True)
        sys.exit(error.exit_code)
    except Exception as error:
        if is_verbose():
            raise
        click.echo(f"Error: {describe(error)}", err=True)
        sys.exit(1)
    sys.exit(result if isinstance(result, int) else 0)


class OneLineGroup(click.Group):
    """A group whose standalone run reports errors through :func:`run_one_line`."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        parent = super().main
        if not standalone_mode:
            return parent(args, prog_name, complete_var, standalone_mode=False, **extra)
        return run_one_line(parent, args, prog_name, complete_var, **extra)


def run_command(command: click.Command, prog_name: str) -> None:
    """Entry point of `python -m jobs.X`: one command, same one-line errors as `tpr-ray X`."""
    run_one_line(command.main, prog_name=prog_name)


# --- shared option groups ----------------------------------------------------------

def _stack(*decorators):
    def apply(fn):
        for decorator in reversed(decorators):
            fn = decorator(fn)
        return fn
    return apply


address_option = click.option(
    "--address", help="Ray cluster address (default: RAY_ADDRESS, else a local cluster on this machine).")

recipe_options = _stack(
    click.option("--epochs", type=click.IntRange(min=1), help="Override the recipe's epochs."),
    click.option("--batch-size", type=click.IntRange(min=1), help="Override the recipe's per-worker batch size."),
    click.option("--lr", type=click.FloatRange(min=0, min_open=True), help="Override the recipe's base learning rate."),
    click.option("--set", "sets", multiple=True, metavar="KEY=VALUE",
                 help="Override any recipe option, e.g. --set warmup_epochs=1 (see `tpr-ray methods`)."),
)

train_resource_options = _stack(
    click.option("--workers", type=click.IntRange(min=1), default=1, show_default=True,
                 help="Ray Train workers per training (one GPU each when GPUs are used)."),
    click.option("--cpus-per-worker", type=click.FloatRange(min=0, min_open=True), default=1.0, show_default=True),
    click.option("--gpu/--no-gpu", default=None, help="Use GPUs (default: when the cluster has them)."),
    click.option("--loader-workers", type=click.IntRange(min=0), default=LOADER_WORKERS, show_default=True,
                 help="DataLoader processes per training worker."),
)

mlflow_option = click.option(
    "--mlflow", "mlflow_uri", metavar="URI",
    help="Also log params, metrics and the best checkpoint of every training run to this MLflow tracking URI "
         "(default: MLFLOW_TRACKING_URI; needs `pip install mlflow`). TensorBoard files are always in "
         "RUN/tensorboard.")

block_size_option = click.option(
    "--block-size", type=click.IntRange(min=1), default=BLOCK_SIZE, show_default=True,
    help="Queries scored at a time; memory grows with block size x gallery (shard) size.")


def _parse_ks(ctx, param, value: str) -> tuple[int, ...]:
    try:
        ks = tuple(int(part) for part in value.split(",") if part.strip())
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers such as 1,5,10, got {value!r}") from None
    if not ks or any(k < 1 for k in ks):
        raise click.BadParameter(f"each K must be a positive integer, got {value!r}")
    return ks


ks_option = click.option("--k", "ks", default="1,5,10", show_default=True, callback=_parse_ks,
                         help="Cut-offs K of R@K, comma-separated.")

top_option = click.option("--top", type=click.IntRange(min=1), default=10, show_default=True,
                          help="Results (images) returned per query.")


def collect_overrides(sets: tuple[str, ...], epochs=None, batch_size=None, lr=None) -> dict:
    """The recipe overrides of :data:`recipe_options`, as one dict."""
    overrides = parse_overrides(sets)
    for key, value in (("epochs", epochs), ("batch_size", batch_size), ("lr", lr)):
        if value is not None:
            overrides[key] = value
    return overrides


def method_names() -> list[str]:
    """Registered methods, from the registry (so help text cannot drift from it)."""
    from tpr_ray import methods
    available = getattr(methods, "available", None)
    return list(available()) if callable(available) else list(methods.METHODS)


# --- parsers ---------------------------------------------------------------------

def parse_overrides(pairs: tuple[str, ...]) -> dict:
    """`--set KEY=VALUE` pairs as a dict (dashes in keys become underscores)."""
    overrides = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise click.BadParameter(f"expected KEY=VALUE, got {pair!r}", param_hint="--set")
        overrides[key.strip().replace("-", "_")] = value.strip()
    return overrides


def parse_size(text: str) -> tuple[int, int]:
    """`384x128` -> (384, 128)."""
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise click.BadParameter(f"expected HxW such as 384x128, got {text!r}", param_hint="--image-size") from None
    if h < 1 or w < 1:
        raise click.BadParameter(f"expected positive sizes, got {text!r}", param_hint="--image-size")
    return h, w

