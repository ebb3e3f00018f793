"""Seeded weights for tiny ComfyUI models.

ComfyUI creates its layers with `torch.empty` (the real weights come from a file), so a tiny model
built in memory holds garbage until every parameter, and every float buffer a file would supply, is
filled. One seeded generator fills them in module order, so two builds with one seed are
bit-identical on any device (the draws happen on the CPU).
"""
from __future__ import annotations

import math

import torch

# Float buffers are what a checkpoint supplies (ComfyUI registers them with `torch.empty`; the tiny
# models' parts hold no computed ones): small by default, or as named here.
_SMALL = "small"        # ~ N(0, 0.02): position embeddings, means
_NEAR_ONE = "near_one"  # ~ 1 + N(0, 0.05): scales and standard deviations
_BUFFER_FILLS = {
    "std-of-means": _NEAR_ONE,                          # LTXV VAE latent statistics
    "mean-of-stds": _NEAR_ONE,
    "mean-of-stds_over_std-of-means": _NEAR_ONE,
}
# Scale parameters of normalisation layers (LayerNorm/GroupNorm `weight`, RMSNorm `weight`/`scale`,
# Wan VAE `gamma`): near 1, or activations vanish or explode through the tiny nets.
_NORM_SCALE_NAMES = ("weight", "scale", "gamma")


def _is_norm(module: torch.nn.Module) -> bool:
    return isinstance(module, (torch.nn.GroupNorm, torch.nn.LayerNorm)) or "norm" in type(module).__name__.lower()


def _draw(shape, kind: str, gen: torch.Generator) -> torch.Tensor:
    noise = torch.randn(shape, generator=gen)
    return 1.0 + 0.05 * noise if kind == _NEAR_ONE else 0.02 * noise


@torch.no_grad()
def seeded_init_(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Fill every parameter and float buffer from one seeded generator in module order: matrices and kernels ~ N(0, 1/fan_in) (keeps activations O(1)
    through the tiny nets), norm scales ~ 1, other vectors small. Scalars (CLIP's logit_scale,
    TAESD's vae_scale) keep their values."""
    gen = torch.Generator().manual_seed(seed)
    for sub in module.modules():
        is_norm = _is_norm(sub)
        for name, p in sub.named_parameters(recurse=False):
            if p.ndim == 0:
                continue
            if is_norm and name in _NORM_SCALE_NAMES:
                value = _draw(p.shape, _NEAR_ONE, gen)
            elif p.ndim >= 2 and not (is_norm and name == "bias"):
                value = torch.randn(p.shape, generator=gen) / math.sqrt(p[0].numel())
            else:
                value = _draw(p.shape, _SMALL, gen)
            p.copy_(value.to(p.dtype))
        for name, b in sub.named_buffers(recurse=False):
            if b.is_floating_point():
                b.copy_(_draw(b.shape, _BUFFER_FILLS.get(name, _SMALL), gen).to(b.dtype))
    return module
