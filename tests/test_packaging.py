"""The wheel installs tpr_ray, tpr_ray_cli and tpr_ray_jobs, nothing generic; both the installed
names and a checkout's `python -m jobs.X` work."""

import glob
import os
import shutil
import subprocess
import sys
import zipfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    # Build from a copy: an in-tree build would leave build/ and *.egg-info in the checkout.
    src = tmp_path_factory.mktemp("src")
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True,
                           text=True, check=True).stdout.split()
    for name in files:
        if os.path.isfile(os.path.join(ROOT, name)):
            os.makedirs(src / os.path.dirname(name), exist_ok=True)
            shutil.copy2(os.path.join(ROOT, name), src / name)
    out = tmp_path_factory.mktemp("wheel")
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "-q",
                           "-w", str(out), str(src)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return glob.glob(str(out / "*.whl"))[0]


def test_wheel_holds_only_project_names(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    top = {name.split("/")[0] for name in names if not name.split("/")[0].endswith(".dist-info")}
    assert top == {"tpr_ray", "tpr_ray_cli", "tpr_ray_jobs"}
    mapped = {"tpr_ray": "tpr_ray", "cli": "tpr_ray_cli", "jobs": "tpr_ray_jobs"}
    for folder, package in mapped.items():  # every module of the checkout is in the wheel
        for path in glob.glob(os.path.join(ROOT, folder, "**", "*.py"), recursive=True):
            assert package + path[len(os.path.join(ROOT, folder)):] in names, path
    assert "tpr_ray/model_configs/tpr-tiny.json" in names
    entry_points = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert "tpr-ray = tpr_ray_cli.main:cli" in entry_points


def test_installed_names_and_checkout_entry_points_run(wheel, tmp_path):
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    env = {**os.environ, "PYTHONPATH": str(site)}
    code = ("import runpy, sys; sys.argv = ['x', '-h']\ntry:\n    runpy.run_module('tpr_ray_jobs.train', "
            "run_name='__main__')\nexcept SystemExit:\n    pass\n"
            "from tpr_ray_cli.main import cli; cli(['--version'])")
    installed = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                               timeout=300)
    assert "--method" in installed.stdout and "tpr-ray, version" in installed.stdout, installed.stderr
    checkout = subprocess.run([sys.executable, "-m", "jobs.train", "-h"], cwd=ROOT,
                              env={**os.environ, "PYTHONPATH": ROOT}, capture_output=True, text=True, timeout=120)
    assert checkout.returncode == 0 and "python -m jobs.train" in checkout.stdout, checkout.stderr
