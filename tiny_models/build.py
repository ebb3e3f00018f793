"""Build a tiny kind's MODEL (ModelPatcher), CLIP (comfy.sd.CLIP) and VAE (comfy.sd.VAE), seeded."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

import comfy.model_management
import comfy.model_patcher
import comfy.sd

from . import unets
from .families import family
from .text_encoders import spiece_tokenizer_data
from .vaes import build_named_vae
from .weights import seeded_init_

# seeds of a checkpoint's parts, derived from its one seed
_CLIP_SEED, _VAE_SEED, _EXPERT_SEED_STEP = 1, 2, 3


def tiny_model_config(kind: str):
    """The tiny kind's ComfyUI model config, set up for float32 inference."""
    config_cls = family(kind).config
    unet_config = getattr(config_cls, "tiny_unet_config", None) or unets.full_unet_config(config_cls)
    config = config_cls(dict(unet_config))
    config.set_inference_dtype(torch.float32, None)
    return config


def build_model(kind: str = "sd15", seed: int = 0) -> comfy.model_patcher.ModelPatcher:
    """A ModelPatcher around a tiny ComfyUI BaseModel, like the MODEL output of a loader node. For
    a kind with experts (wan22_a14b) this is the first (high-noise) expert; see `build_experts`."""
    model = tiny_model_config(kind).get_model({})
    seeded_init_(model.diffusion_model, seed)
    return comfy.model_patcher.ModelPatcher(
        model, load_device=comfy.model_management.get_torch_device(),
        offload_device=comfy.model_management.unet_offload_device())


def build_experts(kind: str, seed: int = 0) -> dict[str, comfy.model_patcher.ModelPatcher]:
    """Expert name -> MODEL, high noise first; one entry ("model") for a kind without experts."""
    names = family(kind).experts or ("model",)
    return {name: build_model(kind, seed + i * _EXPERT_SEED_STEP) for i, name in enumerate(names)}


def build_clip(kind: str = "sd15", seed: int = 1) -> comfy.sd.CLIP:
    """The kind's tiny text encoder as ComfyUI's CLIP object, in float32."""
    target = tiny_model_config(kind).clip_target()
    tokenizer_data = spiece_tokenizer_data() if family(kind).spiece_vocabulary else {}
    clip = comfy.sd.CLIP(target, tokenizer_data=tokenizer_data, model_options={"dtype": torch.float32})
    seeded_init_(clip.cond_stage_model, seed)
    return clip


def build_vae(seed: int = 2, kind: str = "sd15") -> comfy.sd.VAE | None:
    """The kind's tiny VAE (None for a kind without one); `seed` first, as callers pass it."""
    name = family(kind).vae
    return None if name is None else build_named_vae(name, seed)


@dataclass
class TinyCheckpoint:
    model: comfy.model_patcher.ModelPatcher
    clip: comfy.sd.CLIP
    vae: comfy.sd.VAE | None
    # expert name -> MODEL for kinds with several diffusion models (wan22_a14b), high noise first;
    # `model` is the first of them
    experts: dict = field(default_factory=dict)


def build_checkpoint(kind: str = "sd15", seed: int = 0) -> TinyCheckpoint:
    """MODEL, CLIP and VAE of one tiny kind; the parts' seeds derive from `seed`."""
    experts = build_experts(kind, seed) if family(kind).experts else {}
    model = next(iter(experts.values())) if experts else build_model(kind, seed)
    return TinyCheckpoint(model, build_clip(kind, seed + _CLIP_SEED), build_vae(seed + _VAE_SEED, kind), experts)
