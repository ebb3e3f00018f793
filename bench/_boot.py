"""Shared start-up for the bench scripts: import this checkout as `comfy_selfnpo` (installed or
not) and make ComfyUI importable (`comfyui_env.ensure_comfyui`)."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def boot_comfyui(cpu: bool | None = None) -> Path:
    spec = importlib.util.find_spec("comfy_selfnpo")
    if spec is None or not spec.origin or Path(spec.origin).resolve().parent != ROOT:
        spec = importlib.util.spec_from_file_location("comfy_selfnpo", ROOT / "__init__.py",
                                                      submodule_search_locations=[str(ROOT)])
        module = importlib.util.module_from_spec(spec)
        sys.modules["comfy_selfnpo"] = module
        spec.loader.exec_module(module)
    from comfy_selfnpo.comfyui_env import ensure_comfyui

    return ensure_comfyui(cpu=cpu)
