"""Ray job entry point for the synthetic end-to-end demo (`tpr-ray demo`)."""

from cli.main import demo
from cli.options import run_command

if __name__ == "__main__":
    run_command(demo, "python -m jobs.demo")
