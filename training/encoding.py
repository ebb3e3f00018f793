"""Encode the training data once, eagerly, before the first step: captions and the teacher's
unconditional input through the loaded CLIP into the conditioning the model takes, and real images
through the loaded VAE into latents (cached on disk, keyed by the data and the VAE).

`EncodedData` holds the result on the CPU; a step asks it for the conditioning of its items.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch

from . import tdft
from .atomic_files import load_torch, save_torch
from .data import ImageCaptionFolder, LatentDataset, PromptList
from .errors import DataError


@dataclass
class EncodedData:
    latents: torch.Tensor | None   # real latents [N, C, H, W] (image mode) or None (data-free)
    item_conds: list[dict]         # per item: conditioning tensors (batch 1, CPU)
    uncond: dict                   # the teacher's unconditional input (batch 1, CPU)
    latent_shape: tuple            # (C, H, W) of one latent
    repeats: list                  # per item: how often it appears in an epoch

    def conds(self, items, device) -> dict:
        """Batched conditioning of data items `items` (a sequence of indices), on `device`."""
        return _to(tdft.concat_conds([self.item_conds[int(i)] for i in items]), device)

    def unconds(self, n: int, device) -> dict:
        return _to(tdft.concat_conds([self.uncond] * n), device)


def _to(cond: dict, device) -> dict:
    return {k: v.to(device) for k, v in cond.items()}


class TextEncoder:
    """Prompts -> the tensors `apply_model` takes for this model (e.g. SDXL's pooled/size `y`)."""

    def __init__(self, base_model, clip, latent_shape):
        self.base_model, self.clip, self.latent_shape = base_model, clip, tuple(latent_shape)

    def encode(self, text: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        tokens = self.clip.tokenize(text)
        cond, pooled = self.clip.encode_from_tokens(tokens, return_pooled=True)
        return _cpu(cond), (None if pooled is None else _cpu(pooled))

    def model_cond(self, cond, pooled, downscale: int = 8) -> dict:
        """ComfyUI's own conditioning for this model from an encoded prompt."""
        h, w = self.latent_shape[-2:]
        extra = self.base_model.extra_conds(
            cross_attn=cond, pooled_output=pooled, width=w * downscale, height=h * downscale,
            target_width=w * downscale, target_height=h * downscale, crop_w=0, crop_h=0,
            device=torch.device("cpu"), noise=torch.zeros((1,) + self.latent_shape))
        return {name: _cpu(c.cond) for name, c in extra.items() if torch.is_tensor(c.cond)}

    def prompt_cond(self, text: str) -> dict:
        return self.model_cond(*self.encode(text))

    def zeros_cond(self) -> dict:
        """The SDXL recipe's unconditional input: zeroed embeddings of the empty prompt."""
        cond, pooled = self.encode("")
        return self.model_cond(torch.zeros_like(cond), None if pooled is None else torch.zeros_like(pooled))


def _cpu(t: torch.Tensor) -> torch.Tensor:
    return t.detach().float().cpu().clone()


def vae_downscale(vae) -> int:
    ratio = getattr(vae, "downscale_ratio", 8)
    return ratio if isinstance(ratio, int) and ratio > 0 else 8  # video VAEs: a tuple


def encode_data(data, base_model, clip, vae, resolution: int, uncond: str, cache_dir: Path,
                log=print) -> EncodedData:
    """Everything the steps need from the data, on the CPU. `uncond`: "empty_prompt" | "zeros"."""
    channels = int(base_model.latent_format.latent_channels)
    with torch.no_grad():
        latents = LATENTS[type(data)](data, base_model, vae, cache_dir, log)
        if latents is not None:
            latent_shape = tuple(latents.shape[1:])
        else:
            side = resolution // vae_downscale(vae)
            latent_shape = (channels, side, side)
        text = TextEncoder(base_model, clip, latent_shape)
        cache: dict[str, dict] = {}
        for caption in data.captions:
            if caption not in cache:
                cache[caption] = text.prompt_cond(caption)
        item_conds = [cache[caption] for caption in data.captions]
        if uncond == "zeros":
            uncond_cond = text.zeros_cond()
        else:
            uncond_cond = cache[""] if "" in cache else text.prompt_cond("")
    return EncodedData(latents, item_conds, uncond_cond, latent_shape, list(data.repeats))


def _encode_images(data, base_model, vae, cache_dir: Path, log):
    if vae is None:
        raise DataError("training on images needs the VAE of the checkpoint to encode them")
    path = _latent_cache_path(data, base_model, vae, cache_dir)
    if path.is_file():
        try:
            cached = load_torch(path)
            usable = torch.is_tensor(cached) and cached.shape[0] == len(data) and bool(torch.isfinite(cached).all())
        except Exception as e:  # damaged (a crash while copying, a full disk): encode again
            log(f"the latent cache {path} is unreadable ({type(e).__name__}); encoding the images again")
            usable = False
        if usable:
            log(f"using cached latents {path}")
            return cached
    latents = []
    for i in range(len(data)):
        image = data.load_image(i)[None]
        raw = vae.encode(image[..., :3])
        latents.append(base_model.process_latent_in(raw.float().cpu()).clone())
    latents = torch.cat(latents)
    save_torch(path, latents)
    log(f"encoded {len(latents)} images to latents {tuple(latents.shape[1:])}, cached at {path}")
    return latents


# data kind -> its real latents (None: data-free, the trajectory buffer makes its own)
LATENTS = {
    ImageCaptionFolder: _encode_images,
    LatentDataset: lambda data, *_: data.latents,
    PromptList: lambda data, *_: None,
}


def _latent_cache_path(data, base_model, vae, cache_dir: Path) -> Path:
    from .identity import tensor_digest

    h = hashlib.sha256(data.fingerprint().encode())
    h.update(base_model.latent_format.__class__.__name__.encode())
    first_stage = getattr(vae, "first_stage_model", None)
    if first_stage is not None:  # a VAE without one: the cache is still keyed by the data
        sd = first_stage.state_dict()
        for name in sorted(sd)[:8]:
            tensor_digest(h, name, sd[name])
    return Path(cache_dir) / f"latents-{h.hexdigest()[:16]}.pt"
