"""The identity of the model a run trains from: a hash that a resumed run must reproduce exactly.

It is computed from the *stored* bytes of the base weights (a fixed strided sample of each tensor),
the MODEL's weight patches (their tensors' bytes and strengths) and its noise schedule, without
applying anything. So
it is the same on any device, with any thread count, and whether ComfyUI has the patches merged into
the weights, applies them at cast time (low-VRAM / dynamic VRAM) or has not loaded the model yet.
"""
from __future__ import annotations

import hashlib

import torch

SAMPLE_VALUES = 4096  # per tensor: fast on multi-GB models, and any fine-tune moves sampled values


def tensor_digest(h, name: str, t: torch.Tensor) -> None:
    """Feed name, shape, dtype and the exact bytes of a fixed strided sample of values into `h`."""
    flat = t.detach().reshape(-1)
    stride = max(1, flat.numel() // SAMPLE_VALUES)
    sample = flat[::stride][:SAMPLE_VALUES].cpu().contiguous()
    h.update(f"{name}|{tuple(t.shape)}|{t.dtype}|".encode())
    h.update(sample.view(torch.uint8).numpy().tobytes())


def _stored_weights(patcher) -> dict[str, torch.Tensor]:
    """diffusion-model weights as stored in the checkpoint: the originals ComfyUI backed up where a
    clone merged its patches into the shared module, the module's own tensors elsewhere."""
    base = getattr(patcher, "model", patcher)
    backup = getattr(patcher, "backup", {}) or {}
    out = {}
    for name, t in base.diffusion_model.state_dict().items():
        key = f"diffusion_model.{name}"
        out[key] = backup[key].weight if key in backup else t
    return out


def _patch_tensors(obj, found: list) -> None:
    if torch.is_tensor(obj):
        found.append(obj)
    elif isinstance(obj, (tuple, list)):
        for item in obj:
            _patch_tensors(item, found)
    elif isinstance(obj, dict):
        for key in sorted(obj):
            _patch_tensors(obj[key], found)
    elif hasattr(obj, "weights"):  # comfy.weight_adapter adapters
        _patch_tensors(obj.weights, found)


def _digest_patches(h, patches: dict) -> None:
    for key in sorted(patches):
        for number, patch in enumerate(patches[key]):
            strength, adapter, strength_model, offset, function = patch
            h.update(repr((key, float(strength), float(strength_model), offset,
                           getattr(function, "__qualname__", function))).encode())
            tensors: list = []
            _patch_tensors(adapter, tensors)
            for i, t in enumerate(tensors):
                tensor_digest(h, f"{key}#{number}.{i}", t)


def model_identity(patcher) -> str:
    """Hash of a MODEL (ModelPatcher, or a bare BaseModel) as it is wired into training: its weights,
    its weight patches and its noise schedule (a ModelSampling node's shift changes what is trained)."""
    h = hashlib.sha256()
    for key, t in sorted(_stored_weights(patcher).items()):
        tensor_digest(h, key, t)
    _digest_patches(h, getattr(patcher, "patches", {}) or {})
    get = getattr(patcher, "get_model_object", None)
    sampling = get("model_sampling") if get is not None else getattr(patcher, "model_sampling", None)
    sigmas = getattr(sampling, "sigmas", None)
    if torch.is_tensor(sigmas):
        tensor_digest(h, f"model_sampling:{type(sampling).__name__}", sigmas)
    return h.hexdigest()[:32]
