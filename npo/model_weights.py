"""Weights of a ModelPatcher, robust to the shared-module trap.

Clones share one nn.Module and one `backup` dict: a key some clone has patched in place keeps its
original in `backup`; any other key still holds the original in the module."""
from __future__ import annotations

import torch


def unpatched_weight(patcher, key: str) -> torch.Tensor:
    """The checkpoint weight behind `key`, whichever clone of the module is currently patched in."""
    import comfy.model_patcher
    import comfy.utils

    backup = getattr(patcher, "backup", {})
    if key in backup:
        return backup[key].weight
    model = getattr(patcher, "model", patcher)
    weight, _set_func, convert_func = comfy.model_patcher.get_key_weight(model, key)
    if convert_func is not None:
        weight = comfy.utils.get_attr(model, key)
    return weight


def effective_weight(patcher, key: str, dtype=torch.float32, device=None) -> torch.Tensor:
    """The weight `patcher` means for `key`: its checkpoint weight with all its patches applied,
    computed on the side (nothing in the shared module changes)."""
    import comfy.lora

    raw = unpatched_weight(patcher, key)
    weight = raw.to(device=device or raw.device, dtype=dtype, copy=True)
    patches = getattr(patcher, "patches", {}).get(key)
    if patches:
        weight = comfy.lora.calculate_weight(patches, weight, key, intermediate_dtype=dtype)
    return weight
