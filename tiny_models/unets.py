"""Tiny SD1.x / SD2 / SDXL UNets (and the SD1.5 UNet run as a flow model), from ComfyUI's classes."""
from __future__ import annotations

import torch

import comfy.sd1_clip
import comfy.sdxl_clip
import comfy.supported_models
import comfy.text_encoders.sd2_clip
from comfy.model_base import ModelType

from .text_encoders import CLIP_G_SMALL_XL, CLIP_L_SMALL, CLIP_SMALL, SDXL_POOLED_DIM, clip_target

UNET_COMMON = {
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


class TinySD15(comfy.supported_models.SD15):
    unet_config = {"context_dim": 64, "model_channels": 32, "use_linear_in_transformer": False,
                   "adm_in_channels": None, "use_temporal_attention": False}
    unet_extra_config = {"num_heads": 2, "num_head_channels": -1}

    def clip_target(self, state_dict={}):
        return clip_target(comfy.sd1_clip.SD1Tokenizer, comfy.sd1_clip.SD1ClipModel,
                           {"clip_l_model_config": CLIP_SMALL})


class TinySD2(comfy.supported_models.SD20):
    unet_config = {"context_dim": 64, "model_channels": 32, "use_linear_in_transformer": True,
                   "adm_in_channels": None, "use_temporal_attention": False}
    unet_extra_config = {"num_heads": -1, "num_head_channels": 16, "attn_precision": torch.float32}

    def model_type(self, state_dict, prefix=""):
        # SD2's own detector looks at a layer the tiny UNet does not have; this tiny class stands for
        # the 768-v models, so it is V-prediction (ComfyUI's saver also writes a `v_pred` marker).
        return ModelType.V_PREDICTION

    def clip_target(self, state_dict={}):
        return clip_target(comfy.text_encoders.sd2_clip.SD2Tokenizer, comfy.text_encoders.sd2_clip.SD2ClipModel,
                           {"clip_h_model_config": {**CLIP_SMALL, "hidden_act": "gelu"}})


class TinySDXL(comfy.supported_models.SDXL):
    unet_config = {"model_channels": 32, "use_linear_in_transformer": True, "context_dim": 128,
                   "adm_in_channels": SDXL_POOLED_DIM + 6 * 256, "use_temporal_attention": False}
    unet_extra_config = {"num_heads": -1, "num_head_channels": 16}

    def clip_target(self, state_dict={}):
        return clip_target(comfy.sdxl_clip.SDXLTokenizer, comfy.sdxl_clip.SDXLClipModel, {
            "clip_l_model_config": CLIP_L_SMALL,
            "clip_g_model_config": {**CLIP_G_SMALL_XL, "hidden_act": "gelu"},
        })


class TinyFlow(TinySD15):
    """The tiny SD1.5 UNet as a rectified-flow model (ComfyUI's CONST sampling, shift 3)."""
    sampling_settings = {"shift": 3.0, "multiplier": 1000}

    def model_type(self, state_dict, prefix=""):
        return ModelType.FLOW


def full_unet_config(config_cls) -> dict:
    cfg = {**UNET_COMMON, **config_cls.unet_config}
    if issubclass(config_cls, comfy.supported_models.SDXL):
        cfg["num_classes"] = "sequential"
    return cfg
