#!/usr/bin/env bash
# Set up (if needed), lint, and run the whole test suite, slow end-to-end tests included.
# The timeout guards against a silent Ray hang; extra arguments go to pytest.
# The fast loop while developing: .venv/bin/python -m pytest -q -m "not slow"
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/python -m ruff check .
.venv/bin/lint-imports --no-cache --no-logo  # the layering contract in pyproject.toml
# The HTML report test opens the report in a real headless browser (Debian's chromium).
if ! command -v chromium >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) >/dev/null
fi
# Tests only: the suite's own Ray cluster runs without token authentication (conftest.py);
# clusters that tpr-ray starts keep it on.
export RAY_TRAIN_HEALTH_CHECK_INTERVAL_S=0.2
timeout 3600 .venv/bin/python -m pytest -q -p no:cacheprovider --durations=15 "$@"
