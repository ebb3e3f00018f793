"""NPO weight files and the negative model: θ_neg = θ_pos + η·δ_npo − β·(θ_pos − θ_base).

No node code here: the loader node, the CLI and the tests share these functions.

A file is read once (`load_npo_file`), checked (every tensor finite, every LoRA layer complete with
agreeing ranks), its format detected from its keys, and resolved against a concrete ComfyUI model
(`NPOWeights.resolve`) into ComfyUI weight patches keyed by the model's own state-dict keys
("diffusion_model.blocks.0.self_attn.q.weight"), or (key, offset) for a slice of a fused weight.
`make_negative_model` adds those patches to a *clone* of the positive model, so the negative inherits
every patch the positive carries (its LoRAs), as the authors do with β = 0.

A clone shares its weights with the positive model (ComfyUI patches one nn.Module in place), so the
MODEL this returns must never be sampled side by side with the positive one naively; `npo.guidance`
handles that (separate copy or batched low-rank residency) and checks it.

Formats (`NPOWeights.format`; one class each in weights/formats.py):
  kohya_lora   <stem>.lora_down.weight / .lora_up.weight (+ .alpha); text-encoder keys skipped
  peft_lora    <stem>.lora_A/.lora_B(.weight | .default.weight), .lora.down/.up.weight, ...: PEFT and
               diffusers files, e.g. the authors' Diffusion-NPO releases
  lycoris      <stem>.hada_w1_a/_w1_b/_w2_a/_w2_b (LoHa), <stem>.lokr_w1/_w2 or their _a/_b pairs (LoKr),
               + .alpha: LyCORIS files (and the pack's LoHa/LoKr runs); ComfyUI's adapters do the math
  offset       <stem>.diff / <stem>.diff_b: ComfyUI's LoraSave "full_diff" layout
  full_model   a whole UNet or DiT: ComfyUI/ldm keys (bare, "diffusion_model.", "model.diffusion_model.",
               ...; also the original checkpoint names ComfyUI converts on load) or diffusers keys. It
               becomes an offset against the weights it was trained from (the base model when one is
               given, else the positive model's own checkpoint weights, without its LoRAs).
A <stem> may be named as ComfyUI names the layer (diffusion_model.blocks.0.self_attn.q, kohya
lora_unet_blocks_0_self_attn_q, every name comfy.lora.model_lora_keys_unet knows) or as diffusers
does, bare or under transformer. / unet. / base_model.model. (blocks.0.attn1.to_q; the family tables
in diffusers_names.py). diffusers names for parts of a fused ComfyUI weight (SD3/Flux/Chroma/Hunyuan
to_q/to_k/to_v on qkv or linear1, Lumina 2's grouped-query q/k/v) become slice patches on its rows.

Offsets carry every changed tensor. Key rule for a model parameter "diffusion_model.<path>.<name>":
  name == "weight"  ->  "diffusion_model.<path>.diff"
  name == "bias"    ->  "diffusion_model.<path>.diff_b"
  any other name    ->  "diffusion_model.<path>.<name>.diff"
                         (Wan: diffusion_model.blocks.0.modulation.diff; LTXV:
                          diffusion_model.transformer_blocks.0.scale_shift_table.diff,
                          diffusion_model.scale_shift_table.diff)
ComfyUI's own LoRA loader reads all three the same way (its key map names every parameter that is
not a weight by its full key). One limit is ComfyUI's, not the file's: ModelPatcher writes patches
only into parameters of leaf modules, so the non-leaf ones (Wan's modulation, LTXV's scale_shift_table)
take no effect when ComfyUI loads a patched clone; the pack's separate residency bakes every patch
into its own copy (npo.guidance), which is what `auto` picks for such negatives.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import torch

from ..provenance import offset_base_check
from .model import effective_weight, patch_block_parameters, unpatched_weight
from .checks import check_finite, check_lora_layers, check_number_types
from .formats import FORMAT_BY_NAME, FORMATS, MIN_MATCHED_FRACTION, Resolved, detect_format
from .keys import is_text_encoder_key
from .report import NPOFormatError, PatchReport, file_name

__all__ = [
    "FORMATS", "MIN_MATCHED_FRACTION", "NEGATIVE_ATTACHMENT", "NPOFormatError", "NPOWeights", "NegativeModelInfo",
    "PatchReport", "detect_format", "effective_weight", "load_npo_file", "make_negative_model",
    "npo_weights_from_state_dict", "unpatched_weight",
]

log = logging.getLogger("comfy_selfnpo")


@dataclass
class NPOWeights:
    format: str
    tensors: dict[str, torch.Tensor]
    source: str = ""
    metadata: dict = field(default_factory=dict)  # the file's safetensors metadata (provenance.py reads it)

    def resolve(self, model, reference=None) -> tuple[dict, PatchReport]:
        """ComfyUI patches {model key or (key, offset[, function]): patch} for `model` (a
        ModelPatcher or BaseModel), and the report. `reference` (a ModelPatcher) supplies the weights
        a whole-model file is an offset against; default: `model`'s own unpatched weights. Raises
        NPOFormatError for a file made for another architecture (too few keys match, or shapes differ)."""
        base_model = getattr(model, "model", model)
        resolved = FORMAT_BY_NAME[self.format].resolve(self, base_model, reference if reference is not None else model)
        _check_shapes(resolved, base_model, self.source)
        return resolved.patches, resolved.report


def _checked(tensors: dict, source: str, metadata: dict | None = None) -> NPOWeights:
    fmt = detect_format(tensors.keys())
    check_finite(tensors, source)
    check_number_types(tensors, source, skip=is_text_encoder_key)
    check_lora_layers(tensors, source, skip=is_text_encoder_key)
    return NPOWeights(format=fmt, tensors=tensors, source=source, metadata=dict(metadata or {}))


def load_npo_file(path: str) -> NPOWeights:
    """Read a .safetensors (or torch) NPO weight file, check it and detect its format from its keys."""
    import os

    if not os.path.isfile(path):
        raise FileNotFoundError(f"NPO weight file not found: {path}")
    import comfy.utils

    try:
        tensors, metadata = comfy.utils.load_torch_file(path, safe_load=True, return_metadata=True)
    except Exception as exc:
        raise NPOFormatError(f"could not read {path}: {exc}") from exc
    return _checked(tensors, path, metadata)


def npo_weights_from_state_dict(tensors: dict[str, torch.Tensor], source: str = "") -> NPOWeights:
    return _checked(dict(tensors), source)


def _patch_shape(patch) -> tuple | None:
    """The weight shape a patch means, when it says so (LoRA: out × in…; diff: its tensor)."""
    import comfy.weight_adapter as weight_adapter

    if isinstance(patch, weight_adapter.LoRAAdapter):
        up, down, _alpha, mid, _dora, reshape = patch.weights
        if mid is not None or reshape is not None:
            return None
        return (up.shape[0], down[0].numel())
    if isinstance(patch, weight_adapter.LoHaAdapter) and patch.weights[5] is None:  # no Tucker core
        w1a, w1b = patch.weights[:2]
        return (w1a.shape[0], w1b[0].numel())
    if isinstance(patch, weight_adapter.LoKrAdapter) and patch.weights[7] is None:
        return _lokr_shape(*patch.weights[:2], *patch.weights[3:7])
    if isinstance(patch, tuple) and len(patch) == 2 and patch[0] == "diff":
        return tuple(patch[1][0].shape)
    return None


def _lokr_shape(w1, w2, w1a, w1b, w2a, w2b) -> tuple:
    """kron(w1, w2) as (out, in·kernel); a factor is whole or a low-rank pair."""
    out1, in1 = (w1.shape[0], w1.shape[1]) if w1 is not None else (w1a.shape[0], w1b.shape[1])
    out2, in2 = (w2.shape[0], w2[0].numel()) if w2 is not None else (w2a.shape[0], w2b[0].numel())
    return (out1 * out2, in1 * in2)


def _check_shapes(resolved: Resolved, base_model, source: str) -> None:
    sd = base_model.state_dict()
    bad = []
    for key, patch in resolved.patches.items():
        target = resolved.targets[key]
        expected = _patch_shape(patch)
        if expected is None:
            continue
        shape = target.shape(sd[target.key].shape)
        if not (isinstance(patch, tuple) or len(shape) == 2):
            shape = (shape[0], int(torch.Size(shape[1:]).numel()))  # LoRA on a conv kernel
        if tuple(expected) != shape:
            bad.append(f"{target.describe()}: file {tuple(expected)} vs model {shape}")
    if bad:
        raise NPOFormatError(
            f"{file_name(source)} does not fit this model: {len(bad)} weights have other shapes (made for "
            f"another architecture?), e.g. {'; '.join(bad[:3])}")


def _merge_keys(positive, base) -> list[str]:
    """Keys where θ_pos and θ_base may differ."""
    if positive.is_clone(base):
        keys = set(positive.patches) | set(base.patches)
        return sorted(k for k in keys if positive.patches.get(k) != base.patches.get(k))
    return sorted(k for k in positive.model.state_dict() if k.startswith("diffusion_model."))


def _check_settings(strength: float, merge_weight: float, base) -> None:
    for name, value in (("strength", strength), ("merge weight", merge_weight)):
        if not math.isfinite(value):
            raise ValueError(f"Self-NPO {name} must be a finite number, not {value}")
    if merge_weight != 0.0 and base is None:
        raise ValueError("merge weight β ≠ 0 needs the base model (θ_base) it merges towards; "
                         "connect the base MODEL or set the merge weight to 0")


def _refuse_plain_cfg(strength: float, merged: int) -> None:
    if strength == 0.0 and merged == 0:
        raise ValueError(
            "Self-NPO strength is 0: the negative model would equal the positive model, so the guidance "
            "would be plain CFG. Set the strength to the trained change (1.0) or another non-zero value; "
            "for plain CFG leave the Self-NPO nodes out.")


def _is_zero_change(patch) -> bool:
    """Whether a patch (a LoRA adapter, or ("diff", (tensor,))) changes nothing."""
    import comfy.weight_adapter as weight_adapter

    if isinstance(patch, weight_adapter.LoRAAdapter):
        up, down, alpha, mid = patch.weights[:4]
        factors = [up, down] + ([mid] if mid is not None else [])
        return (alpha is not None and float(alpha) == 0.0) or any(not torch.count_nonzero(f) for f in factors)
    if isinstance(patch, tuple) and len(patch) == 2 and patch[0] == "diff":
        return not torch.count_nonzero(patch[1][0])
    return False


def _refuse_zero_change(patches: dict, report: PatchReport) -> None:
    """One refusal, whatever residency would come next, for a file that changes nothing."""
    if all(_is_zero_change(p) for p in patches.values()):
        what = (f"the whole model in it equals {report.offset_against}" if report.format == "full_model" else
                "every change in it is zero (e.g. LoRA up matrices of zeros: saved before training took a step?)")
        raise NPOFormatError(
            f"{file_name(report.source)}: {what}, so the negative model would equal the positive model and "
            "Self-NPO guidance would be plain CFG. Export the weights again from a trained run (or pick the file "
            "for the right model).")


@torch.no_grad()
def make_negative_model(positive, npo: NPOWeights, strength: float = 1.0, merge_weight: float = 0.0,
                        base=None):
    """θ_neg = θ_pos + η·δ_npo − β·(θ_pos − θ_base), as a clone of `positive` carrying patches.

    strength η scales the NPO offset; merge_weight β pulls the negative back towards `base` (needed
    when β ≠ 0; the authors' `merge_weight`, e.g. base = SD1.5 under a DPO fine-tune). Returns
    (negative ModelPatcher, PatchReport). The clone shares weights with `positive`; use it through
    `npo.guidance` (never as a plain second model)."""
    strength, merge_weight = float(strength), float(merge_weight)
    _check_settings(strength, merge_weight, base)
    if merge_weight == 0.0:
        _refuse_plain_cfg(strength, merged=0)
    if base is not None and merge_weight != 0.0:
        _check_same_architecture(positive, base)
    patches, report = npo.resolve(positive, reference=base)
    report.strength, report.merge_weight = strength, merge_weight
    if npo.format == "full_model":
        report.offset_against, warning = offset_base_check(npo.metadata, base if base is not None else positive,
                                                           base_connected=base is not None)
        if warning:
            report.warnings.append(warning)
            log.warning("Self-NPO: %s: %s", file_name(npo.source), warning)
    _refuse_zero_change(patches, report)
    negative = positive.clone()
    if merge_weight != 0.0:
        # applied before the NPO patch: w ← (1−β)·θ_pos + β·θ_base, then w += η·δ
        merge = {key: ("diff", (effective_weight(base, key, device=torch.device("cpu")),))
                 for key in _merge_keys(positive, base)}
        _refuse_plain_cfg(strength, merged=len(merge))
        negative.add_patches(merge, strength_patch=merge_weight, strength_model=1.0 - merge_weight)
        report.merged = len(merge)
    added = negative.add_patches(patches, strength_patch=strength)
    if len(added) != len(patches):
        missing = sorted(map(str, set(patches) - set(added)))[:3]
        raise NPOFormatError(f"{len(patches) - len(added)} NPO patches found no model weight, e.g. {missing}")
    patch_block_parameters(negative)
    npo_keys = frozenset(k if isinstance(k, str) else k[0] for k in patches)
    negative.set_attachments(NEGATIVE_ATTACHMENT, NegativeModelInfo(report=report, npo_keys=npo_keys))
    log.info("Self-NPO negative model: %s", report.summary())
    return negative, report


NEGATIVE_ATTACHMENT = "self_npo_negative_info"


@dataclass(frozen=True)
class NegativeModelInfo:
    """Attached to a negative model: which weights the NPO file changes (what the guard checks)."""
    report: PatchReport
    npo_keys: frozenset


def _check_same_architecture(positive, base) -> None:
    a = positive.model.state_dict()
    b = base.model.state_dict()
    mismatched = [k for k in a if k.startswith("diffusion_model.") and (k not in b or a[k].shape != b[k].shape)]
    if mismatched:
        raise ValueError(f"the base model does not have the positive model's architecture "
                         f"({len(mismatched)} weights differ in name or shape, e.g. {mismatched[0]})")
