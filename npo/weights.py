"""NPO weight files and the negative model: θ_neg = θ_pos + η·δ_npo − β·(θ_pos − θ_base).

No node code here: the loader node, the CLI and the tests share these functions.

A file is read once (`load_npo_file`), its format detected from its keys, and resolved against a
concrete ComfyUI model (`NPOWeights.resolve`) into ComfyUI weight patches keyed by the model's own
state-dict keys ("diffusion_model.input_blocks.1.1.proj_in.weight"). `make_negative_model` adds
those patches to a *clone* of the positive model, so the negative inherits every patch the positive
carries (its LoRAs), as the authors do with β = 0.

A clone shares its weights with the positive model (ComfyUI patches one nn.Module in place), so the
MODEL this returns must never be sampled side by side with the positive one naively; `npo.guidance`
handles that (separate copy or batched low-rank residency) and checks it.

Supported formats (`NPOWeights.format`):
  kohya_lora           lora_unet_*.lora_down/lora_up(.weight) + .alpha   (text-encoder keys skipped)
  peft_lora            *.lora_A/lora_B(.weight) or *.lora.down/up.weight, diffusers module names with
                       optional `unet.` / `base_model.model.` prefixes: the authors' Diffusion-NPO
                       releases; ComfyUI/ldm module names are accepted too
  offset               *.diff / *.diff_b (ComfyUI's LoraSave "full_diff")
  full_unet_ldm        a whole UNet with ComfyUI/ldm keys (input_blocks..., optionally prefixed
                       model.diffusion_model. / diffusion_model.)
  full_unet_diffusers  a whole UNet with diffusers keys (down_blocks..., e.g. unet.save_pretrained)
Full UNets become an offset against the weights they were trained from (the base model when one is
given, else the positive model's own checkpoint weights, without its LoRAs).
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

import torch

log = logging.getLogger("comfy_selfnpo")

FORMATS = ("kohya_lora", "peft_lora", "offset", "full_unet_ldm", "full_unet_diffusers")

# A file whose keys mostly miss the model was made for another architecture: refuse it. Below this
# fraction of matched UNet entries the file is rejected (a correct file matches all of them).
MIN_MATCHED_FRACTION = 0.9

# key suffix -> role, for every LoRA layout ComfyUI's own loader understands
_LORA_SUFFIXES = (
    ".lora_down.weight", ".lora_up.weight", ".lora_mid.weight",
    ".lora_A.weight", ".lora_B.weight", ".lora_A.default.weight", ".lora_B.default.weight",
    ".lora.down.weight", ".lora.up.weight", "_lora.down.weight", "_lora.up.weight",
    ".lora_linear_layer.down.weight", ".lora_linear_layer.up.weight",
    ".alpha", ".dora_scale",
)
_OFFSET_SUFFIXES = (".diff", ".diff_b")
_TEXT_ENCODER_PREFIXES = ("lora_te", "text_encoder", "te_", "te1", "te2", "text_encoders.",
                          "cond_stage_model.", "conditioner.", "clip_l.", "clip_g.", "lora_te1_", "lora_te2_")
_DIFFUSERS_PREFIXES = ("unet.base_model.model.", "base_model.model.", "unet.", "model.")
_LDM_PREFIXES = ("model.diffusion_model.", "diffusion_model.")


class NPOFormatError(ValueError):
    """The file is not an NPO weight file this pack can read, or does not fit the model."""


@dataclass
class PatchReport:
    """What resolving an NPO file against a model did."""
    format: str
    patched: int = 0                                   # model weights that receive an NPO patch
    unmatched: list[str] = field(default_factory=list)  # file entries that fit no model weight
    ignored: list[str] = field(default_factory=list)    # text-encoder entries, skipped on purpose
    strength: float = 1.0
    merge_weight: float = 0.0
    merged: int = 0                                    # weights that receive the −β(θ_pos − θ_base) term
    source: str = ""

    def summary(self) -> str:
        name = os.path.basename(self.source) if self.source else "NPO weights"
        text = (f"{name}: {self.format}, patched {self.patched} weights (strength {self.strength:g}"
                f", merge weight {self.merge_weight:g}")
        if self.merge_weight:
            text += f" on {self.merged} weights"
        text += f"), {len(self.unmatched)} unmatched keys"
        if self.ignored:
            text += f", {len(self.ignored)} text-encoder keys ignored"
        return text


@dataclass
class NPOWeights:
    format: str
    tensors: dict[str, torch.Tensor]
    source: str = ""

    def resolve(self, model, reference=None) -> tuple[dict, PatchReport]:
        """ComfyUI patches {model_key: patch} for `model` (a ModelPatcher or BaseModel), and the
        report. `reference` (a ModelPatcher) supplies the weights a full UNet is an offset against;
        default: `model`'s own unpatched weights. Raises NPOFormatError for a file made for another
        architecture (too few keys match, or shapes differ)."""
        base_model = getattr(model, "model", model)
        if self.format in ("kohya_lora", "peft_lora", "offset"):
            patches, report = _resolve_lora_like(self, base_model)
        else:
            ref = reference if reference is not None else model
            patches, report = _resolve_full_unet(self, base_model, ref)
        report.source = self.source
        _check_shapes(patches, base_model, self.source)
        return patches, report


# ----------------------------------------------------------------------------------------------
# reading and format detection

def _strip_suffix(key: str, suffixes) -> tuple[str, str] | None:
    for s in suffixes:
        if key.endswith(s):
            return key[: -len(s)], s
    return None


def _is_text_encoder_key(key: str) -> bool:
    return key.startswith(_TEXT_ENCODER_PREFIXES)


def detect_format(keys) -> str:
    keys = [k for k in keys if not _is_text_encoder_key(k)]
    if not keys:
        raise NPOFormatError("the file holds no UNet weights (only text-encoder keys, or nothing)")
    if any(".hada_" in k or ".lokr_" in k for k in keys):
        raise NPOFormatError("LyCORIS LoHa/LoKr files are not supported as NPO weights; use a LoRA "
                             "(kohya or PEFT), a .diff offset or a full UNet")
    lora_hits = [k for k in keys if _strip_suffix(k, _LORA_SUFFIXES)]
    if any(k.endswith((".lora_down.weight", ".lora_up.weight")) for k in lora_hits):
        return "kohya_lora"
    if lora_hits:
        return "peft_lora"
    if any(k.endswith(_OFFSET_SUFFIXES) for k in keys):
        return "offset"
    if any(".input_blocks." in f".{k}" or k.startswith("input_blocks.") for k in keys):
        return "full_unet_ldm"
    if any(k.startswith(("down_blocks.", "conv_in.")) or ".down_blocks." in k for k in keys):
        return "full_unet_diffusers"
    sample = ", ".join(sorted(keys)[:5])
    raise NPOFormatError(
        "unrecognised NPO weight file: expected a LoRA (lora_down/lora_up or lora_A/lora_B keys), a "
        f"full offset (.diff keys) or a full UNet (ldm or diffusers keys); first keys: {sample}")


def load_npo_file(path: str) -> NPOWeights:
    """Read a .safetensors (or torch) NPO weight file and detect its format from its keys."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"NPO weight file not found: {path}")
    import comfy.utils

    try:
        tensors = comfy.utils.load_torch_file(path, safe_load=True)
    except Exception as exc:
        raise NPOFormatError(f"could not read {path}: {exc}") from exc
    return NPOWeights(format=detect_format(tensors.keys()), tensors=tensors, source=path)


def npo_weights_from_state_dict(tensors: dict[str, torch.Tensor], source: str = "") -> NPOWeights:
    return NPOWeights(format=detect_format(tensors.keys()), tensors=dict(tensors), source=source)


# ----------------------------------------------------------------------------------------------
# key maps

def _diffusers_to_model_keys(base_model) -> dict[str, str]:
    """diffusers UNet key ("down_blocks.0.attentions.0.proj_in.weight") -> model state-dict key."""
    import comfy.utils

    unet_config = base_model.model_config.unet_config
    return {k: f"diffusion_model.{v}" for k, v in comfy.utils.unet_to_diffusers(unet_config).items()}


def _lora_key_map(base_model) -> dict[str, str]:
    """LoRA module stem -> model weight key, for every naming the supported formats use."""
    import comfy.lora

    key_map = comfy.lora.model_lora_keys_unet(base_model, {})
    for dkey, mkey in _diffusers_to_model_keys(base_model).items():
        if not dkey.endswith(".weight"):
            continue
        stem = dkey[: -len(".weight")]
        for prefix in ("",) + _DIFFUSERS_PREFIXES:
            key_map.setdefault(prefix + stem, mkey)
            # old diffusers attention-processor naming: attn1.processor.to_q / to_out_lora
            key_map.setdefault(prefix + stem.replace(".to_", ".processor.to_"), mkey)
    for mkey in list(base_model.state_dict().keys()):
        if mkey.startswith("diffusion_model.") and mkey.endswith(".weight"):
            key_map.setdefault("model." + mkey[: -len(".weight")], mkey)
    return key_map


def _resolve_lora_like(npo: NPOWeights, base_model) -> tuple[dict, PatchReport]:
    import comfy.lora

    key_map = _lora_key_map(base_model)
    suffixes = _LORA_SUFFIXES + _OFFSET_SUFFIXES
    to_load: dict[str, str] = {}
    unmatched, ignored = [], []
    for key in npo.tensors:
        if _is_text_encoder_key(key):
            ignored.append(key)
            continue
        split = _strip_suffix(key, suffixes)
        if split is None:
            unmatched.append(key)
            continue
        stem = split[0]
        target = key_map.get(stem)
        if target is None:
            unmatched.append(key)
        else:
            to_load[stem] = target
    patches = comfy.lora.load_lora(npo.tensors, to_load, log_missing=False)
    report = PatchReport(format=npo.format, patched=len(patches), unmatched=sorted(unmatched),
                         ignored=sorted(ignored))
    _refuse_poor_match(report, matched_entries=len(npo.tensors) - len(unmatched) - len(ignored),
                       source=npo.source)
    return patches, report


def _refuse_poor_match(report: PatchReport, matched_entries: int, source: str) -> None:
    total = matched_entries + len(report.unmatched)
    if report.patched == 0 or total == 0 or matched_entries / total < MIN_MATCHED_FRACTION:
        sample = ", ".join(report.unmatched[:5])
        raise NPOFormatError(
            f"{os.path.basename(source) or 'NPO weights'} does not fit this model: only "
            f"{matched_entries} of {total} UNet entries match its layers (format {report.format}); "
            f"it was probably made for another architecture. Unmatched keys include: {sample}")


def _full_unet_target_keys(npo: NPOWeights, base_model) -> tuple[dict[str, str], list[str], list[str]]:
    """file key -> model key for a full UNet, plus unmatched and ignored file keys."""
    model_keys = set(base_model.state_dict().keys())
    mapping, unmatched, ignored = {}, [], []
    diffusers_map = _diffusers_to_model_keys(base_model) if npo.format == "full_unet_diffusers" else {}
    for key in npo.tensors:
        if _is_text_encoder_key(key) or key.startswith(("first_stage_model.", "vae.")):
            ignored.append(key)
            continue
        target = None
        if npo.format == "full_unet_ldm":
            stem = key
            for prefix in _LDM_PREFIXES:
                if key.startswith(prefix):
                    stem = key[len(prefix):]
                    break
            target = f"diffusion_model.{stem}"
        else:
            stem = key
            for prefix in _DIFFUSERS_PREFIXES:
                if key.startswith(prefix):
                    stem = key[len(prefix):]
                    break
            target = diffusers_map.get(stem)
        if target is None or target not in model_keys:
            unmatched.append(key)
        else:
            mapping[key] = target
    return mapping, unmatched, ignored


def _resolve_full_unet(npo: NPOWeights, base_model, reference) -> tuple[dict, PatchReport]:
    mapping, unmatched, ignored = _full_unet_target_keys(npo, base_model)
    report = PatchReport(format=npo.format, unmatched=sorted(unmatched), ignored=sorted(ignored))
    report.patched = len(mapping)
    _refuse_poor_match(report, matched_entries=len(mapping), source=npo.source)
    # a full UNet must also cover the model: a partial file would silently leave layers untouched
    unet_keys = [k for k in base_model.state_dict() if k.startswith("diffusion_model.")]
    if len(mapping) < MIN_MATCHED_FRACTION * len(unet_keys):
        raise NPOFormatError(
            f"{os.path.basename(npo.source) or 'NPO weights'} covers only {len(mapping)} of the "
            f"model's {len(unet_keys)} UNet weights; it is not a full UNet for this architecture")
    patches = {}
    for file_key, model_key in mapping.items():
        full = npo.tensors[file_key]
        ref = unpatched_weight(reference, model_key)
        if tuple(full.shape) != tuple(ref.shape):
            raise NPOFormatError(
                f"{os.path.basename(npo.source) or 'NPO weights'}: shape of {file_key} "
                f"{tuple(full.shape)} differs from the model's {model_key} {tuple(ref.shape)}; "
                "the file was made for another architecture")
        offset = full.to(torch.float32) - ref.to(device=full.device, dtype=torch.float32)
        if torch.count_nonzero(offset) == 0:
            continue
        patches[model_key] = ("diff", (offset.to(ref.dtype if ref.dtype.is_floating_point else torch.float32),))
    report.patched = len(patches)
    return patches, report


def _patch_shape(patch) -> tuple | None:
    """The weight shape a patch expects, when it says so (LoRA: up × down; diff: its tensor)."""
    import comfy.weight_adapter as weight_adapter

    if isinstance(patch, weight_adapter.LoRAAdapter):
        up, down = patch.weights[0], patch.weights[1]
        if patch.weights[3] is not None or patch.weights[5] is not None:
            return None
        return (up.shape[0], down[0].numel())
    if isinstance(patch, tuple) and len(patch) == 2 and patch[0] == "diff":
        return tuple(patch[1][0].shape)
    return None


def _check_shapes(patches: dict, base_model, source: str) -> None:
    sd = base_model.state_dict()
    bad = []
    for key, patch in patches.items():
        expected = _patch_shape(patch)
        if expected is None or key not in sd:
            continue
        shape = tuple(sd[key].shape)
        if len(expected) == 2 and len(shape) != 2 and not isinstance(patch, tuple):
            shape = (shape[0], int(torch.Size(shape[1:]).numel()))  # LoRA on a conv kernel
        if tuple(expected) != shape:
            bad.append(f"{key}: file {tuple(expected)} vs model {shape}")
    if bad:
        raise NPOFormatError(
            f"{os.path.basename(source) or 'NPO weights'} does not fit this model: {len(bad)} "
            f"weights have other shapes (made for another architecture?), e.g. {'; '.join(bad[:3])}")


# ----------------------------------------------------------------------------------------------
# weights of a ModelPatcher, robust to the shared-module trap

def unpatched_weight(patcher, key: str) -> torch.Tensor:
    """The checkpoint weight behind `key`, whichever clone of the module is currently patched in.

    Clones share one nn.Module and one `backup` dict: a key some clone has patched in place keeps its
    original in `backup`; any other key still holds the original in the module."""
    import comfy.model_patcher
    import comfy.utils

    backup = getattr(patcher, "backup", {})
    if key in backup:
        return backup[key].weight
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


def _merge_keys(positive, base) -> list[str]:
    """Keys where θ_pos and θ_base may differ."""
    if positive.is_clone(base):
        keys = set(positive.patches) | set(base.patches)
        return sorted(k for k in keys if positive.patches.get(k) != base.patches.get(k))
    return sorted(k for k in positive.model.state_dict() if k.startswith("diffusion_model."))


@torch.no_grad()
def make_negative_model(positive, npo: NPOWeights, strength: float = 1.0, merge_weight: float = 0.0,
                        base=None):
    """θ_neg = θ_pos + η·δ_npo − β·(θ_pos − θ_base), as a clone of `positive` carrying patches.

    strength η scales the NPO offset; merge_weight β pulls the negative back towards `base` (needed
    when β ≠ 0; the authors' `merge_weight`, e.g. base = SD1.5 under a DPO fine-tune). Returns
    (negative ModelPatcher, PatchReport). The clone shares weights with `positive`; use it through
    `npo.guidance` (never as a plain second model)."""
    if merge_weight != 0.0 and base is None:
        raise ValueError("merge weight β ≠ 0 needs the base model (θ_base) it merges towards; "
                         "connect the base MODEL or set the merge weight to 0")
    if base is not None and merge_weight != 0.0:
        _check_same_architecture(positive, base)
    patches, report = npo.resolve(positive, reference=base)
    report.strength = float(strength)
    report.merge_weight = float(merge_weight)
    negative = positive.clone()
    if merge_weight != 0.0:
        # applied before the NPO patch: w ← (1−β)·θ_pos + β·θ_base, then w += η·δ
        merge = {}
        for key in _merge_keys(positive, base):
            target = effective_weight(base, key, device=torch.device("cpu"))
            merge[key] = ("diff", (target,))
        negative.add_patches(merge, strength_patch=float(merge_weight), strength_model=1.0 - float(merge_weight))
        report.merged = len(merge)
    added = negative.add_patches(patches, strength_patch=float(strength))
    if len(added) != len(patches):
        missing = sorted(set(patches) - set(added))[:3]
        raise NPOFormatError(f"{len(patches) - len(added)} NPO patches found no model weight, e.g. {missing}")
    negative.set_attachments(NEGATIVE_ATTACHMENT, NegativeModelInfo(report=report, npo_keys=frozenset(patches)))
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
