"""Ray job entry point for training: `ray job submit --working-dir . -- python -m jobs.train --method pd ...`.

Takes exactly the options of `tpr-ray train`; inside a Ray job RAY_ADDRESS points at the cluster."""

from . import run

if __name__ == "__main__":
    run("train", "train")
