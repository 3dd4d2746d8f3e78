"""Ray job entry point for the synthetic end-to-end demo (`tpr-ray demo`)."""

from cli.main import demo

if __name__ == "__main__":
    demo.main(prog_name="python -m jobs.demo")
