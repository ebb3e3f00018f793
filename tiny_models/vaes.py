"""Tiny VAEs: ComfyUI's own VAE classes, small enough for tests, that ComfyUI's VAE loader
(`comfy.sd.VAE(sd=...)`, the VAELoader node) detects from their weights.

ComfyUI's detector fixes the width of most full VAEs (SD/Flux AutoencoderKL, Wan 2.2, HunyuanVideo),
so a narrow copy of those could not load from a file; the families that have one use ComfyUI's
tiny autoencoders of the same latent space instead (TAESD for 16-channel image latents, TAEHV for
Wan 2.2 and HunyuanVideo 1.5 - the `taesd3`/`taef1`/`taew2_2`/`lighttaehy1_5` architectures).
Wan 2.1's VAE (also Qwen-Image's) reads its width from the weights, and LTXV's VAE takes its
block layout from the file's `config` metadata, so those two are the real architectures, narrow.
"""
from __future__ import annotations

import json

import comfy.sd

from .weights import seeded_init_

# LTXV: ComfyUI's causal video VAE at its fixed 128-channel base with one block per stage; three
# space-and-time compressions and a 4x4 patch give LTXV's 8x temporal, 32x spatial compression.
LTXV_VAE_CONFIG = {
    "dims": 3, "latent_channels": 128, "patch_size": 4, "norm_layer": "pixel_norm",
    "latent_log_var": "uniform", "causal_decoder": False,
    "encoder_blocks": [["compress_all", 1]] * 3,
    # the decoder's first up-block must be a residual block: ComfyUI detects LTXV's VAE by it
    "decoder_blocks": [["compress_all", 1]] * 3 + [["res_x", 1]],
}


def _taesd(latent_channels):
    import comfy.taesd.taesd

    return lambda: comfy.taesd.taesd.TAESD(latent_channels=latent_channels)


def _taehv(latent_channels):
    import comfy.taesd.taehv

    return lambda: comfy.taesd.taehv.TAEHV(latent_channels=latent_channels)


def _wan21():
    import comfy.ldm.wan.vae

    return comfy.ldm.wan.vae.WanVAE(dim=8, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
                                    temperal_downsample=[False, True, True], image_channels=3)


def _ltxv():
    import comfy.ldm.lightricks.vae.causal_video_autoencoder as ltxv_vae

    return ltxv_vae.VideoVAE(config=LTXV_VAE_CONFIG)


# name -> (builder of the seeded module, file metadata ComfyUI's loader reads)
VAES = {
    "taesd": (_taesd(4), None),           # SD1.x/SD2/SDXL: 4 channels, 8x
    "taesd16": (_taesd(16), None),        # SD3, Flux, Chroma, Lumina 2: 16 channels, 8x
    "wan21": (_wan21, None),              # Wan 2.1, Wan 2.2 A14B, Qwen-Image: 16 channels, 8x, 4x temporal
    "taehv48": (_taehv(48), None),        # Wan 2.2 TI2V-5B: 48 channels, 16x, 4x temporal
    "taehv32": (_taehv(32), None),        # HunyuanVideo 1.5: 32 channels, 16x, 4x temporal
    "ltxv": (_ltxv, {"config": json.dumps({"vae": LTXV_VAE_CONFIG})}),  # 128 channels, 32x, 8x temporal
}


def vae_state_dict(name: str, seed: int) -> tuple[dict, dict | None]:
    """The seeded weights of tiny VAE `name` and the metadata its file carries."""
    if name not in VAES:
        raise ValueError(f"unknown tiny VAE {name!r}; choose from {sorted(VAES)}")
    build, metadata = VAES[name]
    return seeded_init_(build(), seed).state_dict(), metadata


def build_named_vae(name: str, seed: int) -> comfy.sd.VAE:
    """A `comfy.sd.VAE` detected by ComfyUI from the seeded weights, as from a file."""
    sd, metadata = vae_state_dict(name, seed)
    return comfy.sd.VAE(sd=sd, metadata=metadata)
