#!/usr/bin/env bash
# The pack's main job on a fresh machine, in one command:
#   bash scripts/demo.sh [comfy-selfnpo-train args]
# Sets up .venv with only what the demo needs and the pinned ComfyUI (scripts/setup_env.sh demo), then runs `comfy-selfnpo-train --demo`:
# a Self-NPO LoRA trained on a built-in tiny model, and a CFG vs NPO-CFG grid in ./selfnpo-demo/.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh demo
exec "${SELFNPO_VENV:-.venv}/bin/comfy-selfnpo-train" --demo "$@"
