#!/usr/bin/env bash
# The one command that runs the test suite on a fresh machine:
#   bash scripts/run_tests.sh [pytest args]
# It sets up .venv with the test tools and the pinned ComfyUI (scripts/setup_env.sh test), then runs pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh test
exec "${SELFNPO_VENV:-.venv}/bin/python" -m pytest "$@"
