"""The tiny model kinds: one table row each, with the facts a test or a trainer needs.

Latent channels and dimensions are ComfyUI's (the config class's `latent_format`); the other facts
are those of the real family, which the tiny VAE reproduces (tests check it against ComfyUI's VAE).
"""
from __future__ import annotations

from dataclasses import dataclass

from . import dits, unets


@dataclass(frozen=True)
class Family:
    config: type                    # the tiny ComfyUI model-config class
    vae: str | None                 # vaes.VAES name; None: the kind comes without a VAE
    sample_latent: tuple            # a batch-1 latent that ComfyUI samples in tests
    spatial_compression: int        # image pixels per latent pixel, per side
    temporal_compression: int | None = None  # video: pixel frames = c * (latent frames - 1) + 1
    cond_keys: tuple = ()           # conditioning-dict keys the model reads besides the cross-attention
    text_encoder: str = ""          # which encoder, real or stand-in (text_encoders.py)
    clip_type: str | None = None    # ComfyUI CLIPType for its text-encoder files; None: no file set
    spiece_vocabulary: bool = False  # its tokenizer takes a sentencepiece model (tokenizer_data)
    guidance_distilled: bool = False  # guidance_embed: no real unconditional branch
    experts: tuple = ()             # several diffusion models, high noise first (Wan 2.2 A14B)

    @property
    def latent_channels(self) -> int:
        return self.config.latent_format.latent_channels

    @property
    def latent_dimensions(self) -> int:
        """2 for image latents [B, C, H, W], 3 for video latents [B, C, T, H, W]."""
        return self.config.latent_format.latent_dimensions

    def pixel_frames(self, latent_frames: int) -> int:
        """Frames a latent of `latent_frames` decodes to (4k+1 for Wan's 4x temporal VAE)."""
        if self.temporal_compression is None:
            return latent_frames
        return self.temporal_compression * (latent_frames - 1) + 1

    def latent_frames(self, pixel_frames: int) -> int:
        """Latent frames of a clip of `pixel_frames`, which must be c*k+1 for temporal compression c."""
        c = self.temporal_compression or 1
        if pixel_frames < 1 or (pixel_frames - 1) % c:
            raise ValueError(f"{pixel_frames} frames: this family's VAE takes {c}*k+1 frames (1, {c + 1}, {2 * c + 1}, ...)")
        return (pixel_frames - 1) // c + 1


# Wan 2.2 A14B switches from the high-noise to the low-noise expert at this fraction of the
# timestep range (t/T = 0.875 for text-to-video), as Wan's reference code does.
WAN22_A14B_BOUNDARY = 0.875

_WAN_TE = "real: UMT5 (tiny; ComfyUI's T5-pile sentencepiece as vocabulary)"
_QWEN_TE = "stand-in: ComfyUI's {} encoder on a text-only tiny Qwen2.5-VL (vision tower left out)"

FAMILIES: dict[str, Family] = {
    # SD1.x / SD2 / SDXL UNets: single-file checkpoints (files.save_checkpoint)
    "sd15": Family(unets.TinySD15, "taesd", (1, 4, 8, 8), 8, text_encoder="real: CLIP-L"),
    "sd2": Family(unets.TinySD2, "taesd", (1, 4, 8, 8), 8, text_encoder="real: CLIP-H"),
    "sdxl": Family(unets.TinySDXL, "taesd", (1, 4, 8, 8), 8, cond_keys=("pooled_output",),
                   text_encoder="real: CLIP-L + CLIP-G"),
    "flow": Family(unets.TinyFlow, "taesd", (1, 4, 8, 8), 8, text_encoder="real: CLIP-L"),
    # flow DiTs and video models
    "sd3": Family(dits.TinySD3, "taesd16", (1, 16, 8, 8), 8, cond_keys=("pooled_output",),
                  text_encoder="real: CLIP-L + CLIP-G (no T5, see dits.TinySD3)", clip_type="SD3"),
    "wan21": Family(dits.TinyWan21, "wan21", (1, 16, 2, 8, 8), 8, 4, text_encoder=_WAN_TE, clip_type="WAN",
                    spiece_vocabulary=True),
    "wan22_5b": Family(dits.TinyWan22TI2V5B, "taehv48", (1, 48, 2, 4, 4), 16, 4, text_encoder=_WAN_TE,
                       clip_type="WAN", spiece_vocabulary=True),
    "wan22_a14b": Family(dits.TinyWan21, "wan21", (1, 16, 2, 8, 8), 8, 4, text_encoder=_WAN_TE, clip_type="WAN",
                         spiece_vocabulary=True, experts=("high_noise", "low_noise")),
    # an image model on the Wan 2.1 VAE: one-frame video latents
    "qwen_image": Family(dits.TinyQwenImage, "wan21", (1, 16, 1, 8, 8), 8, 4,
                         text_encoder=_QWEN_TE.format("Qwen-Image"), clip_type="QWEN_IMAGE"),
    "chroma": Family(dits.TinyChroma, "taesd16", (1, 16, 8, 8), 8, cond_keys=("pooled_output",),
                     text_encoder="real: T5", clip_type="CHROMA"),
    "ltxv": Family(dits.TinyLTXV, "ltxv", (1, 128, 2, 4, 4), 32, 8, cond_keys=("attention_mask",),
                   text_encoder="real: T5 (with attention mask)", clip_type="LTXV"),
    "hunyuan_video15": Family(dits.TinyHunyuanVideo15, "taehv32", (1, 32, 2, 4, 4), 16, 4,
                              text_encoder=_QWEN_TE.format("HunyuanVideo 1.5")),
    "lumina2": Family(dits.TinyLumina2, "taesd16", (1, 16, 8, 8), 8,
                      text_encoder="real: Gemma 2 (tiny; ComfyUI's T5-pile sentencepiece as vocabulary)",
                      clip_type="LUMINA2", spiece_vocabulary=True),
    # guidance-distilled (refusal tests): `guidance` comes from the model's own default or FluxGuidance
    "flux_dev": Family(dits.TinyFluxDev, "taesd16", (1, 16, 8, 8), 8, cond_keys=("pooled_output",),
                       text_encoder="real: CLIP-L + T5", clip_type="FLUX", guidance_distilled=True),
    "hunyuan_video": Family(dits.TinyHunyuanVideo, None, (1, 16, 2, 8, 8), 8, 4, cond_keys=("pooled_output",),
                            text_encoder="stand-in: CLIP-L (ComfyUI lacks the Llama tokenizer file)",
                            guidance_distilled=True),
}

KINDS = tuple(FAMILIES)
TINY_CONFIGS = {kind: family.config for kind, family in FAMILIES.items()}
SD_KINDS = ("sd15", "sd2", "sdxl", "flow")
DIT_KINDS = tuple(kind for kind in KINDS if kind not in SD_KINDS)


def family(kind: str) -> Family:
    if kind not in FAMILIES:
        raise ValueError(f"unknown tiny model kind {kind!r}; choose from {KINDS}")
    return FAMILIES[kind]
