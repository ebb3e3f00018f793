"""The template browser's thumbnails of the pack's example workflows, on every core.

ComfyUI's frontend shows a custom-node template with the picture at
`/api/workflow_templates/<pack folder>/<template name>.jpg`. Cores up to about v0.2x mount the
whole `example_workflows/` folder there; newer cores (v0.38) serve that URL from a route that
answers only `.json` files, so the picture is missing. The pack registers its own route for the
picture files of its own folder, ahead of core's (custom nodes load before core adds its routes;
core gives every route an `/api` twin). Workflow `.json` files stay core's: the route's pattern
matches picture names only.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

# where the pack lives as ComfyUI loaded it (not resolved: core names the pack by its folder under
# custom_nodes/, which may be a link to a checkout)
PACK_DIR = Path(os.path.abspath(os.path.dirname(__file__)))
TEMPLATE_DIR = PACK_DIR / "example_workflows"
PICTURE_SUFFIXES = ("jpg", "jpeg", "png", "webp")


def thumbnail_file(filename: str) -> Path | None:
    """The picture `filename` directly in the pack's template folder, or None."""
    if Path(filename).name != filename or Path(filename).suffix.lower().lstrip(".") not in PICTURE_SUFFIXES:
        return None
    path = TEMPLATE_DIR / filename
    return path if path.is_file() else None


def serve_template_thumbnails() -> bool:
    """Add the route to the running ComfyUI server; False where there is none (the headless trainer,
    tests that only import the nodes) or it was added before."""
    server = sys.modules.get("server")  # ComfyUI's server module, imported by main.py before the packs
    instance = getattr(getattr(server, "PromptServer", None), "instance", None)
    if instance is None or getattr(instance, "_selfnpo_thumbnails", False):
        return False
    from aiohttp import web

    pattern = r"[^/]+\.(?:" + "|".join(PICTURE_SUFFIXES) + ")"

    @instance.routes.get(f"/workflow_templates/{PACK_DIR.name}/{{filename:{pattern}}}")
    async def template_thumbnail(request):
        path = thumbnail_file(request.match_info["filename"])
        if path is None:
            raise web.HTTPNotFound()
        return web.FileResponse(path)

    instance._selfnpo_thumbnails = True
    return True
