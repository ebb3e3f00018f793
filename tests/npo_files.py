"""NPO weight files in every supported format, made from tiny models, with their exact offsets.

`make_npo_offset` draws a random low-rank offset δ on a tiny model's attention layers (and on a conv
layer); the writers turn that one δ into a kohya LoRA, a PEFT/diffusers LoRA laid out like the
authors' Diffusion-NPO release, a full offset (.diff) and full UNets in ldm and diffusers naming.
Every file therefore means the same θ + η·δ, which the tests compute by hand.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

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
    """kohya names: of the diffusers module for UNets (what kohya's scripts write), of ComfyUI's own
    module for DiTs (sd-scripts / musubi-tuner: lora_unet_blocks_0_self_attn_q)."""
    names = ldm_to_diffusers(patcher.model)
    out = {}
    for key, (up, down, alpha) in offset.factors.items():
        name = names.get(key, key[len("diffusion_model."):])
        stem = "lora_unet_" + name[: -len(".weight")].replace(".", "_")
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


# ----------------------------------------------------------------------------------------------
# every family: changes on any parameter, files in every naming

# Tiny diffusers transformers with the tiny ComfyUI models' sizes (tiny_models/dits.py): the names
# and shapes diffusers itself gives each parameter, the reference for the pack's name tables.
_WAN = dict(patch_size=(1, 2, 2), num_attention_heads=1, attention_head_dim=128, text_dim=32, freq_dim=256,
            ffn_dim=256, num_layers=2)
DIFFUSERS_TINY = {
    "sd3": ("SD3Transformer2DModel", dict(sample_size=8, patch_size=2, in_channels=16, num_layers=2, attention_head_dim=64,
                                          num_attention_heads=2, joint_attention_dim=4096, caption_projection_dim=128,
                                          pooled_projection_dim=64, out_channels=16, pos_embed_max_size=16)),
    "wan21": ("WanTransformer3DModel", dict(_WAN, in_channels=16, out_channels=16)),
    "wan22_5b": ("WanTransformer3DModel", dict(_WAN, in_channels=48, out_channels=48)),
    "wan22_a14b": ("WanTransformer3DModel", dict(_WAN, in_channels=16, out_channels=16)),
    "qwen_image": ("QwenImageTransformer2DModel", dict(patch_size=2, in_channels=64, out_channels=16, num_layers=2,
                                                       attention_head_dim=32, num_attention_heads=2,
                                                       joint_attention_dim=32, axes_dims_rope=(8, 12, 12))),
    "chroma": ("ChromaTransformer2DModel", dict(patch_size=1, in_channels=64, num_layers=1, num_single_layers=1,
                                                attention_head_dim=128, num_attention_heads=1, joint_attention_dim=32,
                                                approximator_num_channels=64, approximator_hidden_dim=64,
                                                approximator_layers=2)),
    "flux_dev": ("FluxTransformer2DModel", dict(patch_size=1, in_channels=64, num_layers=1, num_single_layers=1,
                                                attention_head_dim=128, num_attention_heads=1, joint_attention_dim=32,
                                                pooled_projection_dim=32, guidance_embeds=True)),
    "ltxv": ("LTXVideoTransformer3DModel", dict(in_channels=128, out_channels=128, num_attention_heads=2,
                                                attention_head_dim=32, cross_attention_dim=64, num_layers=2,
                                                caption_channels=32)),
    "hunyuan_video": ("HunyuanVideoTransformer3DModel", dict(in_channels=16, out_channels=16, num_attention_heads=1,
                                                             attention_head_dim=128, num_layers=1, num_single_layers=1,
                                                             num_refiner_layers=2, text_embed_dim=32,
                                                             pooled_projection_dim=32, guidance_embeds=True)),
    "hunyuan_video15": ("HunyuanVideo15Transformer3DModel", dict(in_channels=65, out_channels=32, num_attention_heads=1,
                                                                 attention_head_dim=128, num_layers=1,
                                                                 num_refiner_layers=2, text_embed_dim=32,
                                                                 text_embed_2_dim=32, image_embed_dim=16)),
    "lumina2": ("Lumina2Transformer2DModel", dict(sample_size=8, patch_size=2, in_channels=16, hidden_size=64, num_layers=2,
                                                  num_refiner_layers=1, num_attention_heads=2, num_kv_heads=1,
                                                  multiple_of=16, axes_dim_rope=(8, 12, 12), cap_feat_dim=32)),
}


def diffusers_model(kind: str):
    """The tiny diffusers transformer of `kind` (seeded weights)."""
    import diffusers

    name, config = DIFFUSERS_TINY[kind]
    torch.manual_seed(0)
    return getattr(diffusers, name)(**config)


@lru_cache(maxsize=None)
def diffusers_shapes(kind: str) -> dict[str, tuple]:
    return {k: tuple(v.shape) for k, v in diffusers_model(kind).state_dict().items()}


def lowrank_offset(patcher, keys, rank: int = 3, alpha: float = 1.5, seed: int = 0, scale: float = 0.3) -> LowRankOffset:
    """A random low-rank change on the given weight matrices (conv kernels included)."""
    gen = torch.Generator().manual_seed(seed)
    sd = patcher.model.state_dict()
    factors = {}
    for key in keys:
        w = sd[key]
        up = torch.randn(w.shape[0], rank, generator=gen) * scale / rank ** 0.5
        down = torch.randn((rank,) + tuple(w.shape[1:]), generator=gen) / w[0].numel() ** 0.5
        factors[key] = (up.reshape((w.shape[0], rank) + (1,) * (w.ndim - 2)), down, alpha)
    return LowRankOffset(factors)


def matrix_keys(patcher, select=lambda key: True) -> list[str]:
    """The diffusion model's weight matrices and conv kernels (what LoRAs adapt)."""
    return [k for k, v in patcher.model.state_dict().items()
            if k.startswith("diffusion_model.") and k.endswith(".weight") and v.ndim >= 2 and select(k)]


def dense_change(patcher, seed: int = 0, scale: float = 0.05) -> dict[str, torch.Tensor]:
    """A random change of every parameter of the diffusion model: weights, biases, norms, and
    parameters that are neither (Wan's modulation, LTXV's scale_shift_table)."""
    gen = torch.Generator().manual_seed(seed)
    return {f"diffusion_model.{name}": torch.randn(p.shape, generator=gen) * scale * (p.detach().abs().mean() + 0.1)
            for name, p in patcher.model.diffusion_model.named_parameters()}


def comfy_peft_state_dict(offset: LowRankOffset, patcher, prefix: str = "") -> dict:
    """PEFT layout on ComfyUI's module names: diffusion_model.<module>.lora_A/lora_B.weight."""
    out = {}
    for key, (up, down, alpha) in offset.factors.items():
        stem = prefix + key[: -len(".weight")]
        out[f"{stem}.lora_A.weight"] = down
        out[f"{stem}.lora_B.weight"] = up * (alpha / down.shape[0])
    return out


def _comfy_part(target, tensor):
    """The rows of a ComfyUI-layout tensor that a diffusers parameter holds (the Target's slice,
    in diffusers' layout: the only layout function in use, swap_scale_shift, is its own inverse)."""
    part = target.narrow(tensor)
    return target.function(part) if target.function is not None else part


def diffusers_peft_state_dict(offset: LowRankOffset, patcher, kind: str, prefix: str = "transformer.") -> tuple:
    """PEFT layout on diffusers' module names (the tiny diffusers model's own), with a fused ComfyUI
    weight's change split over the diffusers layers that hold its parts. Returns (state dict, the
    change restricted to the weights diffusers names)."""
    from comfy_selfnpo.npo.weights.names import parameter_names

    names = parameter_names(patcher.model)
    out, covered = {}, {}
    for name in diffusers_shapes(kind):
        target = names.get(name)
        if target is None or not name.endswith(".weight") or target.key not in offset.factors:
            continue
        up, down, alpha = offset.factors[target.key]
        stem = prefix + name[: -len(".weight")]
        out[f"{stem}.lora_A.weight"] = down
        out[f"{stem}.lora_B.weight"] = _comfy_part(target, up) * (alpha / down.shape[0])
        covered[target.key] = offset.factors[target.key]
    return out, LowRankOffset(covered)


def offset_every_parameter_state_dict(changes: dict) -> dict:
    """The offset layout for every changed tensor (npo/weights.py): .diff for weights, .diff_b for
    biases, <parameter>.diff for anything else."""
    out = {}
    for key, delta in changes.items():
        stem, _, param = key.rpartition(".")
        name = {"weight": f"{stem}.diff", "bias": f"{stem}.diff_b"}.get(param, f"{key}.diff")
        out[name] = delta.contiguous()
    return out


def changed_state(patcher, changes: dict) -> dict:
    sd = patcher.model.state_dict()
    return {k: (sd[k] + changes[k]) if k in changes else sd[k].clone()
            for k in sd if k.startswith("diffusion_model.")}


def full_model_state_dict(patcher, changes: dict, naming: str) -> dict:
    """The changed diffusion model as a whole-model file: "bare" (what the trainer's whole-model
    export writes: diffusion_model.state_dict() keys, float32) or "checkpoint" (ComfyUI's saved
    checkpoints: model.diffusion_model.*)."""
    new = changed_state(patcher, changes)
    if naming == "bare":
        return {k[len("diffusion_model."):]: v.float().contiguous() for k, v in new.items()}
    return {f"model.{k}": v.contiguous() for k, v in new.items()}


def diffusers_full_model_state_dict(patcher, changes: dict, kind: str) -> tuple[dict, set]:
    """The changed diffusion model under the tiny diffusers model's parameter names, fused weights
    split as diffusers keeps them. Returns (state dict, the model keys it covers)."""
    from comfy_selfnpo.npo.weights.names import parameter_names

    names = parameter_names(patcher.model)
    new = changed_state(patcher, changes)
    out, covered = {}, set()
    for name in diffusers_shapes(kind):
        target = names.get(name)
        if target is not None:
            out[name] = _comfy_part(target, new[target.key]).contiguous()
            covered.add(target.key)
    return out, covered
