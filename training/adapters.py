"""Trainable adapters (LoRA, LoHa, LoKr) on the loaded model, made of ComfyUI's own training modules.

The math is core's (`comfy.weight_adapter`: the `create_train`/`to_train` modules core's TrainLoraNode
trains, and its bypass mode y = f(x) + h(x), which adds the adapter to a layer's output and leaves the
base weight as ComfyUI loaded it: partly loaded, streamed in, quantised). What the pack adds around
core's modules — wrapped, not copied — is what core's adapters do not do:
  * which layers train (`select_targets`: the family's attn / attn+ff presets, a regex);
  * initialisation from the run's seed: LoRA keeps kohya's convention (down drawn, up zero), which
    the pack's LoRA files have always had — core's LoRA `create_train` draws up and zeroes down —
    handed to core's `LoraDiff`; LoHa and LoKr are core's `create_train`, under the run's seed;
  * the hooks: a forward hook per layer, attached only while the trainer runs forwards (`attached()`),
    so the user's MODEL — whose nn.Module all its clones share — is never left modified; it adds the
    student adapter, its EMA copy (EMA teacher) or nothing (frozen teacher: no extra copy). Being a
    forward hook, it runs outside a streamed layer's recomputed forward (streaming.py);
  * the file: kohya LoRA keys (`lora_unet_<name>.lora_down/.lora_up/.alpha`) or LyCORIS LoHa/LoKr keys
    (`.hada_w1_a/.hada_w1_b/.hada_w2_a/.hada_w2_b/.alpha`, `.lokr_w1/.lokr_w2/.alpha`) under the same
    kohya names, which ComfyUI's LoRA loader (`comfy.lora.model_lora_keys_unet` + the same adapters)
    and A1111/Forge read.
"""
from __future__ import annotations

import contextlib
import copy
import logging
import re

import torch

from .adapter_kinds import ADAPTERS, AdapterKind, full_rank  # noqa: F401  (re-exported)
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


class AdapterLayer(torch.nn.Module):
    """One targeted layer's adapter: core's training module does the math; its trainable tensors are
    registered here under the pack's names (LoRA's `down`/`up`, as the pack's checkpoints name them).
    Core's module is kept beside them, not as a submodule, so each tensor is saved and trained once."""

    def __init__(self, kind: AdapterKind, core: torch.nn.Module, base: torch.nn.Module):
        from comfy.weight_adapter import BypassForwardHook

        super().__init__()
        self.kind, self.shape = kind, tuple(base.weight.shape)
        object.__setattr__(self, "core", core)
        for name, core_name in kind.params.items():
            self.register_parameter(name, core.get_parameter(core_name))
        object.__setattr__(self, "bypass", kind.bypass(core))
        # core's hook tells the adapter its layer's type (conv dims, stride, padding); it is not
        # injected: the pack's own forward hook adds the adapter (AdapterSet.attached)
        BypassForwardHook(base, self.bypass)
        self.is_conv = bool(self.bypass.is_conv)

    def delta(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """What the adapter adds to the layer's output y = f(x). Core's training h() uses the adapter's
        float32 weights as they are (its trainer runs under autocast); a half-precision model outside
        autocast meets them here in float32."""
        dtype = self._first_parameter().dtype
        if x.dtype != dtype and not torch.is_autocast_enabled(x.device.type):
            return self.bypass.h(x.to(dtype), y).to(y.dtype)
        return self.bypass.h(x, y).to(y.dtype)

    def _first_parameter(self) -> torch.nn.Parameter:
        return next(iter(self._parameters.values()))

    def weight_delta(self) -> torch.Tensor:
        """ΔW in the base weight's shape: core's own weight patch applied to a zero weight."""
        return self.core(torch.zeros(self.shape, device=self._first_parameter().device, dtype=torch.float32))

    def file_tensors(self) -> dict[str, torch.Tensor]:
        """Tensor name in the file (after the layer's kohya name) -> tensor."""
        if self.kind.file_tensors is not None:
            tensors = self.kind.file_tensors(self)
        else:
            tensors = {core_name: getattr(self, name).detach() for name, core_name in self.kind.params.items()}
        tensors["alpha"] = self.core.alpha.detach()
        return {k: v.float().cpu().contiguous() for k, v in tensors.items()}


def _key(name: str) -> str:
    return name.replace(".", "__")


class AdapterSet(torch.nn.Module):
    """The trainable adapter set plus (optionally) its EMA copy for an EMA teacher."""

    def __init__(self, diffusion_model: torch.nn.Module, targets: str, rank: int, alpha: float,
                 seed: int, with_ema: bool, adapter: str = "lora"):
        super().__init__()
        self.kind = ADAPTERS[adapter]
        self.names = select_targets(diffusion_model, targets)
        modules = dict(diffusion_model.named_modules())
        if self.kind.name == "lora":
            capped = [n for n in self.names if rank > full_rank(modules[n].weight.shape)]
            if capped:
                log.warning("lora_rank=%d is larger than %d of the %d targeted layers can use (e.g. %s); those "
                            "train at their full rank instead (same alpha/rank scale)", rank, len(capped),
                            len(self.names), capped[0])
        gen = torch.Generator().manual_seed(seed)
        with torch.random.fork_rng(devices=[]):  # core's create_train draws from the global RNG
            torch.manual_seed(seed)
            self.layers = torch.nn.ModuleDict({_key(n): self._layer(modules[n], rank, alpha, gen) for n in self.names})
        self.ema = None
        if with_ema:
            self.ema = copy.deepcopy(self.layers).requires_grad_(False)
        self._active = self.layers  # the adapter set the hooks add: student, EMA, or None (adapter off)

    def _layer(self, base: torch.nn.Module, rank: int, alpha: float, gen) -> AdapterLayer:
        core = self.kind.create(tuple(base.weight.shape), rank, alpha, gen)
        return AdapterLayer(self.kind, core, base)

    @contextlib.contextmanager
    def attached(self, diffusion_model: torch.nn.Module):
        """Hook the adapters into the diffusion model for the duration of the block. Base weights
        are frozen meanwhile (no gradient buffers for them) and restored afterwards."""
        modules = dict(diffusion_model.named_modules())
        handles, frozen = [], []
        for name in self.names:
            handles.append(modules[name].register_forward_hook(self._make_hook(_key(name))))
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
            return output + self._active[key].delta(inputs[0], output)
        return hook

    def weight_deltas(self) -> dict[str, torch.Tensor]:
        """Module name -> ΔW of the student adapter."""
        return {n: self.layers[_key(n)].weight_delta().detach() for n in self.names}

    def file_state_dict(self, base_model) -> dict[str, torch.Tensor]:
        """The adapter file: kohya / LyCORIS keys that ComfyUI's LoRA loader maps
        (`comfy.lora.model_lora_keys_unet`)."""
        names = kohya_names(base_model, self.names)
        return {f"{names[n]}.{suffix}": tensor for n in self.names
                for suffix, tensor in self.layers[_key(n)].file_tensors().items()}


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
