"""Package discovery (everything else is in pyproject.toml).

cli/ and jobs/ stay top-level folders of the checkout, so that `python -m jobs.train` runs
from a Ray job's working directory, but they are installed as tpr_ray_cli and tpr_ray_jobs:
nothing generic such as `cli` or `jobs` lands in site-packages.
"""

from setuptools import find_namespace_packages, setup

setup(
    packages=find_namespace_packages(include=["tpr_ray", "tpr_ray.*"], exclude=["*.__pycache__"]) + ["tpr_ray_cli", "tpr_ray_jobs"],
    package_dir={"tpr_ray_cli": "cli", "tpr_ray_jobs": "jobs"},
)
