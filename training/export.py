"""What a run leaves for sampling: the weights file (LoRA, offset or whole UNet) and the negative MODEL.

Formats (one function each in EXPORTERS):
  lora    the adapter of a LoRA-mode run: kohya keys (`lora_unet_*.lora_down/.lora_up/.alpha`), or for
          LoHa/LoKr LyCORIS keys under the same names (`.hada_*`, `.lokr_*`); ComfyUI's LoRA loaders map them
  offset  ComfyUI's LoraSave "full_diff" layout, exact, every changed tensor: a layer's weight as
          `diffusion_model.<layer>.diff`, its bias as `<layer>.diff_b`, any other parameter (Wan's
          `modulation`, LTXV's `scale_shift_table`) as `diffusion_model.<parameter>.diff` — the keys
          ComfyUI's LoRA loader maps (comfy.lora.model_lora_keys_unet)
  unet    the whole trained diffusion model with ComfyUI/ldm keys, float32 (fp16 would round away
          small updates)
"""
from __future__ import annotations

import datetime
import json
from pathlib import Path

# torch is imported where it is used: the config reads EXPORTERS for output_format's choices, and the
# CLI's argument parser must not import torch


def _lora(trained, base_model) -> dict:
    return trained.lora_tensors()


def _offset(trained, base_model) -> dict:
    return offset_state_dict(trained.weight_deltas())


def offset_state_dict(deltas: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Diffusion-model key -> change, as the offset format's keys (module docstring); unchanged
    tensors are left out."""
    import torch

    out = {}
    for key, delta in deltas.items():
        if not torch.count_nonzero(delta):
            continue  # unchanged (buffers, frozen parts)
        stem, _, param = key.rpartition(".")
        if param == "weight":
            out[f"diffusion_model.{stem}.diff"] = delta
        elif param == "bias" and f"{stem}.weight" in deltas:
            out[f"diffusion_model.{stem}.diff_b"] = delta
        else:
            out[f"diffusion_model.{key}.diff"] = delta
    return out


def _unet(trained, base_model) -> dict:
    from .trained import effective_state_dict

    deltas = trained.weight_deltas()
    base = effective_state_dict(trained.base_patcher)  # the MODEL as trained from, its LoRAs included
    return {k: base[k] + deltas.get(k, 0) for k in base}


EXPORTERS = {"lora": _lora, "offset": _offset, "unet": _unet}


def export_tensors(trained, base_model, fmt: str) -> dict[str, torch.Tensor]:
    import torch

    if fmt not in EXPORTERS:
        raise ValueError(f"unknown export format {fmt!r}; choose {', '.join(EXPORTERS)}")
    with torch.inference_mode(False), torch.no_grad():
        return EXPORTERS[fmt](trained, base_model)


DESCRIPTION = ("Self-NPO negative model ({fmt}): the change that makes {arch} generate what people do not prefer, "
               "trained without preference data by truncated diffusion fine-tuning. Not a style LoRA: use it as "
               "the negative model of CFG ('Self-NPO Negative Model' + 'Apply Self-NPO' / 'Self-NPO CFG Guider' "
               "in ComfyUI, comfy-selfnpo).")


def architecture(base_model) -> tuple[str, str]:
    """(ss_base_model_version, modelspec architecture stem) of a ComfyUI BaseModel: what A1111/Forge,
    LoRA managers and model sites read to tell which model a file belongs to (its family's row)."""
    from .families import family_of

    row = family_of(base_model).architecture
    if row is None:
        name = type(base_model.model_config).__name__.lower()
        return name, name
    if row[0] == "sd_v2" and base_model.model_type.name == "V_PREDICTION":
        return "sd_v2_768_v", "stable-diffusion-v2-768-v"
    return row


def metadata(fmt: str, base_model, config, base_hash: str, steps: int, data_kind: str, name: str = "",
             model_name: str = "") -> dict[str, str]:
    """What the weights file says about itself: the pack's own keys (resume checks, provenance),
    kohya's `ss_*` keys and the `modelspec.*` keys other tools read."""
    version, spec = architecture(base_model)
    meta = {
        "comfy_selfnpo.format": fmt,
        "comfy_selfnpo.base_model_hash": base_hash,
        "comfy_selfnpo.architecture": f"{type(base_model.model_config).__name__}/{base_model.model_type.name}",
        "comfy_selfnpo.config": json.dumps(config.to_dict(), sort_keys=True),
        "comfy_selfnpo.steps": str(steps),
        "comfy_selfnpo.data": data_kind,
        "ss_base_model_version": version, "ss_output_name": name, "ss_sd_model_name": model_name,
        "ss_steps": str(steps), "ss_max_train_steps": str(config.steps), "ss_learning_rate": str(config.learning_rate),
        "modelspec.sai_model_spec": "1.0.0", "modelspec.architecture": f"{spec}/{fmt}",
        "modelspec.implementation": "https://github.com/comfy-selfnpo/comfy-selfnpo",
        "modelspec.title": name or "Self-NPO negative model", "modelspec.date": datetime.date.today().isoformat(),
        "modelspec.description": DESCRIPTION.format(fmt=fmt, arch=spec),
        "modelspec.resolution": f"{config.resolution}x{config.resolution}",
    }
    if fmt == "lora":
        meta.update(adapter_metadata(config))
    return meta


def adapter_metadata(config) -> dict[str, str]:
    """kohya's network keys; LyCORIS files name their algorithm in ss_network_args as LyCORIS does."""
    from .adapter_kinds import ADAPTERS

    meta = {"ss_network_module": ADAPTERS[config.adapter].network_module, "ss_network_dim": str(config.lora_rank),
            "ss_network_alpha": str(config.lora_alpha)}
    if config.adapter != "lora":
        meta["ss_network_args"] = json.dumps({"algo": config.adapter})
    return meta


def write(path, trained, base_model, fmt: str, meta: dict[str, str]) -> Path:
    from .atomic_files import save_safetensors

    return save_safetensors(path, export_tensors(trained, base_model, fmt), meta)


def negative_model(base_patcher, trained):
    """A clone of the base MODEL with the trained change as weight patches (and, for parameters
    ComfyUI does not patch, object patches: npo.weights.patch_block_parameters)."""
    import torch

    from ..npo.weights import patch_block_parameters

    with torch.inference_mode(False), torch.no_grad():
        clone = base_patcher.clone()
        clone.add_patches(trained.model_patches(), 1.0)
        patch_block_parameters(clone)
    return clone
