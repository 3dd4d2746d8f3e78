"""Ray job entry point for evaluation: `python -m jobs.evaluate --embeddings s3://.../emb --out ...`.

Takes exactly the options of `tpr-ray eval`.
"""

from cli.main import eval_command
from cli.options import run_command

if __name__ == "__main__":
    run_command(eval_command, "python -m jobs.evaluate")
