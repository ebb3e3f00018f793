"""NPO weight files in every supported format, made from tiny models, with their exact offsets.

`make_npo_offset` draws a random low-rank offset δ on a tiny model's attention layers (and on a conv
layer); the writers turn that one δ into a kohya LoRA, a PEFT/diffusers LoRA laid out like the
authors' Diffusion-NPO release, a full offset (.diff) and full UNets in ldm and diffusers naming.
Every file therefore means the same θ + η·δ, which the tests compute by hand.
"""
from __future__ import annotations

from dataclasses import dataclass

import safetensors.torch
import torch

import comfy.utils


@dataclass
class LowRankOffset:
    """δ[key] = scale · up @ down (reshaped to the weight), on model keys "diffusion_model....weight"."""
    factors: dict  # model key -> (up (out, r), down (r, in, *k), alpha)

    def dense(self, model_sd) -> dict[str, torch.Tensor]:
        out = {}
        for key, (up, down, alpha) in self.factors.items():
            scale = alpha / down.shape[0]
            out[key] = (scale * (up.flatten(1) @ down.flatten(1))).reshape(model_sd[key].shape)
        return out


def ldm_to_diffusers(base_model) -> dict[str, str]:
    """model key ("diffusion_model.x.weight") -> diffusers key ("down_blocks....weight")."""
    return {f"diffusion_model.{v}": k for k, v in comfy.utils.unet_to_diffusers(base_model.model_config.unet_config).items()}


def make_npo_offset(patcher, rank: int = 4, alpha: float = 2.0, seed: int = 0, scale: float = 0.3) -> LowRankOffset:
    """A random low-rank offset on every attention projection and on the first conv with a 3x3
    kernel of the middle block; big enough to change predictions visibly."""
    gen = torch.Generator().manual_seed(seed)
    sd = patcher.model.state_dict()
    factors = {}
    for key, w in sd.items():
        if not key.startswith("diffusion_model."):
            continue
        is_attn = any(f".{p}.weight" in key for p in ("to_q", "to_k", "to_v")) or key.endswith("to_out.0.weight")
        is_conv = key == "diffusion_model.middle_block.0.in_layers.2.weight"
        if not (is_attn or is_conv):
            continue
        out_dim = w.shape[0]
        up = torch.randn(out_dim, rank, generator=gen) * scale / rank ** 0.5
        if w.ndim == 4:
            down = torch.randn((rank,) + tuple(w.shape[1:]), generator=gen) / w[0].numel() ** 0.5
            up = up.reshape(out_dim, rank, 1, 1)
        else:
            down = torch.randn(rank, w.shape[1], generator=gen) / w.shape[1] ** 0.5
        factors[key] = (up, down, alpha)
    assert factors
    return LowRankOffset(factors)


def kohya_state_dict(offset: LowRankOffset, patcher) -> dict:
    names = ldm_to_diffusers(patcher.model)
    out = {}
    for key, (up, down, alpha) in offset.factors.items():
        stem = "lora_unet_" + names[key][: -len(".weight")].replace(".", "_")
        out[f"{stem}.lora_down.weight"] = down
        out[f"{stem}.lora_up.weight"] = up
        out[f"{stem}.alpha"] = torch.tensor(alpha)
    # a text-encoder entry, as kohya files have: skipped, reported as ignored, not unmatched
    out["lora_te_text_model_encoder_layers_0_mlp_fc1.alpha"] = torch.tensor(1.0)
    return out


def peft_state_dict(offset: LowRankOffset, patcher) -> dict:
    """Shaped like the authors' release: unet.<diffusers module>.lora_A/lora_B.weight, no alpha
    (PEFT folds lora_alpha/r into the saved factors here: scale 1)."""
    names = ldm_to_diffusers(patcher.model)
    out = {}
    for key, (up, down, alpha) in offset.factors.items():
        stem = "unet." + names[key][: -len(".weight")]
        out[f"{stem}.lora_A.weight"] = down
        out[f"{stem}.lora_B.weight"] = up * (alpha / down.shape[0])
    return out


def offset_state_dict(offset: LowRankOffset, patcher) -> dict:
    sd = patcher.model.state_dict()
    return {f"{k[: -len('.weight')]}.diff": v.contiguous() for k, v in offset.dense(sd).items()}


def full_unet_state_dict(offset: LowRankOffset, patcher, naming: str) -> dict:
    sd = patcher.model.state_dict()
    dense = offset.dense(sd)
    names = ldm_to_diffusers(patcher.model)
    out = {}
    for key, w in sd.items():
        if not key.startswith("diffusion_model."):
            continue
        value = (w + dense[key]) if key in dense else w.clone()
        name = key[len("diffusion_model."):] if naming == "ldm" else names[key]
        out[name] = value.contiguous()
    return out


WRITERS = {
    "kohya_lora": kohya_state_dict,
    "peft_lora": peft_state_dict,
    "offset": offset_state_dict,
    "full_model_ldm": lambda o, p: full_unet_state_dict(o, p, "ldm"),
    "full_model_diffusers": lambda o, p: full_unet_state_dict(o, p, "diffusers"),
}


def write(path, tensors: dict) -> str:
    safetensors.torch.save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    return str(path)


def independent_model(tiny, kind: str, seed: int, state_overrides: dict | None = None):
    """A freshly built tiny model (its own nn.Module) with some weights replaced: the hand-built
    reference that shares nothing with ComfyUI's patch machinery."""
    patcher = tiny.build_model(kind, seed)
    if state_overrides:
        missing = set(state_overrides) - set(patcher.model.state_dict())
        assert not missing, missing
        patcher.model.load_state_dict(state_overrides, strict=False)
    return patcher
