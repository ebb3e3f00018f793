#!/usr/bin/env bash
# Create or update .venv for this checkout:
#   bash scripts/setup_env.sh demo   what `comfy-selfnpo-train --demo` needs: the CPU build of torch
#                                    (the project machines' wheel; on a GPU machine set
#                                    SELFNPO_TORCH_VERSION / install your own torch first), ComfyUI's
#                                    runtime packages and this pack (editable), nothing else;
#   bash scripts/setup_env.sh test   (the default) the above, plus the test and bench extras (a test
#                                    runs ComfyUI and diffusers in one process, as bench/tdft_step.py
#                                    does), ComfyUI's server packages and the registry's CLI.
# Then make sure the pinned ComfyUI is present. Re-running is cheap: each part is reinstalled only
# when its package list changed.
set -euo pipefail
cd "$(dirname "$0")/.."
profile=${1:-test}
case "$profile" in demo|test) ;; *) echo "usage: $0 [demo|test]" >&2; exit 2 ;; esac
venv=${SELFNPO_VENV:-.venv}
pip=("$venv/bin/python" -m pip install --quiet)
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
fi

# install_once NAME FILES... -- COMMAND: run COMMAND unless the stamp NAME records these files' hash
install_once() {
  local stamp="$venv/.selfnpo-$1"; shift
  local files=()
  while [ "$1" != "--" ]; do files+=("$1"); shift; done; shift
  local want; want=$(cat "${files[@]}" | sha256sum | cut -c1-16)
  if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    "$@"
    echo "$want" >"$stamp"
  fi
}

runtime() {
  "${pip[@]}" --upgrade pip
  # torch first and exactly this version: it is the CPU build on the project machines; anything
  # unpinned would pull a multi-GB CUDA build instead.
  "${pip[@]}" "torch==${SELFNPO_TORCH_VERSION:-2.13.0}"
  "${pip[@]}" -r scripts/comfyui-runtime.txt
  "${pip[@]}" -e .
}
test_tools() {
  "${pip[@]}" -r scripts/comfyui-server.txt
  "${pip[@]}" -e ".[test,bench,tensorboard]"
  # the registry's CLI (comfy-cli) in a venv of its own, for the registry tests
  [ -x "$venv/registry-tools/bin/python" ] || python3 -m venv "$venv/registry-tools"
  "$venv/registry-tools/bin/python" -m pip install --quiet -r scripts/registry-tools.txt
}

install_once runtime pyproject.toml scripts/comfyui-runtime.txt -- runtime
if [ "$profile" = test ]; then
  install_once test-tools pyproject.toml scripts/comfyui-server.txt scripts/registry-tools.txt -- test_tools
fi
bash scripts/setup_comfyui.sh
