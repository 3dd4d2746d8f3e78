"""Entry points for `ray job submit ... -- python -m jobs.NAME`: each is `tpr-ray NAME` with the
same options. Installed, this package is `tpr_ray_jobs` and the CLI `tpr_ray_cli`."""

import importlib

# A checkout's jobs/ goes with its cli/; the installed tpr_ray_jobs with tpr_ray_cli.
_CLI = "tpr_ray_cli" if __name__ == "tpr_ray_jobs" else "cli"


def run(command: str, module: str) -> None:
    """Run `tpr-ray COMMAND` on this process's arguments, as `python -m jobs.MODULE`."""
    main = importlib.import_module(f"{_CLI}.main")
    options = importlib.import_module(f"{_CLI}.options")
    options.run_command(main.cli.commands[command], f"python -m jobs.{module}")
