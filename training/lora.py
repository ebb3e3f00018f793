"""LoRA adapters trained through ComfyUI's own UNet.

The adapters are ours: trainable `down`/`up` matrices per targeted Linear/Conv2d, added to the
layer's output by a forward hook (y = W·x + (α/r)·up·down·x). Hooks are attached only while the
trainer runs a forward (`attached()`), so the user's MODEL — whose nn.Module all its clones share —
is never left modified, and "adapter off" (the frozen-base teacher) needs no extra copy.

Exported with kohya names (`lora_unet_<diffusers name>.lora_down/.lora_up/.alpha`) that
`comfy.lora.model_lora_keys_unet` maps, so ComfyUI's LoRA loaders apply every tensor.
"""
from __future__ import annotations

import contextlib
import logging
import math
import re

import torch
import torch.nn.functional as F

from .errors import TrainingError

log = logging.getLogger("comfy_selfnpo.training")

_ATTN = re.compile(r"(^|\.)attn[12]\.(to_q|to_k|to_v|to_out\.0)$")
_FF = re.compile(r"(^|\.)ff\.net\.(0\.proj|2)$")


def select_targets(diffusion_model: torch.nn.Module, targets: str) -> list[str]:
    """Module names (relative to the diffusion model) the adapter trains. "attn": attention
    projections; "attn+ff": plus the transformer feed-forward; "all_linear": every Linear;
    anything else is a regex searched in the module name (Linear and Conv2d layers)."""
    names = []
    for name, module in diffusion_model.named_modules():
        is_linear = isinstance(module, torch.nn.Linear)
        is_conv = isinstance(module, torch.nn.Conv2d)
        if not (is_linear or is_conv):
            continue
        if targets == "attn":
            ok = is_linear and bool(_ATTN.search(name))
        elif targets == "attn+ff":
            ok = is_linear and bool(_ATTN.search(name) or _FF.search(name))
        elif targets == "all_linear":
            ok = is_linear
        else:
            ok = bool(re.search(targets, name)) and (is_linear or module.groups == 1)
        if ok:
            names.append(name)
    if not names:
        raise TrainingError(f"lora_targets={targets!r} matches no Linear/Conv2d layer of this model; "
                            "use 'attn', 'attn+ff', 'all_linear' or a regex over layer names such as "
                            "'transformer_blocks'")
    return names


class LoRALayer(torch.nn.Module):
    """down: [r, in(, kh, kw)], up: [out, r(, 1, 1)]; up starts at zero so training starts at the
    base model (kohya's initialisation: down ~ kaiming-uniform(a=√5)).

    A rank above what the layer can use (min(out, in·kernel): beyond it the product is full rank
    anyway) is capped there, with alpha scaled along so that the scale alpha/rank is unchanged."""

    def __init__(self, base: torch.nn.Module, rank: int, alpha: float, gen: torch.Generator):
        super().__init__()
        self.is_conv = isinstance(base, torch.nn.Conv2d)
        w = base.weight
        full_rank = min(w.shape[0], w[0].numel())
        if rank > full_rank:
            rank, alpha = full_rank, alpha * full_rank / rank
        if self.is_conv:
            down_shape = (rank, w.shape[1]) + tuple(w.shape[2:])
            up_shape = (w.shape[0], rank, 1, 1)
            self.stride, self.padding, self.dilation = base.stride, base.padding, base.dilation
        else:
            down_shape, up_shape = (rank, w.shape[1]), (w.shape[0], rank)
        fan_in = math.prod(down_shape[1:])
        bound = 1.0 / math.sqrt(fan_in)  # kaiming_uniform(a=√5) bound
        self.down = torch.nn.Parameter((torch.rand(down_shape, generator=gen) * 2 - 1) * bound)
        self.up = torch.nn.Parameter(torch.zeros(up_shape))
        self.rank, self.alpha = rank, float(alpha)
        self.scale = self.alpha / rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        down, up = self.down.to(x.dtype), self.up.to(x.dtype)
        if self.is_conv:
            h = F.conv2d(x, down, None, self.stride, self.padding, self.dilation)
            return F.conv2d(h, up) * self.scale
        return F.linear(F.linear(x, down), up) * self.scale

    def weight_delta(self) -> torch.Tensor:
        """ΔW = (α/r)·up·down in the base weight's shape (what ComfyUI's LoRA patch adds)."""
        delta = self.up.flatten(1).float() @ self.down.flatten(1).float()
        shape = (self.up.shape[0],) + tuple(self.down.shape[1:])
        return (delta * self.scale).reshape(shape)


def _key(name: str) -> str:
    return name.replace(".", "__")


class LoRAAdapters(torch.nn.Module):
    """The trainable adapter set plus (optionally) its EMA copy for an EMA teacher."""

    def __init__(self, diffusion_model: torch.nn.Module, targets: str, rank: int, alpha: float,
                 seed: int, with_ema: bool):
        super().__init__()
        self.names = select_targets(diffusion_model, targets)
        gen = torch.Generator().manual_seed(seed)
        modules = dict(diffusion_model.named_modules())
        capped = [n for n in self.names if rank > min(modules[n].weight.shape[0], modules[n].weight[0].numel())]
        if capped:
            log.warning("lora_rank=%d is larger than %d of the %d targeted layers can use (e.g. %s); those train "
                        "at their full rank instead (same alpha/rank scale)", rank, len(capped), len(self.names),
                        capped[0])
        self.layers = torch.nn.ModuleDict(
            {_key(n): LoRALayer(modules[n], rank, alpha, gen) for n in self.names})
        self.ema = None
        if with_ema:
            self.ema = torch.nn.ModuleDict(
                {_key(n): LoRALayer(modules[n], rank, alpha, gen) for n in self.names})
            self.ema.load_state_dict(self.layers.state_dict())
            self.ema.requires_grad_(False)
        self.rank, self.alpha = rank, float(alpha)
        self._active = self.layers  # the adapter set the hooks add: student, EMA, or None (adapter off)

    def trainable_parameters(self):
        return list(self.layers.parameters())

    @contextlib.contextmanager
    def attached(self, diffusion_model: torch.nn.Module):
        """Hook the adapters into the diffusion model for the duration of the block. Base weights
        are frozen meanwhile (no gradient buffers for them) and restored afterwards."""
        modules = dict(diffusion_model.named_modules())
        handles, frozen = [], []
        for name in self.names:
            module = modules[name]
            handles.append(module.register_forward_hook(self._make_hook(_key(name))))
        for p in diffusion_model.parameters():
            if p.requires_grad:
                p.requires_grad_(False)
                frozen.append(p)
        try:
            yield self
        finally:
            for h in handles:
                h.remove()
            for p in frozen:
                p.requires_grad_(True)

    @contextlib.contextmanager
    def use(self, which: str):
        """Forward passes inside the block add the "student" adapter, its "ema" copy, or nothing ("off")."""
        previous = self._active
        self._active = {"student": self.layers, "ema": self.ema, "off": None}[which]
        try:
            yield
        finally:
            self._active = previous

    def _make_hook(self, key: str):
        def hook(module, inputs, output):
            if self._active is None:
                return None
            return output + self._active[key](inputs[0]).to(output.dtype)
        return hook

    def weight_deltas(self) -> dict[str, torch.Tensor]:
        """Module name -> ΔW of the student adapter."""
        return {n: self.layers[_key(n)].weight_delta().detach() for n in self.names}

    def kohya_state_dict(self, base_model) -> dict[str, torch.Tensor]:
        """kohya keys that ComfyUI's LoRA loader maps (`comfy.lora.model_lora_keys_unet`)."""
        names = kohya_names(base_model, self.names)
        out = {}
        for n in self.names:
            layer, k = self.layers[_key(n)], names[n]
            out[f"{k}.lora_down.weight"] = layer.down.detach().float().cpu().contiguous()
            out[f"{k}.lora_up.weight"] = layer.up.detach().float().cpu().contiguous()
            out[f"{k}.alpha"] = torch.tensor(layer.alpha)
        return out


def kohya_names(base_model, module_names: list[str]) -> dict[str, str]:
    """Module name -> kohya LoRA name. Prefers the diffusers-style kohya name (what kohya's scripts
    write, e.g. lora_unet_down_blocks_0_attentions_0_..._to_q) when ComfyUI knows one for the layer,
    else the ldm-style name (lora_unet_input_blocks_1_1_...); ComfyUI's loader maps both."""
    import comfy.lora

    key_map = comfy.lora.model_lora_keys_unet(base_model, {})
    by_unet_key: dict[str, list[str]] = {}
    for lora_key, unet_key in key_map.items():
        if isinstance(unet_key, str) and lora_key.startswith("lora_unet_"):
            by_unet_key.setdefault(unet_key, []).append(lora_key)
    out = {}
    for n in module_names:
        ldm = "lora_unet_" + n.replace(".", "_")
        candidates = [k for k in by_unet_key.get(f"diffusion_model.{n}.weight", []) if k != ldm]
        out[n] = sorted(candidates)[0] if candidates else ldm
    return out
