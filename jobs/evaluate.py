"""Ray job entry point for evaluation: `python -m jobs.evaluate --embeddings s3://.../emb --out ...`.

Takes exactly the options of `tpr-ray eval`."""

from . import run

if __name__ == "__main__":
    run("eval", "evaluate")
