"""Ray job entry point for training: `ray job submit --working-dir . -- python -m jobs.train --method pd ...`.

Takes exactly the options of `tpr-ray train`; inside a Ray job RAY_ADDRESS points at the cluster.
"""

from cli.main import train
from cli.options import run_command

if __name__ == "__main__":
    run_command(train, "python -m jobs.train")
