#!/usr/bin/env bash
# The one command that runs the test suite on a fresh machine:
#   bash scripts/run_tests.sh [pytest args]
# It sets up .venv and the pinned ComfyUI (scripts/setup_env.sh), then runs pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
exec "${SELFNPO_VENV:-.venv}/bin/python" -m pytest "$@"
