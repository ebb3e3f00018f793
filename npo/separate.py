"""separate residency: the negative model gets its own module, and a guard checks its live weights.

A negative made as a clone of the positive model (checkpoint + NPO LoRA) shares its nn.Module with
it; ComfyUI patches weights in place and keeps one patch set live, so the negative needs weights of
its own (+1 model of memory):

* newer ComfyUI: core's own deep copy, `ModelPatcher.clone(force_deepcopy=True)`, which reloads the
  weights through the loader (`cached_patcher_init`) and keeps the patches as patches;
* otherwise (the pinned core, or a model whose loader recorded no `cached_patcher_init`): a new
  BaseModel from the model config holding the negative's effective weights (patches baked in).

The guard compares the weights a forward pass would really use — including patches ComfyUI applies
at cast time under lowvram and dynamic VRAM loading — with the expected θ_neg − θ_pos.
"""
from __future__ import annotations

import inspect
import logging
import uuid
import weakref

import torch

import comfy.model_patcher
import comfy.utils

from .errors import SelfNPOError
from .weights import NEGATIVE_ATTACHMENT, effective_weight, unpatched_weight
from .lowrank import differing_keys

log = logging.getLogger("comfy_selfnpo")

GUARD_KEYS = 4  # how many of the most-changed weights the guard compares

# negative ModelPatcher -> (its patches_uuid, independent copy): the guider and the apply node fed the
# same negative model share one copy instead of holding two
_SEPARATE_COPIES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def separate_negative_for(negative):
    cached = _SEPARATE_COPIES.get(negative)
    if cached is not None and cached[0] == negative.patches_uuid:
        return cached[1].clone()
    copy = core_deep_copy(negative) or materialize_independent_copy(negative)
    _SEPARATE_COPIES[negative] = (negative.patches_uuid, copy)
    return copy.clone()


def core_deep_copy(patcher):
    """Core's own independent copy where this ComfyUI offers one (`clone(force_deepcopy=True)`,
    newer than the pinned v0.14.1) and the model's loader recorded how to reload it; else None."""
    if "force_deepcopy" not in inspect.signature(patcher.clone).parameters:
        return None
    if getattr(patcher, "cached_patcher_init", None) is None:
        return None
    copy = patcher.clone(force_deepcopy=True)
    # as core's own private copies do: the weights are no longer the source's, share no state with it
    copy.parent = None
    copy.hook_backup = {}
    copy.clone_base_uuid = uuid.uuid4()
    # per-GPU copies of the positive model (a MultiGPU CFG Split placed before the negative loader)
    # are not the negative's: core makes the negative's own when it splits the sampled model
    copy.remove_additional_models("multigpu")
    return copy


@torch.no_grad()
def materialize_independent_copy(patcher, patcher_class=None):
    """A new ModelPatcher around a new BaseModel holding `patcher`'s effective weights (its patches
    baked in), sharing nothing with the original module. Costs one model of memory."""
    src = patcher.model
    new = type(src)(src.model_config, model_type=src.model_type, device=patcher.offload_device)
    if getattr(src, "concat_keys", None) is not None and hasattr(new, "concat_keys"):
        new.concat_keys = src.concat_keys
    state = {}
    for key in src.state_dict():
        raw = unpatched_weight(patcher, key)
        if key in patcher.patches:
            dtype = raw.dtype if raw.dtype.is_floating_point else torch.float32
            state[key] = effective_weight(patcher, key, device=torch.device("cpu")).to(dtype)
        else:
            state[key] = raw
    missing, unexpected = new.load_state_dict(state, strict=False)
    if unexpected or [k for k in missing if k.startswith("diffusion_model.")]:
        raise SelfNPOError(f"could not build a separate negative model: missing {missing[:3]}, unexpected {unexpected[:3]}")
    new.to(patcher.offload_device)
    # the same patcher class as the original (ComfyUI's dynamic-VRAM patcher when that is in use)
    copy = (patcher_class or type(patcher))(new, load_device=patcher.load_device, offload_device=patcher.offload_device)
    copy.object_patches = dict(patcher.object_patches)  # e.g. a ModelSampling override
    if hasattr(copy, "cached_patcher_init"):
        # newer core rebuilds models through this (MultiGPU per-device copies, non-dynamic delegates)
        copy.cached_patcher_init = (_rebuild_independent_copy, (patcher,))
    return copy


def _rebuild_independent_copy(patcher, disable_dynamic=False):
    return materialize_independent_copy(patcher, comfy.model_patcher.ModelPatcher if disable_dynamic else None)


def live_weight(base_model, key: str) -> torch.Tensor:
    """The weight a forward pass of the loaded module would use right now: the stored tensor, then
    every patch ComfyUI applies at cast time — `{param}_lowvram_function` (dynamic VRAM, newer core)
    and the `{param}_function` list (lowvram partial loads, weight wrappers) — in core's order."""
    from comfy.quant_ops import QuantizedTensor

    path, _, param = key.rpartition(".")
    module = comfy.utils.get_attr(base_model, path)
    weight = getattr(module, param).detach().to(torch.float32, copy=True)
    if isinstance(weight, QuantizedTensor):
        weight = weight.dequantize()
    lowvram_function = getattr(module, f"{param}_lowvram_function", None)
    if lowvram_function is not None:
        weight = lowvram_function(weight)
    for fn in getattr(module, f"{param}_function", None) or []:
        weight = fn(weight)
    return weight


def guard_keys(positive, negative_copy, negative) -> dict:
    """The few weights where θ_neg − θ_pos is largest, with that expected difference (cpu, f32)."""
    info = negative.get_attachment(NEGATIVE_ATTACHMENT) if hasattr(negative, "get_attachment") else None
    if positive.is_clone(negative):
        keys = differing_keys(positive, negative)
    elif info is not None:
        keys = sorted(info.npo_keys)
    else:  # an unrelated model: compare a spread of its weights
        keys = sorted(k for k in negative.model.state_dict() if k.startswith("diffusion_model.") and k.endswith(".weight"))
        keys = keys[:: max(1, len(keys) // 64)]
    cpu = torch.device("cpu")
    scored = []
    for key in keys:
        delta = effective_weight(negative_copy, key, device=cpu) - effective_weight(positive, key, device=cpu)
        norm = float(torch.linalg.vector_norm(delta))
        if norm > 0:
            scored.append((norm, key, delta))
    scored.sort(key=lambda s: -s[0])
    return {key: delta for _n, key, delta in scored[:GUARD_KEYS]}


def check_live_weights(positive, negative, guard: dict) -> None:
    """Raise unless the loaded negative module carries θ_neg − θ_pos where `guard` expects it."""
    if negative.model is positive.model:
        raise SelfNPOError("the negative model shares its weights with the positive model; "
                           "Self-NPO would silently run plain CFG")
    for key, expected in guard.items():
        try:
            live = live_weight(negative.model, key).cpu() - live_weight(positive.model, key).cpu()
        except Exception as exc:  # e.g. weights streamed on demand by a memory manager we cannot read
            log.warning("Self-NPO guard could not read the live weight %s (%s); the modules are "
                        "distinct, skipping the value check", key, exc)
            continue
        scale = float(torch.linalg.vector_norm(expected))
        err = float(torch.linalg.vector_norm(live - expected))
        if not err <= 0.25 * scale + 1e-6:
            raise SelfNPOError(
                f"Self-NPO guard: the loaded negative model does not carry the NPO change at {key} "
                f"(difference from the positive weights off by {err / max(scale, 1e-12):.0%}). The "
                "negative branch would not use the negative weights; refusing to run plain CFG. "
                "If LoRAs were added after 'Apply Self-NPO', apply Self-NPO last.")


class LaterPatches:
    """What the positive MODEL carried when Self-NPO was applied (weight patches, object patches,
    weight wrappers), to catch patches added after 'Apply Self-NPO'. The separate negative is a copy
    taken at apply time: a LoRA loader (or ModelSampling node, ...) placed after 'Apply Self-NPO'
    changes only the positive branch, and the picture is wrong without any error. Changes to
    model_options (attention patches, wrappers) need no check: they reach the negative pass with the
    model_options it is run with."""

    # what is compared: (how the error names it, the patcher's dict of it)
    SOURCES = (("weight patches (a LoRA loader?)", lambda p: p.patches),
               ("object patches (a ModelSampling node?)", lambda p: p.object_patches),
               ("weight wrappers", lambda p: getattr(p, "weight_wrapper_patches", {})))

    def __init__(self, patcher):
        # lists copied (a later patch appends to them), everything else kept as the object it was
        self.before = [{k: list(v) if isinstance(v, list) else v for k, v in get(patcher).items()}
                       for _what, get in self.SOURCES]

    @staticmethod
    def _changed(before: dict, now: dict) -> list[str]:
        def same(a, b):
            if isinstance(a, list) and isinstance(b, list):
                return len(a) == len(b) and all(x is y for x, y in zip(a, b))
            return a is b
        return sorted(k for k in set(before) | set(now) if not same(before.get(k), now.get(k)))

    def check(self, patcher) -> None:
        """Raise when `patcher` (the sampled MODEL) carries patches it did not carry at apply time."""
        found = []
        for (what, get), before in zip(self.SOURCES, self.before):
            changed = self._changed(before, get(patcher))
            if changed:
                found.append(f"{what} on {len(changed)} entries, e.g. {changed[0]}")
        if found:
            raise SelfNPOError(
                "Self-NPO: the model was patched after 'Apply Self-NPO' (" + "; ".join(found) + "). In residency "
                "separate the negative model is a copy taken when Self-NPO was applied, so its branch would run "
                "without these changes and the picture would be wrong. Put 'Apply Self-NPO' after your LoRA "
                "loaders and model patches (connect the model they output), or, for a negative model made by 'Self-NPO "
                "Negative Model', use residency batched_lowrank.")


def negative_model_options(model_options: dict, key: str) -> dict:
    """model_options for the negative model's calc_cond_batch.

    Newer core's MultiGPU CFG split makes calc_cond_batch take its models from
    `model_options["multigpu_clones"]` (device -> positive patcher) and ignore its `model` argument, so
    passed on as it is the negative pass would run on the positive model's copies. Each per-device
    positive copy carries its own copy of the negative (registered under `key`, copied by core with
    it): map the split onto those. Where one is missing, drop the split for the negative pass and
    run it on the main device, as core's DualModelGuider does."""
    clones = model_options.get("multigpu_clones")
    if not clones:
        return model_options
    negatives = {}
    for device, positive in clones.items():
        found = positive.get_additional_models_with_key(key)
        if not found or found[0].model is positive.model:
            return {k: v for k, v in model_options.items() if k != "multigpu_clones"}
        negatives[device] = found[0]
    return {**model_options, "multigpu_clones": negatives}
