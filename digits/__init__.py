"""A small text-to-image diffusion model of handwritten digits (`model`), the metrics that judge its
samples (`metrics`) and the demo built from both (`demo`). The quality benchmark (bench/quality.py)
trains and measures it; `comfy-selfnpo-train --demo` uses the copy shipped in `demo_model.safetensors`.
Import after `comfyui_env.ensure_comfyui()`."""
