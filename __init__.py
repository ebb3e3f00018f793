"""comfy-selfnpo: Self-NPO for ComfyUI.

ComfyUI imports this folder as a custom-node pack and calls `comfy_entrypoint()`. This file only
registers nodes: importing it is cheap and touches neither torch nor ComfyUI, so the same package
also serves the headless trainer (`comfy-selfnpo-train`) and plain `import comfy_selfnpo`.
"""

__version__ = "0.1.0"


async def comfy_entrypoint():
    from .nodes import SelfNPOExtension

    return SelfNPOExtension()

# the frontend extension that shows a training preset's values on the node (web/)
WEB_DIRECTORY = "./web"
