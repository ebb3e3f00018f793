"""Tiny but real ComfyUI models: the test suite's fixtures and the `--demo` run's built-in model.

Everything is built from ComfyUI's own classes (`comfy.supported_models`, `comfy.model_base`,
`comfy.sd.CLIP`, `comfy.sd.VAE`) at toy width, so sampling, LoRA loading, checkpoint saving and
loading all run ComfyUI's real code paths. Weights are filled from a seeded generator (ComfyUI's
layers are created with `torch.empty`), so two builds with one seed are bit-identical.

Kinds:
  sd15  SD1.5-style UNet, EPS prediction, CLIP-L-style text encoder (context 64)
  sd2   SD2-style UNet (linear transformer in/out), V-prediction, CLIP-H-style encoder (context 64)
  sdxl  SDXL-style UNet with pooled/ADM conditioning, CLIP-L + CLIP-G-style encoders (context 128)
  flow  the sd15 UNet run as a rectified-flow (CONST, SD3-style shift 3) model — for the trainer's
        flow-model checks; ComfyUI has no UNet flow checkpoint format, so it is built in memory only.
The VAE is ComfyUI's TAESD (4 latent channels, 8x downscale): small, and detected from its keys by
ComfyUI's own VAE loader, so tiny checkpoints load through `CheckpointLoaderSimple` unchanged.

Call `comfyui_env.ensure_comfyui()` before importing this module.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

import comfy.model_base
import comfy.model_management
import comfy.model_patcher
import comfy.sd
import comfy.sd1_clip
import comfy.sdxl_clip
import comfy.supported_models
import comfy.supported_models_base
import comfy.text_encoders.sd2_clip
import comfy.utils
from comfy.model_base import ModelType

KINDS = ("sd15", "sd2", "sdxl", "flow")

_UNET_COMMON = {
    "use_checkpoint": False,
    "image_size": 32,
    "in_channels": 4,
    "out_channels": 4,
    "model_channels": 32,
    "num_res_blocks": [1, 1],
    "channel_mult": [1, 2],
    "transformer_depth": [1, 1],
    "transformer_depth_output": [1, 1, 1, 1],
    "transformer_depth_middle": 1,
    "use_spatial_transformer": True,
    "legacy": False,
    "use_temporal_attention": False,
    "use_temporal_resblock": False,
}

# hidden sizes add up to the UNet's context_dim: 64 for sd15/sd2, 32 (L) + 96 (G) = 128 for sdxl
_CLIP_SMALL = {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 2,
               "num_hidden_layers": 3, "projection_dim": 64}
_CLIP_L_SMALL_XL = {**_CLIP_SMALL, "hidden_size": 32, "intermediate_size": 64, "projection_dim": 32}
_CLIP_G_SMALL = {"hidden_size": 96, "intermediate_size": 128, "num_attention_heads": 2,
                 "num_hidden_layers": 3, "projection_dim": 64}
SDXL_POOLED_DIM = _CLIP_G_SMALL["hidden_size"]  # ComfyUI pools clip_g to its hidden width


def _clip_with_small_configs(base_cls, configs: dict):
    """A ComfyUI text-encoder class whose sub-models default to the small configs. Used as the
    `ClipTarget.clip` of the tiny model configs, so ComfyUI's checkpoint loader builds it too."""

    class SmallTextEncoder(base_cls):
        def __init__(self, device="cpu", dtype=None, model_options={}, **kwargs):
            options = dict(model_options)
            for key, value in configs.items():
                options.setdefault(key, value)
            super().__init__(device=device, dtype=dtype, model_options=options, **kwargs)

    SmallTextEncoder.__name__ = f"Small{base_cls.__name__}"
    return SmallTextEncoder


class TinySD15(comfy.supported_models.SD15):
    unet_config = {"context_dim": 64, "model_channels": 32, "use_linear_in_transformer": False,
                   "adm_in_channels": None, "use_temporal_attention": False}
    unet_extra_config = {"num_heads": 2, "num_head_channels": -1}

    def clip_target(self, state_dict={}):
        return comfy.supported_models_base.ClipTarget(
            comfy.sd1_clip.SD1Tokenizer,
            _clip_with_small_configs(comfy.sd1_clip.SD1ClipModel, {"clip_l_model_config": _CLIP_SMALL}))


class TinySD2(comfy.supported_models.SD20):
    unet_config = {"context_dim": 64, "model_channels": 32, "use_linear_in_transformer": True,
                   "adm_in_channels": None, "use_temporal_attention": False}
    unet_extra_config = {"num_heads": -1, "num_head_channels": 16, "attn_precision": torch.float32}

    def model_type(self, state_dict, prefix=""):
        # SD2's own detector looks at a layer the tiny UNet does not have; this tiny class stands for
        # the 768-v models, so it is V-prediction (ComfyUI's saver also writes a `v_pred` marker).
        return ModelType.V_PREDICTION

    def clip_target(self, state_dict={}):
        return comfy.supported_models_base.ClipTarget(
            comfy.text_encoders.sd2_clip.SD2Tokenizer,
            _clip_with_small_configs(comfy.text_encoders.sd2_clip.SD2ClipModel,
                                     {"clip_h_model_config": {**_CLIP_SMALL, "hidden_act": "gelu"}}))


class TinySDXL(comfy.supported_models.SDXL):
    unet_config = {"model_channels": 32, "use_linear_in_transformer": True, "context_dim": 128,
                   "adm_in_channels": SDXL_POOLED_DIM + 6 * 256, "use_temporal_attention": False}
    unet_extra_config = {"num_heads": -1, "num_head_channels": 16}

    def clip_target(self, state_dict={}):
        return comfy.supported_models_base.ClipTarget(
            comfy.sdxl_clip.SDXLTokenizer,
            _clip_with_small_configs(comfy.sdxl_clip.SDXLClipModel, {
                "clip_l_model_config": _CLIP_L_SMALL_XL,
                "clip_g_model_config": {**_CLIP_G_SMALL, "hidden_act": "gelu"},
            }))


class TinyFlow(TinySD15):
    """The tiny SD1.5 UNet as a rectified-flow model (ComfyUI's CONST sampling, shift 3)."""
    sampling_settings = {"shift": 3.0, "multiplier": 1000}

    def model_type(self, state_dict, prefix=""):
        return ModelType.FLOW


TINY_CONFIGS = {"sd15": TinySD15, "sd2": TinySD2, "sdxl": TinySDXL, "flow": TinyFlow}

# The flow variant has no file format of its own (its keys equal sd15's), so only the three file
# formats are registered with ComfyUI's detector.
_REGISTERED = (TinySDXL, TinySD2, TinySD15)


def register_tiny_model_configs() -> None:
    """Let ComfyUI's checkpoint detection recognise tiny checkpoints (idempotent). Registered ahead of
    the real configs; they only match the tiny widths (model_channels 32), never a real model."""
    models = comfy.supported_models.models
    for cls in _REGISTERED:
        if cls not in models:
            models.insert(0, cls)


def unregister_tiny_model_configs() -> None:
    models = comfy.supported_models.models
    for cls in _REGISTERED:
        while cls in models:
            models.remove(cls)


def _full_unet_config(kind: str) -> dict:
    cfg = dict(_UNET_COMMON)
    cfg.update(TINY_CONFIGS[kind].unet_config)
    if kind == "sdxl":
        cfg["num_classes"] = "sequential"
    return cfg


@torch.no_grad()
def seeded_init_(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Fill every parameter from one seeded generator, in module order: matrices and kernels
    ~ N(0, 1/fan_in) (keeps activations O(1) through the tiny nets), norm scales ~ 1, biases small.
    Deterministic on any device because the draws happen on the CPU."""
    gen = torch.Generator().manual_seed(seed)
    for sub in module.modules():
        is_norm = isinstance(sub, (torch.nn.GroupNorm, torch.nn.LayerNorm))
        for name, p in sub.named_parameters(recurse=False):
            if p.ndim == 0:
                continue  # scalars such as CLIP's logit_scale or TAESD's vae_scale keep their values
            if is_norm and name == "weight":
                value = 1.0 + 0.05 * torch.randn(p.shape, generator=gen)
            elif p.ndim >= 2:
                value = torch.randn(p.shape, generator=gen) / math.sqrt(p[0].numel())
            else:
                value = 0.02 * torch.randn(p.shape, generator=gen)
            p.copy_(value.to(p.dtype))
    return module


def tiny_model_config(kind: str):
    if kind not in TINY_CONFIGS:
        raise ValueError(f"unknown tiny model kind {kind!r}; choose from {KINDS}")
    config = TINY_CONFIGS[kind](_full_unet_config(kind))
    config.set_inference_dtype(torch.float32, None)
    return config


def build_model(kind: str = "sd15", seed: int = 0) -> comfy.model_patcher.ModelPatcher:
    """A ModelPatcher around a tiny ComfyUI BaseModel, like the MODEL output of a loader node."""
    config = tiny_model_config(kind)
    model = config.get_model({})
    seeded_init_(model.diffusion_model, seed)
    # TinySD2/TinyFlow decide the model type themselves; the others are EPS.
    return comfy.model_patcher.ModelPatcher(
        model, load_device=comfy.model_management.get_torch_device(),
        offload_device=comfy.model_management.unet_offload_device())


def build_clip(kind: str = "sd15", seed: int = 1) -> comfy.sd.CLIP:
    target = tiny_model_config(kind).clip_target()
    clip = comfy.sd.CLIP(target, model_options={"dtype": torch.float32})
    seeded_init_(clip.cond_stage_model, seed)
    return clip


def build_vae(seed: int = 2) -> comfy.sd.VAE:
    import comfy.taesd.taesd

    template = comfy.taesd.taesd.TAESD(latent_channels=4)
    seeded_init_(template, seed)
    return comfy.sd.VAE(sd=template.state_dict())


@dataclass
class TinyCheckpoint:
    model: comfy.model_patcher.ModelPatcher
    clip: comfy.sd.CLIP
    vae: comfy.sd.VAE


def build_checkpoint(kind: str = "sd15", seed: int = 0) -> TinyCheckpoint:
    """MODEL, CLIP and VAE of one tiny checkpoint; seeds derived from `seed`."""
    return TinyCheckpoint(build_model(kind, seed), build_clip(kind, seed + 1), build_vae(seed + 2))


def save_checkpoint(path: str, kind: str = "sd15", seed: int = 0) -> TinyCheckpoint:
    """Write a single-file `.safetensors` checkpoint with ComfyUI's own saver. It loads back through
    `comfy.sd.load_checkpoint_guess_config` / `CheckpointLoaderSimple` once the tiny configs are
    registered (`register_tiny_model_configs`)."""
    if kind == "flow":
        raise ValueError("the tiny flow model has no checkpoint format; build it with build_model('flow')")
    ckpt = build_checkpoint(kind, seed)
    comfy.sd.save_checkpoint(path, ckpt.model, ckpt.clip, ckpt.vae)
    return ckpt
