"""Tiny but real ComfyUI models: the test suite's fixtures, and the architecture of the digits model
that the quality benchmark trains and `--demo` uses (digits/model.py).

Everything is built from ComfyUI's own classes (`comfy.supported_models`, `comfy.model_base`,
`comfy.sd.CLIP`, `comfy.sd.VAE`) at toy width, so sampling, LoRA loading, checkpoint and model-file
saving and loading all run ComfyUI's real code paths. Weights are filled from a seeded generator
(ComfyUI's layers are created with `torch.empty`), so two builds with one seed are bit-identical.

Kinds (`KINDS`; facts per kind in `FAMILIES`, families.py):
  sd15, sd2, sdxl   SD1.5 (EPS), SD2 768-v (V-prediction), SDXL UNets with CLIP encoders and TAESD;
                    single-file checkpoints (`save_checkpoint`)
  flow              the sd15 UNet run as a rectified-flow (CONST, shift 3) model, in memory only
  sd3               SD3/SD3.5 MMDiT                     wan21        Wan 2.1 T2V (5-D latents)
  wan22_5b          Wan 2.2 TI2V-5B (48 channels)       wan22_a14b   Wan 2.2 A14B (two experts)
  qwen_image        Qwen-Image                          chroma       Chroma (Flux with real CFG)
  ltxv              LTX-Video                           hunyuan_video15, lumina2
  flux_dev, hunyuan_video   guidance-distilled models, for refusal tests
The DiT kinds are written as separate diffusion-model / text-encoder / VAE files by `save_files`.
Parts: dits.py / unets.py (model configs), text_encoders.py, vaes.py, weights.py (seeded fill),
build.py (MODEL, CLIP, VAE), files.py (files and detection registration).

Call `comfyui_env.ensure_comfyui()` before importing this package.
"""
from .build import (TinyCheckpoint, build_checkpoint, build_clip, build_experts, build_model, build_vae,
                    tiny_model_config)
from .families import DIT_KINDS, FAMILIES, KINDS, SD_KINDS, TINY_CONFIGS, WAN22_A14B_BOUNDARY, Family, family
from .files import (TinyFiles, load_files, register_tiny_model_configs, save_checkpoint, save_files,
                    unregister_tiny_model_configs)
from .text_encoders import SDXL_POOLED_DIM
from .weights import seeded_init_

__all__ = [
    "DIT_KINDS", "FAMILIES", "KINDS", "SDXL_POOLED_DIM", "SD_KINDS", "TINY_CONFIGS", "WAN22_A14B_BOUNDARY",
    "Family", "TinyCheckpoint", "TinyFiles", "build_checkpoint", "build_clip", "build_experts", "build_model",
    "build_vae", "family", "load_files", "register_tiny_model_configs", "save_checkpoint", "save_files",
    "seeded_init_", "tiny_model_config", "unregister_tiny_model_configs",
]
