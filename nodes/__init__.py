"""Node registration. Each module in NODE_MODULES defines a `NODES` list of V3 node classes.

A module that fails to import (an optional dependency missing, say) is logged and skipped so the
other nodes still register: one broken feature never takes the whole pack down.
"""
from __future__ import annotations

import importlib
import logging

from comfy_api.latest import ComfyExtension, io

log = logging.getLogger("comfy_selfnpo")

# Every node ID of the pack starts with this prefix; IDs are stable once released.
NODE_ID_PREFIX = "SelfNPO"

NODE_MODULES: list[str] = ["negative_model", "guidance", "train"]


def load_node_classes() -> list[type[io.ComfyNode]]:
    classes = []
    for name in NODE_MODULES:
        try:
            module = importlib.import_module(f".{name}", __name__)
        except Exception as exc:  # keep the rest of the pack usable
            log.warning("comfy-selfnpo: nodes from %s are unavailable: %s", name, exc)
            continue
        classes.extend(module.NODES)
    return classes


class SelfNPOExtension(ComfyExtension):
    async def on_load(self) -> None:
        from ..model_folders import register_self_npo_folder
        from ..template_thumbnails import serve_template_thumbnails

        register_self_npo_folder()
        serve_template_thumbnails()  # newer cores serve only the templates' .json files

    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return load_node_classes()
