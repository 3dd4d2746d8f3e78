"""Ray job entry point for embedding: `ray job submit --working-dir . -- python -m jobs.embed ...`.

Takes exactly the options of `tpr-ray embed`."""

from . import run

if __name__ == "__main__":
    run("embed", "embed")
