"""What a run leaves for sampling: the weights file (LoRA, offset or whole UNet) and the negative MODEL.

Formats (one function each in EXPORTERS):
  lora    kohya keys (`lora_unet_*.lora_down/.lora_up/.alpha`) ComfyUI's LoRA loaders map; LoRA runs
  offset  ComfyUI's LoraSave "full_diff" layout: `diffusion_model.<key>.diff` / `.diff_b`, exact
  unet    the whole trained diffusion model with ComfyUI/ldm keys, float32 (fp16 would round away
          small updates)
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from .atomic_files import save_safetensors


def _lora(trained, base_model) -> dict:
    return trained.lora_tensors()


def _offset(trained, base_model) -> dict:
    out = {}
    for key, delta in trained.weight_deltas().items():
        stem, _, param = key.rpartition(".")
        suffix = {"weight": "diff", "bias": "diff_b"}.get(param)
        if suffix is not None:
            out[f"diffusion_model.{stem}.{suffix}"] = delta
    return out


def _unet(trained, base_model) -> dict:
    from .trained import effective_state_dict

    deltas = trained.weight_deltas()
    base = effective_state_dict(trained.base_patcher)  # the MODEL as trained from, its LoRAs included
    return {k: base[k] + deltas.get(k, 0) for k in base}


EXPORTERS = {"lora": _lora, "offset": _offset, "unet": _unet}


def export_tensors(trained, base_model, fmt: str) -> dict[str, torch.Tensor]:
    if fmt not in EXPORTERS:
        raise ValueError(f"unknown export format {fmt!r}; choose {', '.join(EXPORTERS)}")
    with torch.inference_mode(False), torch.no_grad():
        return EXPORTERS[fmt](trained, base_model)


def metadata(fmt: str, base_model, config, base_hash: str, steps: int, data_kind: str) -> dict[str, str]:
    meta = {
        "comfy_selfnpo.format": fmt,
        "comfy_selfnpo.base_model_hash": base_hash,
        "comfy_selfnpo.architecture": f"{type(base_model.model_config).__name__}/{base_model.model_type.name}",
        "comfy_selfnpo.config": json.dumps(config.to_dict(), sort_keys=True),
        "comfy_selfnpo.steps": str(steps),
        "comfy_selfnpo.data": data_kind,
    }
    if fmt == "lora":
        meta.update({"ss_network_module": "networks.lora", "ss_network_dim": str(config.lora_rank),
                     "ss_network_alpha": str(config.lora_alpha), "ss_steps": str(steps)})
    return meta


def write(path, trained, base_model, fmt: str, meta: dict[str, str]) -> Path:
    return save_safetensors(path, export_tensors(trained, base_model, fmt), meta)


def negative_model(base_patcher, trained):
    """A clone of the base MODEL with the trained change as weight patches."""
    with torch.inference_mode(False), torch.no_grad():
        clone = base_patcher.clone()
        clone.add_patches(trained.model_patches(), 1.0)
    return clone
