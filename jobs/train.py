"""Ray job entry point for training: `ray job submit --working-dir . -- python -m jobs.train --method pd ...`.

Takes exactly the options of `tpr-ray train`; inside a Ray job RAY_ADDRESS points at the cluster.
"""

from cli.main import train

if __name__ == "__main__":
    train.main(prog_name="python -m jobs.train")
