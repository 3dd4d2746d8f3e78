"""Ray job entry point for the synthetic end-to-end demo (`tpr-ray demo`)."""

from . import run

if __name__ == "__main__":
    run("demo", "demo")
