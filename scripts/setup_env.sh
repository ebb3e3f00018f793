#!/usr/bin/env bash
# Create or update .venv for this checkout: the CPU build of torch (the project machines' wheel;
# on a GPU machine set SELFNPO_TORCH_VERSION / install your own torch first), ComfyUI's runtime
# packages, this pack (editable) with its test and bench extras (a test runs ComfyUI and
# diffusers in one process, as bench/tdft_step.py does); then make sure the pinned ComfyUI is present.
# Re-running is cheap: nothing is reinstalled unless pyproject.toml or the package list changed.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${SELFNPO_VENV:-.venv}
stamp="$venv/.selfnpo-installed"
want=$(cat pyproject.toml scripts/comfyui-runtime.txt scripts/registry-tools.txt | sha256sum | cut -c1-16)
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
fi
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  "$venv/bin/python" -m pip install --quiet --upgrade pip
  # torch first and exactly this version: it is the CPU build on the project machines; anything
  # unpinned would pull a multi-GB CUDA build instead.
  "$venv/bin/python" -m pip install --quiet "torch==${SELFNPO_TORCH_VERSION:-2.13.0}"
  "$venv/bin/python" -m pip install --quiet -r scripts/comfyui-runtime.txt
  "$venv/bin/python" -m pip install --quiet -e ".[test,bench,tensorboard]"
  # the registry's CLI (comfy-cli) in a venv of its own, for the registry tests
  [ -x "$venv/registry-tools/bin/python" ] || python3 -m venv "$venv/registry-tools"
  "$venv/registry-tools/bin/python" -m pip install --quiet -r scripts/registry-tools.txt
  echo "$want" >"$stamp"
fi
bash scripts/setup_comfyui.sh
