#!/usr/bin/env bash
# The one command that runs the test suite on a fresh machine:
#   bash scripts/run_tests.sh [pytest args]
# It creates .venv (CPU build of torch, ComfyUI's runtime packages, this pack with its test extra),
# makes sure the pinned ComfyUI is available (scripts/setup_comfyui.sh), then runs pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${SELFNPO_VENV:-.venv}
stamp="$venv/.selfnpo-installed"
want=$(cat pyproject.toml scripts/comfyui-runtime.txt | sha256sum | cut -c1-16)
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
fi
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  "$venv/bin/python" -m pip install --quiet --upgrade pip
  # torch first and exactly this version: it is the CPU build on the project machines; anything
  # unpinned would pull a multi-GB CUDA build instead.
  "$venv/bin/python" -m pip install --quiet "torch==${SELFNPO_TORCH_VERSION:-2.13.0}"
  "$venv/bin/python" -m pip install --quiet -r scripts/comfyui-runtime.txt
  "$venv/bin/python" -m pip install --quiet -e ".[test]"
  echo "$want" >"$stamp"
fi
bash scripts/setup_comfyui.sh
exec "$venv/bin/python" -m pytest "$@"
