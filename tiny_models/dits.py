"""Tiny flow DiTs and video models, from ComfyUI's own model-config classes.

Each class is ComfyUI's config class for the family with
  * `unet_config`: ComfyUI's detection keys plus one tiny width no real model has, so a registered
    tiny class (files.register_tiny_model_configs) claims only tiny files;
  * `unet_extra_config`: what ComfyUI's detector assumes instead of reading from the weights (head
    counts, text widths: `comfy.model_detection.detect_unet_config`); ComfyUI applies it on top of
    the detected config, in memory and from files alike;
  * `tiny_unet_config`: the complete config, equal to what ComfyUI detects from the weights plus
    `unet_extra_config`, so a model built in memory and one loaded from its file are configured
    identically;
  * `clip_target`: the tiny text encoder (text_encoders.py).
Where ComfyUI's detector fixes the head width at 128 (Wan, Flux/Chroma, HunyuanVideo), the tiny
models use one head of 128.
"""
from __future__ import annotations

import comfy.sd1_clip
import comfy.supported_models
import comfy.text_encoders.flux
import comfy.text_encoders.hunyuan_image
import comfy.text_encoders.hunyuan_video
import comfy.text_encoders.lt
import comfy.text_encoders.lumina2
import comfy.text_encoders.pixart_t5
import comfy.text_encoders.qwen_image
import comfy.text_encoders.sd3_clip
import comfy.text_encoders.wan

from .text_encoders import HUNYUAN15_TE_OPTIONS, TE_WIDTH, clip_target

# Flux-architecture rope: three axes summing to the single head's 128 (ComfyUI's detector default).
_FLUX_AXES = [16, 56, 56]


class TinySD3(comfy.supported_models.SD3):
    """MMDiT (SD3/SD3.5). Text: CLIP-L + CLIP-G; ComfyUI's SD3 encoder joins their hidden states
    zero-padded to 4096 wide and T5 only at width 4096 (a 130 M-parameter embedding), so the tiny
    one leaves T5 out, as ComfyUI's CLIP-L + CLIP-G setups do."""
    unet_config = {"in_channels": 16, "pos_embed_scaling_factor": None, "depth": 2}
    tiny_unet_config = {
        "in_channels": 16, "out_channels": 16, "patch_size": 2, "depth": 2, "input_size": None,
        "adm_in_channels": 2 * TE_WIDTH, "pos_embed_scaling_factor": None, "pos_embed_max_size": 16,
        "num_patches": 256, "x_block_self_attn_layers": [],
        "context_embedder_config": {"target": "torch.nn.Linear", "params": {"in_features": 4096, "out_features": 128}},
    }

    def clip_target(self, state_dict={}):
        return clip_target(comfy.text_encoders.sd3_clip.SD3Tokenizer,
                           comfy.text_encoders.sd3_clip.sd3_clip(clip_l=True, clip_g=True, t5=False))


_WAN_COMMON = {
    "image_model": "wan2.1", "model_type": "t2v", "dim": 128, "ffn_dim": 256, "freq_dim": 256,
    "text_dim": TE_WIDTH, "num_heads": 1, "num_layers": 2, "patch_size": (1, 2, 2), "window_size": (-1, -1),
    "qk_norm": True, "cross_attn_norm": True, "eps": 1e-6,
}


class TinyWan21(comfy.supported_models.WAN21_T2V):
    """Wan 2.1 T2V (and each Wan 2.2 A14B expert, the same architecture). Text: UMT5."""
    unet_config = {"image_model": "wan2.1", "model_type": "t2v", "dim": 128, "out_dim": 16}
    unet_extra_config = {"text_dim": TE_WIDTH}
    tiny_unet_config = {**_WAN_COMMON, "in_dim": 16, "out_dim": 16}

    def clip_target(self, state_dict={}):
        return clip_target(comfy.text_encoders.wan.WanT5Tokenizer, comfy.text_encoders.wan.te())


class TinyWan22TI2V5B(comfy.supported_models.WAN22_T2V):
    """Wan 2.2 TI2V-5B: 48 latent channels (its own VAE: 16x spatial, 4x temporal)."""
    unet_config = {"image_model": "wan2.1", "model_type": "t2v", "dim": 128, "out_dim": 48}
    unet_extra_config = {"text_dim": TE_WIDTH}
    tiny_unet_config = {**_WAN_COMMON, "in_dim": 48, "out_dim": 48}

    def clip_target(self, state_dict={}):
        return clip_target(comfy.text_encoders.wan.WanT5Tokenizer, comfy.text_encoders.wan.te())


class TinyQwenImage(comfy.supported_models.QwenImage):
    """Qwen-Image. Text: ComfyUI's Qwen-Image encoder on a text-only tiny Qwen2.5-VL."""
    unet_config = {"image_model": "qwen_image", "num_layers": 2}
    unet_extra_config = {"attention_head_dim": 32, "num_attention_heads": 2, "joint_attention_dim": TE_WIDTH,
                         "axes_dims_rope": (8, 12, 12)}
    tiny_unet_config = {"image_model": "qwen_image", "in_channels": 64, "num_layers": 2, **unet_extra_config}

    def clip_target(self, state_dict={}):
        return clip_target(comfy.text_encoders.qwen_image.QwenImageTokenizer, comfy.text_encoders.qwen_image.te())


_FLUX_COMMON = {
    "axes_dim": _FLUX_AXES, "num_heads": 1, "mlp_ratio": 4.0, "theta": 10000, "qkv_bias": True,
    "txt_ids_dims": [], "patch_size": 2, "hidden_size": 128, "context_in_dim": TE_WIDTH,
    "depth": 1, "depth_single_blocks": 1,
}


class TinyChroma(comfy.supported_models.Chroma):
    """Chroma: the Flux architecture without guidance distillation (real CFG). Text: T5."""
    unet_config = {"image_model": "chroma", "hidden_size": 128}
    # the modulation approximator: ComfyUI's detector assumes Chroma's full sizes
    unet_extra_config = {"out_dim": 128, "hidden_dim": 64, "n_layers": 2}
    tiny_unet_config = {**_FLUX_COMMON, "image_model": "chroma", "in_channels": 64, "out_channels": 64,
                        "vec_in_dim": None, "in_dim": 64, **unet_extra_config}

    def clip_target(self, state_dict={}):
        return clip_target(comfy.text_encoders.pixart_t5.PixArtTokenizer, comfy.text_encoders.pixart_t5.pixart_te())


class TinyFluxDev(comfy.supported_models.Flux):
    """Flux-dev: guidance-distilled (`guidance_embed`), for refusal tests. Text: CLIP-L + T5."""
    unet_config = {"image_model": "flux", "guidance_embed": True, "hidden_size": 128}
    tiny_unet_config = {**_FLUX_COMMON, "image_model": "flux", "in_channels": 16, "out_channels": 16,
                        "vec_in_dim": TE_WIDTH, "guidance_embed": True, "yak_mlp": False, "txt_norm": False}

    def clip_target(self, state_dict={}):
        return clip_target(comfy.text_encoders.flux.FluxTokenizer, comfy.text_encoders.flux.flux_clip())


class TinyLTXV(comfy.supported_models.LTXV):
    """LTX-Video. Text: T5 with its attention mask (the model needs it)."""
    unet_config = {"image_model": "ltxv", "cross_attention_dim": 64}
    unet_extra_config = {"attention_head_dim": 32, "num_attention_heads": 2, "caption_channels": TE_WIDTH}
    tiny_unet_config = {"image_model": "ltxv", "num_layers": 2, "cross_attention_dim": 64, **unet_extra_config}

    def clip_target(self, state_dict={}):
        return clip_target(comfy.text_encoders.lt.LTXVT5Tokenizer, comfy.text_encoders.lt.ltxv_te())


_HUNYUAN_COMMON = {
    "image_model": "hunyuan_video", "axes_dim": _FLUX_AXES, "meanflow": False, "context_in_dim": TE_WIDTH,
    "hidden_size": 128, "mlp_ratio": 4.0, "num_heads": 1, "depth": 1, "depth_single_blocks": 1,
    "theta": 256, "qkv_bias": True, "byt5": False,
}


class TinyHunyuanVideo(comfy.supported_models.HunyuanVideo):
    """HunyuanVideo v1: guidance-distilled, for refusal tests. Text: a stand-in CLIP-L (ComfyUI's
    HunyuanVideo tokenizer needs a Llama tokenizer file that ComfyUI's tree lacks)."""
    unet_config = {"image_model": "hunyuan_video", "hidden_size": 128, "guidance_embed": True}
    unet_extra_config = {"vec_in_dim": TE_WIDTH}  # the detector assumes CLIP-L's 768
    tiny_unet_config = {**_HUNYUAN_COMMON, "in_channels": 16, "out_channels": 16, "patch_size": [1, 2, 2],
                        "guidance_embed": True, "use_cond_type_embedding": False, "vision_in_dim": None,
                        "meanflow_sum": False, **unet_extra_config}

    def clip_target(self, state_dict={}):
        return clip_target(comfy.sd1_clip.SD1Tokenizer, comfy.sd1_clip.SD1ClipModel)


class TinyHunyuanVideo15(comfy.supported_models.HunyuanVideo15):
    """HunyuanVideo 1.5: 32 latent channels, 65 input channels (latent + image condition + mask).
    Text: ComfyUI's HunyuanVideo 1.5 encoder on a text-only tiny Qwen2.5-VL (no ByT5 glyph encoder)."""
    unet_config = {"image_model": "hunyuan_video", "hidden_size": 128, "vision_in_dim": 16}
    tiny_unet_config = {**_HUNYUAN_COMMON, "in_channels": 65, "out_channels": 32, "patch_size": [1, 1, 1],
                        "vec_in_dim": None, "guidance_embed": False, "use_cond_type_embedding": True,
                        "vision_in_dim": 16, "meanflow_sum": True}

    def clip_target(self, state_dict={}):
        return clip_target(comfy.text_encoders.hunyuan_video.HunyuanVideo15Tokenizer,
                           comfy.text_encoders.hunyuan_image.te(byt5=False), HUNYUAN15_TE_OPTIONS)


class TinyLumina2(comfy.supported_models.Lumina2):
    """Lumina Image 2.0 (NextDiT). Text: Gemma 2."""
    unet_config = {"image_model": "lumina2", "dim": 64}
    unet_extra_config = {"n_heads": 2, "n_kv_heads": 1, "n_refiner_layers": 1, "axes_dims": [8, 12, 12],
                         "axes_lens": [300, 512, 512], "rope_theta": 10000.0, "ffn_dim_multiplier": 4.0}
    tiny_unet_config = {"image_model": "lumina2", "patch_size": 2, "in_channels": 16, "dim": 64,
                        "cap_feat_dim": TE_WIDTH, "n_layers": 2, "qk_norm": True, **unet_extra_config}

    def clip_target(self, state_dict={}):
        return clip_target(comfy.text_encoders.lumina2.LuminaTokenizer, comfy.text_encoders.lumina2.te())
