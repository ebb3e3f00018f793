#!/usr/bin/env bash
# The pack's main job on a fresh machine, in one command:
#   bash scripts/demo.sh [comfy-selfnpo-train args]
# Sets up .venv and the pinned ComfyUI (scripts/setup_env.sh), then runs `comfy-selfnpo-train --demo`:
# a Self-NPO LoRA trained on a built-in tiny model, and a CFG vs NPO-CFG grid in ./selfnpo-demo/.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
exec "${SELFNPO_VENV:-.venv}/bin/comfy-selfnpo-train" --demo "$@"
