"""A quiet console: the demo prints the project's lines; Ray's noise goes to a log file."""

import os
import re
import subprocess
import sys

import pytest

NOISE = ("PlacementGroupCleaner", "TrainingReport(", "Checkpoint successfully created",
         "No pretrained weights loaded", "Started a local Ray instance", "Token authentication is enabled")
MAX_LINES = 30


@pytest.mark.slow
def test_demo_console_is_quiet_and_the_noise_is_in_the_log_file(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_AUTH_MODE", "TPR_RAY_VERBOSE", "RAY_ADDRESS")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [os.getcwd(), env.get("PYTHONPATH")]))
    out = tmp_path / "demo"
    proc = subprocess.run([sys.executable, "-m", "cli.main", "demo", "--out", str(out), "--ids", "12",
                           "--epochs", "1"], env=env, capture_output=True, text=True, timeout=600)
    console = proc.stdout + proc.stderr
    assert proc.returncode == 0, console[-3000:]
    lines = console.strip().splitlines()
    assert len(lines) <= MAX_LINES, console
    assert not [noise for noise in NOISE if noise in console], console
    assert not re.search(r"\x1b\[", console), "ANSI colour codes in redirected output"
    assert "R1" in console and "chance" in console
    log = (out / "tpr-ray-demo.log").read_text()
    assert "Started a local Ray instance" in log  # what the console left out is kept
