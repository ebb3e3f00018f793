"""NPO weight-file formats: one class each, detected from the keys, resolved against a model.

`resolve` turns a file into ComfyUI weight patches keyed as `ModelPatcher.add_patches` takes them:
the model key, or (key, offset[, function]) for a slice of a fused weight — diffusers names a fused
qkv's parts separately, and a part lands on its rows exactly as ComfyUI's own LoRA loader does it.
Names are looked up in `names.parameter_names` (every naming the pack reads).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .keys import (KOHYA_SUFFIXES, LORA_LAYOUTS, LYCORIS_ROLES, OFFSET_SUFFIXES, is_text_encoder_key,
                          is_vae_key, lora_role, offset_param)
from .names import model_shapes, parameter_names
from .report import NPOFormatError, PatchReport, file_name
from ..target import Target

# A file whose keys mostly miss the model was made for another architecture: refuse it. Below this
# fraction of matched diffusion-model entries the file is rejected (a correct file matches all).
MIN_MATCHED_FRACTION = 0.9
# prefixes of whole-model files in ComfyUI/ldm naming (ComfyUI's model_detection and savers)
LDM_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "model.model.", "model.", "net.", "")
PREFIX = "diffusion_model."


@dataclass
class Resolved:
    """Patches for `ModelPatcher.add_patches`, the Target behind each, and the report."""
    patches: dict
    targets: dict
    report: PatchReport


def _skipped(key: str) -> bool:
    return is_text_encoder_key(key) or is_vae_key(key)


def _refuse_poor_match(report: PatchReport, matched_entries: int) -> None:
    total = matched_entries + len(report.unmatched)
    if report.patched == 0 or total == 0 or matched_entries / total < MIN_MATCHED_FRACTION:
        sample = ", ".join(report.unmatched[:5])
        raise NPOFormatError(
            f"{file_name(report.source)} does not fit this model: only {matched_entries} of {total} "
            f"diffusion-model entries match its layers (format {report.format}); it was probably made for "
            f"another architecture. Unmatched keys include: {sample}")


class LayerEntries:
    """LoRA layers and offsets, in any naming: kohya_lora, peft_lora, LyCORIS (LoHa/LoKr) and offset
    files (ComfyUI's LoraSave mixes LoRA layers with .diff/.diff_b entries for norms and biases)."""

    def __init__(self, name: str, claims):
        self.name = name
        self._claims = claims

    def claims(self, keys) -> bool:
        return self._claims(keys)

    def resolve(self, npo, base_model, reference=None) -> Resolved:
        names = parameter_names(base_model)
        report = PatchReport(format=self.name, source=npo.source)
        lora_stems, diffs = {}, {}
        for key in npo.tensors:
            if _skipped(key):
                report.ignored.append(key)
                continue
            target, is_lora = _entry_target(key, names)
            if target is None:
                report.unmatched.append(key)
            elif is_lora:
                lora_stems[lora_role(key)[0]] = target
            else:
                diffs[key] = target
        report.unmatched.sort()
        report.ignored.sort()
        patches, targets = _layer_patches(npo, lora_stems, diffs)
        report.patched = len({t.key for t in targets.values()})
        _refuse_poor_match(report, len(npo.tensors) - len(report.unmatched) - len(report.ignored))
        return Resolved(patches, targets, report)


def _entry_target(key: str, names: dict) -> tuple[Target | None, bool]:
    role = lora_role(key)
    if role is not None:
        return names.get(role[0] + ".weight"), True
    offset = offset_param(key)
    if offset is None:
        return None, False
    stem, param = offset
    target = names.get(f"{stem}.{param}")
    if target is None and param == "weight":
        target = names.get(stem)  # a parameter that is not a layer's weight
    return target, False


def _layer_patches(npo, lora_stems: dict, diffs: dict) -> tuple[dict, dict]:
    import comfy.lora

    targets, owner = {}, {}
    entries = [(stem, t) for stem, t in lora_stems.items()] + [(key, t) for key, t in diffs.items()]
    for entry, target in entries:
        key = target.patch_key()
        if key in owner:
            raise NPOFormatError(f"{file_name(npo.source)}: '{owner[key]}' and '{entry}' both change "
                                 f"{target.describe()}; a file may change each weight once")
        owner[key] = entry
        targets[key] = target
    lora_tensors = {k: v for k, v in npo.tensors.items() if lora_role(k) is not None}
    patches = comfy.lora.load_lora(lora_tensors, {stem: t.patch_key() for stem, t in lora_stems.items()},
                                   log_missing=False)
    for key, target in diffs.items():
        patches[target.patch_key()] = ("diff", (npo.tensors[key],))
    return patches, targets


class FullModel:
    """A whole diffusion model (UNet or DiT): ComfyUI/ldm keys, bare or under a checkpoint prefix
    (also the original checkpoints' names ComfyUI converts on load), or diffusers keys. It becomes an
    offset against the weights it was trained from (`reference`)."""
    name = "full_model"

    def claims(self, keys) -> bool:
        return any(not _skipped(k) for k in keys)

    def resolve(self, npo, base_model, reference) -> Resolved:
        report = PatchReport(format=self.name, source=npo.source)
        report.ignored = sorted(k for k in npo.tensors if _skipped(k))
        kept = {k: v for k, v in npo.tensors.items() if not _skipped(k)}
        shapes = model_shapes(base_model)
        readings = [_named_reading(kept, parameter_names(base_model)), _comfy_load_reading(kept, base_model, shapes)]
        matched, unmatched = max(readings, key=lambda r: len(r[0]))
        report.unmatched = sorted(unmatched)
        report.patched = len(matched)
        _refuse_poor_match(report, len(matched))
        if len({t.key for _v, t in matched.values()}) < MIN_MATCHED_FRACTION * len(shapes):
            raise NPOFormatError(
                f"{file_name(npo.source)} covers only {len(matched)} of the model's {len(shapes)} "
                "diffusion-model weights; it is not a whole model for this architecture")
        patches, targets = {}, {}
        for key, value in _assemble(matched, reference, npo.source).items():
            ref = _reference_weight(reference, key)
            offset = value.to(torch.float32) - ref.to(device=value.device, dtype=torch.float32)
            if torch.count_nonzero(offset) == 0:
                continue
            patches[key] = ("diff", (offset.to(ref.dtype if ref.dtype.is_floating_point else torch.float32),))
            targets[key] = Target(key)
        report.patched = len(patches)
        return Resolved(patches, targets, report)


def _named_reading(tensors: dict, names: dict) -> tuple[dict, list]:
    """Every key looked up as it is (ComfyUI keys with or without prefix, diffusers keys)."""
    matched = {k: (v, names[k]) for k, v in tensors.items() if k in names}
    return matched, [k for k in tensors if k not in matched]


def _comfy_load_reading(tensors: dict, base_model, shapes: dict) -> tuple[dict, list]:
    """What ComfyUI's own diffusion-model loader does: strip the checkpoint prefix, then the model
    config's key conversion (original HunyuanVideo names, Flux's *_norm.scale, ...)."""
    best = ({}, list(tensors))
    for prefix in LDM_PREFIXES:
        stripped = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        if not stripped:
            continue
        processed = base_model.model_config.process_unet_state_dict(dict(stripped))
        matched = {k: (v, Target(PREFIX + k)) for k, v in processed.items() if PREFIX + k in shapes}
        if len(matched) > len(best[0]):
            unmatched = [k for k in processed if k not in matched] + [k for k in tensors if not k.startswith(prefix)]
            best = (matched, unmatched)
    return best


def _reference_weight(reference, key: str) -> torch.Tensor:
    from .model import unpatched_weight

    return unpatched_weight(reference, key)


def _assemble(matched: dict, reference, source: str) -> dict[str, torch.Tensor]:
    """Model key -> full new weight; parts of a fused weight (diffusers' to_q/to_k/to_v) are put
    together, and must cover it exactly."""
    parts: dict[str, list] = {}
    for file_key, (tensor, target) in matched.items():
        parts.setdefault(target.key, []).append((file_key, tensor, target))
    out = {}
    for key, entries in parts.items():
        ref = _reference_weight(reference, key)
        value = ref.detach().to(torch.float32, copy=True)
        rows = ref.shape[0] if ref.ndim else 1
        covered = 0
        for file_key, tensor, target in entries:
            part = target.function(tensor) if target.function is not None else tensor
            want = target.shape(ref.shape)
            if tuple(part.shape) != want:
                raise NPOFormatError(
                    f"{file_name(source)}: shape of {file_key} {tuple(part.shape)} differs from the model's "
                    f"{target.describe()} {want}; the file was made for another architecture")
            target.narrow(value).copy_(part.to(value.device, torch.float32))
            covered += target.offset[2] if target.offset is not None else rows
        if covered != rows:
            names = ", ".join(e[0] for e in entries)
            raise NPOFormatError(
                f"{file_name(source)}: {names} give {covered} of the {rows} rows of {key} (a fused "
                "weight must be complete, each part once); the file is incomplete")
        out[key] = value
    return out


def _claims_kohya(keys) -> bool:
    return any(k.endswith(KOHYA_SUFFIXES) for k in keys)


def _claims_lora(keys) -> bool:
    return any(k.endswith(pair) for k in keys for pair in LORA_LAYOUTS)


def _claims_lycoris(keys) -> bool:
    return any(k.endswith("." + role) for k in keys for role in LYCORIS_ROLES)


def _claims_offset(keys) -> bool:
    return any(k.endswith(tuple(OFFSET_SUFFIXES)) for k in keys)


# Detection order: the first format that claims a file's keys reads it.
FORMATS = (
    LayerEntries("kohya_lora", _claims_kohya),
    LayerEntries("peft_lora", _claims_lora),
    LayerEntries("lycoris", _claims_lycoris),  # LoHa / LoKr
    LayerEntries("offset", _claims_offset),
    FullModel(),
)
FORMAT_BY_NAME = {f.name: f for f in FORMATS}


def detect_format(keys) -> str:
    keys = [k for k in keys if not is_text_encoder_key(k)]
    for fmt in FORMATS:
        if fmt.claims(keys):
            return fmt.name
    sample = ", ".join(sorted(keys)[:5]) or "none"
    raise NPOFormatError(
        "unrecognised NPO weight file: it holds no diffusion-model weights (only text-encoder or VAE "
        "keys, or nothing); expected a LoRA (lora_down/lora_up or lora_A/lora_B keys; LyCORIS hada_*/lokr_* keys), an offset (.diff "
        f"keys) or a whole diffusion model (ComfyUI or diffusers keys). First keys: {sample}")
