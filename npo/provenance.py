"""Which base a whole-model NPO file is taken as an offset against, and whether its metadata agrees.

A whole diffusion model in an NPO file becomes θ_neg − θ_pos by subtracting the weights it was
trained from: the `base_model` input when one is connected, else the positive model's own checkpoint
weights. On a fine-tuned positive (a DPO model, a community checkpoint) with no base connected that
turns the authors' β = 0 recipe into β = 1 without a word. Files the pack exports name the model they
were trained from (training/export.py's metadata: `comfy_selfnpo.base_model_hash`, the trainer's
`model_identity`, and `ss_sd_model_name`, its file name); the loader compares that hash with the
weights the offset is really taken against and says so in its report.
"""
from __future__ import annotations

from types import SimpleNamespace

BASE_HASH_KEY = "comfy_selfnpo.base_model_hash"
BASE_NAME_KEY = "ss_sd_model_name"


def stored_identity(patcher) -> str:
    """The trainer's base-model hash of the weights a whole-model file is an offset against: the
    checkpoint's stored weights and noise schedule, without weight patches (`FullModel` subtracts the
    unpatched weights)."""
    from ..training.identity import model_identity

    return model_identity(SimpleNamespace(model=patcher.model, backup=getattr(patcher, "backup", {}), patches={},
                                          get_model_object=patcher.get_model_object))


def offset_base_check(metadata: dict | None, reference, base_connected: bool) -> tuple[str, str | None]:
    """(what the offset was taken against, a warning or None) for a whole-model file read against
    `reference` (the base_model input, or the positive model when none is connected)."""
    against = ("the base_model input's checkpoint weights" if base_connected else
               "the positive model's checkpoint weights (no base_model connected)")
    metadata = metadata or {}
    trained_from = metadata.get(BASE_HASH_KEY)
    if not trained_from:
        return against, None
    if trained_from == stored_identity(reference):
        return against + ", the model the file was trained from", None
    named = metadata.get(BASE_NAME_KEY) or "another model"
    advice = ("connect the model it was trained from as base_model" if not base_connected else
              "connect the model it was trained from as base_model instead")
    return against, (
        f"the file was trained from {named} (base hash {trained_from}), not from the model it is taken as an offset "
        f"against ({against}): the negative model then also carries the difference between the two models "
        f"(as a merge weight β = 1 towards the file's base would); {advice}, or use a LoRA/offset export")
