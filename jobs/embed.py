"""Ray job entry point for embedding: `ray job submit --working-dir . -- python -m jobs.embed ...`.

Takes exactly the options of `tpr-ray embed`.
"""

from cli.main import embed
from cli.options import run_command

if __name__ == "__main__":
    run_command(embed, "python -m jobs.embed")
