"""The real models of each supported family, as ComfyUI configures them, for planning without their
weights (planner.py, bench/plan_table.py): the `unet_config` ComfyUI's model detection derives from
the released checkpoint's tensor shapes (comfy.model_detection; the SD1.5 and SDXL dicts are the
ones it writes out in `unet_config_from_diffusers_unet`), the text encoder's output shape, and the
VAE's compression (latent pixels per image pixel, per side; pixel frames per latent frame).
"""
from __future__ import annotations

from dataclasses import dataclass

from .geometry import LatentGeometry
from .planner import TextShape

_UNET = {"use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True,
         "legacy": False, "in_channels": 4, "model_channels": 320, "use_temporal_attention": False,
         "use_temporal_resblock": False}
_FLUX_AXES = [16, 56, 56]


@dataclass(frozen=True)
class RealModel:
    name: str
    config_class: str          # comfy.supported_models.<config_class>
    unet_config: dict
    text: TextShape
    resolution: int            # the family's native training resolution, pixels per side
    frames: int = 1            # pixel frames per clip (video)
    spatial: int = 8           # VAE compression per side
    temporal: int | None = None  # VAE time compression (video VAEs)

    def model_config(self):
        import comfy.supported_models

        return getattr(comfy.supported_models, self.config_class)(dict(self.unet_config))

    def latent_shape(self, resolution: int | None = None) -> tuple:
        config_class = self.model_config()
        channels = int(config_class.latent_format.latent_channels)
        time_axis = int(getattr(config_class.latent_format, "latent_dimensions", 2)) == 3
        geometry = LatentGeometry(channels, self.spatial, self.temporal, time_axis, self.frames)
        return geometry.shape(resolution or self.resolution)


REAL_MODELS: dict[str, RealModel] = {m.name: m for m in (
    RealModel("SD1.5", "SD15", {**_UNET, "adm_in_channels": None, "num_res_blocks": [2, 2, 2, 2],
                                "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0], "channel_mult": [1, 2, 4, 4],
                                "transformer_depth_middle": 1, "use_linear_in_transformer": False,
                                "context_dim": 768, "num_heads": 8,
                                "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0]},
              TextShape(77, 768), 512),
    RealModel("SDXL", "SDXL", {**_UNET, "num_classes": "sequential", "adm_in_channels": 2816,
                               "num_res_blocks": [2, 2, 2], "transformer_depth": [0, 0, 2, 2, 10, 10],
                               "channel_mult": [1, 2, 4], "transformer_depth_middle": 10,
                               "use_linear_in_transformer": True, "context_dim": 2048, "num_head_channels": 64,
                               "transformer_depth_output": [0, 0, 0, 2, 2, 2, 10, 10, 10]},
              TextShape(77, 2048, pooled=1280), 1024),
    # CLIP-L + CLIP-G (77 tokens, padded to 4096 wide) joined with T5-XXL's 77 tokens
    RealModel("SD3.5 medium", "SD3", {
        "in_channels": 16, "out_channels": 16, "patch_size": 2, "depth": 24, "input_size": None,
        "adm_in_channels": 2048, "pos_embed_scaling_factor": None, "pos_embed_max_size": 384,
        "num_patches": 147456, "x_block_self_attn_layers": list(range(13)), "qk_norm": "rms",
        "context_embedder_config": {"target": "torch.nn.Linear", "params": {"in_features": 4096, "out_features": 1536}}},
        TextShape(154, 4096, pooled=2048), 1024),
    RealModel("Wan 2.1 1.3B", "WAN21_T2V", {
        "image_model": "wan2.1", "model_type": "t2v", "dim": 1536, "ffn_dim": 8960, "freq_dim": 256,
        "text_dim": 4096, "num_heads": 12, "num_layers": 30, "in_dim": 16, "out_dim": 16, "patch_size": (1, 2, 2),
        "window_size": (-1, -1), "qk_norm": True, "cross_attn_norm": True, "eps": 1e-6},
        TextShape(512, 4096), 480, frames=17, temporal=4),
    RealModel("Wan 2.1 14B", "WAN21_T2V", {
        "image_model": "wan2.1", "model_type": "t2v", "dim": 5120, "ffn_dim": 13824, "freq_dim": 256,
        "text_dim": 4096, "num_heads": 40, "num_layers": 40, "in_dim": 16, "out_dim": 16, "patch_size": (1, 2, 2),
        "window_size": (-1, -1), "qk_norm": True, "cross_attn_norm": True, "eps": 1e-6},
        TextShape(512, 4096), 480, frames=17, temporal=4),
    # Qwen2.5-VL hidden states of the prompt (length varies; 77 tokens assumed)
    RealModel("Qwen-Image", "QwenImage", {"image_model": "qwen_image", "in_channels": 64, "out_channels": 16,
                                          "num_layers": 60, "attention_head_dim": 128, "num_attention_heads": 24,
                                          "joint_attention_dim": 3584, "axes_dims_rope": (16, 56, 56)},
              TextShape(77, 3584), 1024, temporal=4),
    RealModel("Chroma", "Chroma", {
        "image_model": "chroma", "in_channels": 64, "out_channels": 64, "context_in_dim": 4096, "hidden_size": 3072,
        "mlp_ratio": 4.0, "num_heads": 24, "depth": 19, "depth_single_blocks": 38, "axes_dim": _FLUX_AXES,
        "theta": 10000, "patch_size": 2, "qkv_bias": True, "in_dim": 64, "out_dim": 3072, "hidden_dim": 5120,
        "n_layers": 5, "txt_ids_dims": [], "vec_in_dim": None},
        TextShape(77, 4096, pooled=None), 1024),
    # LTX-Video 2B (0.9.x): T5-XXL padded to 128 tokens; its VAE compresses 32x in space, 8x in time
    RealModel("LTXV 2B", "LTXV", {"image_model": "ltxv", "num_layers": 28, "cross_attention_dim": 2048,
                                  "attention_head_dim": 64, "num_attention_heads": 32, "caption_channels": 4096},
              TextShape(128, 4096, pooled=None, mask=True), 768, frames=17, spatial=32, temporal=8),
)}
