"""Ray job entry point for embedding: `ray job submit --working-dir . -- python -m jobs.embed ...`.

Takes exactly the options of `tpr-ray embed`.
"""

from cli.main import embed

if __name__ == "__main__":
    embed.main(prog_name="python -m jobs.embed")
