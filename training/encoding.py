"""Encode the training data once, eagerly, before the first step: captions and the teacher's
unconditional input through the loaded CLIP into the inputs the model takes (conditioning.py), and
real images or clips through the loaded VAE into latents of the model's geometry (geometry.py),
cached on disk, keyed by the data, the sampling of clips and the VAE.

`EncodedData` holds the result on the CPU; a step asks it for the conditioning of its items.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch

from . import tdft
from .atomic_files import load_torch, save_torch
from .conditioning import TextEncoder
from .data import ImageCaptionFolder, LatentDataset, PromptList
from .errors import DataError


@dataclass
class EncodedData:
    latents: torch.Tensor | None   # real latents [N, C, (T,) H, W] or None (data-free)
    item_conds: list[dict]         # per item: conditioning tensors (batch 1, CPU)
    uncond: dict                   # the teacher's unconditional input (batch 1, CPU)
    latent_shape: tuple            # (C, (T,) H, W) of one latent
    repeats: list                  # per item: how often it appears in an epoch
    item_unconds: list[dict] | None = None  # per item, when it carries the item's crop (random crops)

    def conds(self, items, device) -> dict:
        """Batched conditioning of data items `items` (a sequence of indices), on `device`."""
        return _to(tdft.concat_conds([self.item_conds[int(i)] for i in items]), device)

    def unconds(self, n: int, device, items=None) -> dict:
        """The unconditional input of n rows (of data items `items`, whose crop it carries, if given)."""
        if items is not None and self.item_unconds is not None:
            return _to(tdft.concat_conds([self.item_unconds[int(i)] for i in items]), device)
        return _to(tdft.concat_conds([self.uncond] * n), device)


def _to(cond: dict, device) -> dict:
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in cond.items()}


def encode_data(data, base_model, clip, vae, geometry, resolution: int, fps: float, uncond: str,
                cache_dir: Path, log=print, crop: str = "center", seed: int = 0) -> EncodedData:
    """Everything the steps need from the data, on the CPU. `uncond`: "empty_prompt" | "zeros";
    `crop`: "center" | "random" (images: one crop per image drawn from `seed`, its (top, left) passed to
    the model with the caption and the unconditional input, as SDXL's crop micro-conditioning)."""
    at = random_crops(data, seed) if crop == "random" and isinstance(data, ImageCaptionFolder) else None
    with torch.no_grad():
        latents = LATENTS[type(data)](data, base_model, vae, geometry, fps, cache_dir, log, at)
        latent_shape = tuple(latents.shape[1:]) if latents is not None else geometry.shape(resolution)
        text = TextEncoder(base_model, clip, latent_shape)
        def unconditional(extras: dict):
            return text.zeros(extras) if uncond == "zeros" else text.prompt("", "negative", extras)
        if at is None:
            cache = {caption: text.prompt(caption).as_cond() for caption in dict.fromkeys(data.captions)}
            return EncodedData(latents, [cache[caption] for caption in data.captions],
                               unconditional({}).as_cond(), latent_shape, list(data.repeats))
        crops = [_crop_extras(data.crop_origin(i, position)) if position else {} for i, position in enumerate(at)]
        return EncodedData(latents, [text.prompt(c, "positive", e).as_cond() for c, e in zip(data.captions, crops)],
                           unconditional({}).as_cond(), latent_shape, list(data.repeats),
                           [unconditional(e).as_cond() for e in crops])


def random_crops(data, seed: int) -> list[tuple[float, float] | None]:
    """Per item of an image folder: where its random crop sits (None for clips: centred)."""
    from .draws import IMAGE_CROP, generator

    return [None if item.is_clip else tuple(torch.rand(2, generator=generator(IMAGE_CROP, seed, i)).tolist())
            for i, item in enumerate(data.items)]


def _crop_extras(origin: tuple[int, int]) -> dict:
    """The conditioning keys ComfyUI's SDXL reads its crop micro-conditioning from (CLIPTextEncodeSDXL's)."""
    top, left = origin
    return {"crop_h": top, "crop_w": left}


def _encode_media(data, base_model, vae, geometry, fps: float, cache_dir: Path, log, at=None):
    """Images (and, for video models, clips) through the VAE into the model's latent space, cached.
    `at`: per item where its crop sits (random_crops), None: centred."""
    if vae is None:
        raise DataError("training on images needs the VAE of the checkpoint to encode them")
    frames = geometry.frames if geometry.time_axis else 1  # image models: a clip's first frame
    if frames > 1 and data.has_clips and not all(item.is_clip for item in data.items):
        stills = [item.path.name for item in data.items if not item.is_clip]
        named = ", ".join(stills[:5]) + (", ..." if len(stills) > 5 else "")
        raise DataError(f"{str(data.folder)!r} mixes images or one-frame clips ({named}) and clips ({frames} "
                        "frames): their latents cannot share a batch; train them in separate runs, or set frames = 1")
    path = _latent_cache_path(data, base_model, vae, (frames, fps) + ((tuple(at),) if at else ()), cache_dir)
    cached = _read_cache(path, len(data), log)
    if cached is not None:
        return cached
    latents = []
    for i in range(len(data)):
        pixels = data.load_frames(i, frames, fps) if at is None or at[i] is None else data.load_image(i, at[i])[None]
        raw = vae.encode(pixels[..., :3])
        latents.append(base_model.process_latent_in(raw.float().cpu()).clone())
    latents = torch.cat(latents)
    save_torch(path, latents)
    log(f"encoded {len(latents)} items to latents {tuple(latents.shape[1:])}, cached at {path}")
    return latents


def _read_cache(path: Path, count: int, log):
    if not path.is_file():
        return None
    try:
        cached = load_torch(path)
        usable = torch.is_tensor(cached) and cached.shape[0] == count and bool(torch.isfinite(cached).all())
    except Exception as e:  # damaged (a crash while copying, a full disk): encode again
        log(f"the latent cache {path} is unreadable ({type(e).__name__}); encoding the data again")
        return None
    if usable:
        log(f"using cached latents {path}")
        return cached
    return None


# data kind -> its real latents (None: data-free, the trajectory buffer makes its own)
LATENTS = {
    ImageCaptionFolder: _encode_media,
    LatentDataset: lambda data, *_: data.latents,
    PromptList: lambda data, *_: None,
}


def _latent_cache_path(data, base_model, vae, sampling, cache_dir: Path) -> Path:
    from .identity import tensor_digest

    h = hashlib.sha256(f"{data.fingerprint()}|frames, fps={sampling}|".encode())
    h.update(base_model.latent_format.__class__.__name__.encode())
    first_stage = getattr(vae, "first_stage_model", None)
    if first_stage is not None:  # a VAE without one: the cache is still keyed by the data
        sd = first_stage.state_dict()
        for name in sorted(sd)[:8]:
            tensor_digest(h, name, sd[name])
    return Path(cache_dir) / f"latents-{h.hexdigest()[:16]}.pt"
