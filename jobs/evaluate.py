"""Ray job entry point for evaluation: `python -m jobs.evaluate --embeddings s3://.../emb --out ...`.

Takes exactly the options of `tpr-ray eval`.
"""

from cli.evaluate import eval_command

if __name__ == "__main__":
    eval_command.main(prog_name="python -m jobs.evaluate")
