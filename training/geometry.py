"""The shape of one training latent, from the model's own latent format and the VAE's compression.

Images: [C, H, W]. Video models (and image models on a video VAE's latents, e.g. Qwen-Image):
[C, T, H, W], where a clip of F pixel frames becomes T = (F − 1)/c + 1 latent frames for a VAE that
compresses time c-fold (F must be c·k + 1: 1, 5, 9, 13, 17, ... for Wan and HunyuanVideo).
"""
from __future__ import annotations

from dataclasses import dataclass

from .errors import DataError

from .recipes import VIDEO_FRAMES as DEFAULT_VIDEO_FRAMES  # families no recipe row names


@dataclass(frozen=True)
class LatentGeometry:
    channels: int
    spatial: int             # pixels per latent pixel, per side
    temporal: int | None     # pixel frames per latent frame (video VAEs), None: no time axis in the VAE
    time_axis: bool          # the latents have a time axis ([C, T, H, W])
    frames: int              # pixel frames per training sample (1 for image models)

    @property
    def latent_frames(self) -> int:
        return (self.frames - 1) // (self.temporal or 1) + 1

    def shape(self, resolution: int) -> tuple:
        side = max(1, resolution // self.spatial)
        return (self.channels,) + ((self.latent_frames,) if self.time_axis else ()) + (side, side)


def vae_compression(vae) -> tuple[int, int | None]:
    """(spatial, temporal) compression of a ComfyUI VAE; (8, None) without one."""
    if vae is None:
        return 8, None
    formula = getattr(vae, "downscale_index_formula", None)
    if formula:
        return int(formula[-1]), int(formula[0])
    ratio = getattr(vae, "downscale_ratio", 8)
    return (ratio if isinstance(ratio, int) and ratio > 0 else 8), None


def latent_geometry(base_model, vae, video: bool, frames: int) -> LatentGeometry:
    """`video`: the model family makes clips; `frames`: the config's (0 = the family's default)."""
    spatial, temporal = vae_compression(vae)
    time_axis = int(getattr(base_model.latent_format, "latent_dimensions", 2)) == 3
    if time_axis and vae is None:
        temporal = 4  # Wan, HunyuanVideo; a VAE given with the model says exactly
    if not video:
        if frames > 1:
            raise DataError(f"frames={frames}: this is an image model; it trains single images (frames 1)")
        frames = 1
    elif frames == 0:
        frames = DEFAULT_VIDEO_FRAMES
    c = temporal or 1
    if (frames - 1) % c:
        raise DataError(f"frames={frames}: this model's VAE compresses time {c}-fold and takes {c}·k+1 frames "
                        f"({', '.join(str(c * k + 1) for k in range(5))}, ...)")
    return LatentGeometry(int(base_model.latent_format.latent_channels), spatial, temporal, time_axis, frames)
