"""Which model parameter a name in an NPO file means, for every naming the loader reads.

`parameter_names(base_model)` maps file-side *parameter* names to `Target`s (a model state-dict key,
or rows of one). LoRA entries look up "<stem>.weight", offsets "<stem>.weight" / "<stem>" (.diff)
and "<stem>.bias" (.diff_b), whole-model files every key as it is. Sources, first one wins:
  1. diffusers names of the model's family (diffusers_names), bare or under DIFFUSERS_PREFIXES;
  2. ComfyUI's own LoRA names (`comfy.lora.model_lora_keys_unet`: kohya lora_unet_*, the
     family-specific ones such as SD3/Flux "transformer.*", HunyuanVideo diffusion-pipe names, and
     "diffusion_model.<key>" for every parameter, weight or not);
  3. the model's own keys without "diffusion_model." and with "model.diffusion_model.".
Targets that do not exist in the model (a map row for another variant) are dropped.
"""
from __future__ import annotations

from ..diffusers_names import diffusers_names
from ..target import Target

# prefixes diffusers / PEFT put before a diffusers parameter name
DIFFUSERS_PREFIXES = ("", "transformer.", "unet.", "base_model.model.", "unet.base_model.model.")
PREFIX = "diffusion_model."


def model_shapes(base_model) -> dict[str, tuple]:
    return {k: tuple(v.shape) for k, v in base_model.state_dict().items() if k.startswith(PREFIX)}


def _comfy_lora_names(base_model, shapes: dict) -> dict[str, Target]:
    """ComfyUI's LoRA key map (module stems -> weight) as parameter names."""
    import comfy.lora

    out = {}
    for stem, value in comfy.lora.model_lora_keys_unet(base_model, {}).items():
        target = Target.of(value)
        if not target.fits(shapes):
            continue
        if stem == target.key or not target.key.endswith(".weight"):
            out[stem] = target  # ComfyUI's names for whole parameters ("diffusion_model.x.bias")
            continue
        out[stem + ".weight"] = target
        bias = Target(target.key[: -len("weight")] + "bias", target.offset, target.function)
        if bias.fits(shapes):
            out[stem + ".bias"] = bias
    return out


def parameter_names(base_model) -> dict[str, Target]:
    """File-side parameter name -> Target, for every naming the loader reads (see module doc)."""
    shapes = model_shapes(base_model)
    names: dict[str, Target] = {}
    for name, target in diffusers_names(base_model).items():
        if target.fits(shapes):
            for prefix in DIFFUSERS_PREFIXES:
                names.setdefault(prefix + name, target)
    for name, target in _comfy_lora_names(base_model, shapes).items():
        names.setdefault(name, target)
    for key in shapes:
        for name in (key, key[len(PREFIX):], "model." + key):
            names.setdefault(name, Target(key))
    return names
