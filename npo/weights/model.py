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
    originals = getattr(patcher, "object_patches_backup", {}) or {}
    if key in originals:  # an object patch (patch_block_parameters) is in place: the original it replaced
        return originals[key]
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


def patch_block_parameters(patcher) -> list[str]:
    """ComfyUI applies weight patches to the parameters of leaf modules (layers) only: a parameter that
    sits on a block itself (Wan's `modulation`, LTXV's `scale_shift_table`) keeps its stored value when
    the model loads (ModelPatcher._load_list skips modules with sub-modules, at v0.14 and after). For
    those, the patched value goes in as an object patch too, which ComfyUI sets (and undoes) whenever
    it loads this MODEL; the weight patch stays, so everything that reads patches sees the change.
    Returns the keys."""
    modules = dict(patcher.model.named_modules())
    keys = []
    for key in list(patcher.patches):
        path = key.rpartition(".")[0]
        module = modules.get(path)
        if module is None or next(module.children(), None) is None:
            continue  # a layer: ComfyUI patches it
        stored = unpatched_weight(patcher, key)
        value = effective_weight(patcher, key, device=stored.device).to(stored.dtype)
        patcher.add_object_patch(key, torch.nn.Parameter(value, requires_grad=False))
        keys.append(key)
    return keys
