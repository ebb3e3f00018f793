"""batched_lowrank residency: one copy of the weights, θ_neg − θ_pos added to some rows of the batch.

θ_neg − θ_pos is put in low-rank form per layer (exact for LoRA patches, also those on a slice of a
fused weight; full-rank offsets reduced by SVD to `rank`, relative error reported, or kept dense when
rank is None). Forward hooks add it to the
layer outputs of the rows the negative model should compute: the chunks of the batch whose
`cond_or_uncond` slot is one of the negative slots of this step. Every supported layer (Linear,
Conv, GroupNorm, LayerNorm) is linear in its weights, so output(θ_neg) = output(θ_pos) + Δ-layer(x).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

import comfy.utils

from .errors import SelfNPOError
from .weights import effective_weight


def differing_keys(positive, negative) -> list[str]:
    """Keys whose weights the clone `negative` changes relative to `positive` (same module)."""
    keys = set(positive.patches) | set(negative.patches)
    return sorted(k for k in keys if positive.patches.get(k, []) != negative.patches.get(k, []))


def exact_lora_change(positive, negative, key: str):
    """θ_neg − θ_pos at `key` as exact low-rank factors (see `exact_lora_tail`), or None."""
    shape = tuple(comfy.utils.get_attr(positive.model, key).shape)
    return exact_lora_tail(positive.patches.get(key, []), negative.patches.get(key, []), shape)


def exact_lora_tail(pos_list, neg_list, weight_shape):
    """The extra patches of `neg_list` when they are plain LoRAs added on top of `pos_list`, as exact
    low-rank factors of the whole weight: [(up (out, r), down (r, *weight_shape[1:]), scale)], else
    None (then the difference is taken numerically)."""
    if neg_list[: len(pos_list)] != pos_list or len(neg_list) == len(pos_list):
        return None
    factors = [lora_patch_factors(patch, tuple(weight_shape)) for patch in neg_list[len(pos_list):]]
    return None if any(f is None for f in factors) else factors


def lora_patch_factors(patch, weight_shape: tuple):
    """(up, down, scale) with scale·up @ down = the change one ComfyUI patch makes to a weight of
    `weight_shape`, when the patch is a plain LoRA; else None.

    A patch with an `offset` (dim, start, length) changes only that slice of the weight: ComfyUI's
    key maps put diffusers-named LoRAs for MMDiT (SD3) and Flux/Chroma there, e.g. `to_q` on rows
    0..h of the fused `qkv` or `proj_mlp` on rows 3h..7h of `linear1`. Its change is the LoRA's
    up @ down placed into that slice, zeros elsewhere: still exactly rank r, with the slice's rows of
    `up` (dim 0) or columns of `down` (dim 1) embedded in zeros."""
    import comfy.weight_adapter as weight_adapter

    strength, adapter, strength_model, offset, function = patch
    if not isinstance(adapter, weight_adapter.LoRAAdapter) or strength_model != 1.0 or function is not None:
        return None
    up, down, alpha, mid, dora_scale, reshape = adapter.weights
    if mid is not None or dora_scale is not None or reshape is not None:
        return None
    target = list(weight_shape)  # the shape of the part the patch changes
    if offset is not None:
        if len(offset) != 3 or offset[0] not in (0, 1) or offset[1] + offset[2] > weight_shape[offset[0]]:
            return None
        target[offset[0]] = offset[2]
    up, down = up.flatten(1), down.flatten(1)
    if up.shape[0] != target[0] or up.shape[1] != down.shape[0] or down.shape[1] != math.prod(target[1:]):
        return None
    down = down.reshape((down.shape[0],) + tuple(target[1:]))
    if offset is not None:
        up, down = _embed_slice(up, down, weight_shape, offset)
    scale = (alpha / down.shape[0]) if alpha is not None else 1.0
    return up, down, float(strength) * float(scale)


def _embed_slice(up, down, weight_shape, offset):
    """The factors of a slice's change as factors of the whole weight (zeros outside the slice)."""
    dim, start, length = offset
    if dim == 0:
        full = up.new_zeros((weight_shape[0], up.shape[1]))
        full[start:start + length] = up
        return full, down
    full = down.new_zeros((down.shape[0],) + tuple(weight_shape[1:]))
    full[:, start:start + length] = down
    return up, full


@dataclass
class LayerDelta:
    """θ_neg − θ_pos of one layer: weight as low-rank factors or dense, bias dense."""
    module_path: str
    up: torch.Tensor | None = None     # (out, r)
    down: torch.Tensor | None = None   # (r, in, *kernel) or (r, in)
    weight: torch.Tensor | None = None  # dense weight difference
    bias: torch.Tensor | None = None
    _cache: dict = field(default_factory=dict, repr=False)

    def tensors(self, device, dtype):
        cached = self._cache.get(device)
        if cached is None or cached[0] != dtype:
            # one dtype per device; one entry per device, so a multi-GPU split does not recast each step
            cast = (lambda t: None if t is None else t.to(device=device, dtype=dtype))
            cached = (dtype, (cast(self.up), cast(self.down), cast(self.weight), cast(self.bias)))
            self._cache[device] = cached
        return cached[1]

    def numel(self) -> int:
        return sum(t.numel() for t in (self.up, self.down, self.weight, self.bias) if t is not None)


def _svd_factors(delta: torch.Tensor, rank: int):
    """Best rank-`rank` factors of a weight difference and the relative Frobenius error."""
    flat = delta.flatten(1).float()
    u, s, vh = torch.linalg.svd(flat, full_matrices=False)
    r = min(rank, s.shape[0])
    up = u[:, :r] * s[:r]
    down = vh[:r]
    total = torch.linalg.vector_norm(s)
    err = float(torch.linalg.vector_norm(s[r:]) / total) if total > 0 else 0.0
    return up, down.reshape((r,) + tuple(delta.shape[1:])), err


@dataclass
class LowRankReport:
    exact_layers: int = 0   # LoRA patches used as they are
    svd_layers: int = 0     # full-rank offsets reduced by SVD
    dense_layers: int = 0   # kept dense (norms, biases, or rank=None)
    max_relative_error: float = 0.0
    relative_error: float = 0.0  # over all SVD-reduced weights together (Frobenius)
    extra_parameters: int = 0

    def summary(self) -> str:
        text = (f"{self.exact_layers} exact LoRA layers, {self.svd_layers} SVD-reduced, "
                f"{self.dense_layers} dense; {self.extra_parameters} extra parameters")
        if self.svd_layers:
            text += f"; SVD relative error {self.relative_error:.3g} (max per layer {self.max_relative_error:.3g})"
        return text


@torch.no_grad()
def lowrank_deltas(positive, negative, rank: int | None = None) -> tuple[dict[str, LayerDelta], LowRankReport]:
    """θ_neg − θ_pos per layer for a negative that is a clone of the positive plus patches."""
    report = LowRankReport()
    deltas: dict[str, LayerDelta] = {}
    err_num = err_den = 0.0
    cpu = torch.device("cpu")
    for key in differing_keys(positive, negative):
        module_path, _, param = key.rpartition(".")
        if param not in ("weight", "bias"):
            raise SelfNPOError(f"batched_lowrank cannot apply a change to {key}; use residency 'separate'")
        entry = deltas.setdefault(module_path, LayerDelta(module_path))
        factors = exact_lora_change(positive, negative, key) if param == "weight" else None
        if factors and all(s == 0 or not torch.count_nonzero(u) or not torch.count_nonzero(d) for u, d, s in factors):
            continue  # a LoRA that changes nothing: the same answer as `separate` gives (no change)
        if factors:
            entry.up = torch.cat([up.float() * s for up, _down, s in factors], dim=1).to(cpu)
            entry.down = torch.cat([d.float() for _u, d, _s in factors], dim=0).to(cpu)
            report.exact_layers += 1
            continue
        delta = (effective_weight(negative, key, device=cpu) - effective_weight(positive, key, device=cpu))
        if torch.count_nonzero(delta) == 0:
            continue
        if param == "bias":
            entry.bias = delta
        elif delta.ndim >= 2 and rank is not None and rank < min(delta.shape[0], delta[0].numel()):
            entry.up, entry.down, err = _svd_factors(delta, rank)
            recon = (entry.up @ entry.down.flatten(1)).reshape(delta.shape)
            err_num += float(torch.linalg.vector_norm(delta - recon)) ** 2
            err_den += float(torch.linalg.vector_norm(delta)) ** 2
            report.svd_layers += 1
            report.max_relative_error = max(report.max_relative_error, err)
        else:
            entry.weight = delta
            report.dense_layers += 1
    deltas = {k: v for k, v in deltas.items() if v.numel() > 0}
    report.relative_error = math.sqrt(err_num / err_den) if err_den > 0 else 0.0
    report.extra_parameters = sum(d.numel() for d in deltas.values())
    return deltas, report


# --- forward hooks on the negative rows ---------------------------------------------------------

_CONV = (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)
_CONV_FN = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def _layer_output_delta(module, delta: LayerDelta, x: torch.Tensor) -> torch.Tensor:
    """(θ_neg − θ_pos) applied to input rows `x`: every supported layer is linear in its weights."""
    up, down, weight, bias = delta.tensors(x.device, x.dtype)
    if isinstance(module, torch.nn.Linear):
        out = 0
        if up is not None:
            out = F.linear(F.linear(x, down), up)
        if weight is not None:
            out = out + F.linear(x, weight)
        if bias is not None:
            out = out + bias
        return out
    if isinstance(module, _CONV):
        nd = module.weight.ndim - 2
        conv = _CONV_FN[nd]
        kw = dict(stride=module.stride, padding=module.padding, dilation=module.dilation)
        out = 0
        if up is not None:
            h = conv(x, down.reshape((down.shape[0], -1) + tuple(module.kernel_size)) if down.ndim == 2 else down, **kw)
            out = conv(h, up.reshape(up.shape + (1,) * nd))
        if weight is not None:
            out = out + conv(x, weight, groups=module.groups, **kw)
        if bias is not None:
            out = out + bias.reshape((1, -1) + (1,) * nd)
        return out
    if isinstance(module, torch.nn.GroupNorm):
        w = weight if weight is not None else torch.zeros(module.num_channels, device=x.device, dtype=x.dtype)
        b = bias if bias is not None else torch.zeros(module.num_channels, device=x.device, dtype=x.dtype)
        return F.group_norm(x, module.num_groups, w, b, module.eps)
    if isinstance(module, torch.nn.LayerNorm):
        shape = module.normalized_shape
        w = weight if weight is not None else torch.zeros(shape, device=x.device, dtype=x.dtype)
        b = bias if bias is not None else torch.zeros(shape, device=x.device, dtype=x.dtype)
        return F.layer_norm(x, shape, w, b, module.eps)
    raise SelfNPOError(f"batched_lowrank cannot apply a weight change to {type(module).__name__} "
                       f"({delta.module_path}); use residency 'separate'")


def check_supported(module, delta: LayerDelta) -> None:
    if isinstance(module, _CONV):
        if getattr(module, "padding_mode", "zeros") != "zeros":
            raise SelfNPOError(f"{delta.module_path}: padding mode {module.padding_mode} is not supported in batched_lowrank")
        if delta.up is not None and module.groups != 1:
            raise SelfNPOError(f"{delta.module_path}: grouped convolution with a low-rank change; use 'separate'")
    elif not isinstance(module, (torch.nn.Linear, torch.nn.GroupNorm, torch.nn.LayerNorm)):
        raise SelfNPOError(f"batched_lowrank cannot apply a weight change to {type(module).__name__} "
                           f"({delta.module_path}); use residency 'separate'")


class NegativeRowsHooks:
    """Installs the forward hooks for one forward pass and counts what they did."""

    def __init__(self, deltas: dict[str, LayerDelta], rows: list[slice], batch: int, measure: bool = True):
        self.deltas = deltas
        self.rows = rows
        self.batch = batch
        self.measure = measure  # sum a few |changes| for the guard (a device sync): first forward only
        self.fired = 0
        self.changed = 0.0

    def hook_for(self, delta: LayerDelta):
        def hook(module, inputs, output):
            x = inputs[0] if inputs else None
            if x is None or x.shape[0] != self.batch or output.shape[0] != self.batch:
                raise SelfNPOError(
                    f"batched_lowrank: layer {delta.module_path} saw a batch of "
                    f"{None if x is None else x.shape[0]} rows, expected {self.batch}; this model "
                    "reshapes its batch inside, use residency 'separate'")
            for rows in self.rows:
                d = _layer_output_delta(module, delta, x[rows])
                output[rows] += d.to(output.dtype)
                if self.measure and self.fired < 8:  # a few magnitudes are enough for the guard
                    self.changed += float(torch.as_tensor(d).abs().sum())
            self.fired += 1
            return output
        return hook

    def install(self, base_model) -> list:
        handles = []
        try:
            for path, delta in self.deltas.items():
                module = comfy.utils.get_attr(base_model, path)
                check_supported(module, delta)
                handles.append(module.register_forward_hook(self.hook_for(delta)))
        except Exception:
            for h in handles:
                h.remove()
            raise
        return handles


def negative_row_slices(cond_or_uncond, batch: int, slots) -> list[slice]:
    """The row ranges of a batch whose chunk belongs to one of `slots` (ComfyUI concatenates one
    equally sized chunk per entry of `cond_or_uncond`)."""
    n = len(cond_or_uncond)
    if n == 0 or batch % n or not slots:
        return []
    chunk = batch // n
    slices, start = [], None
    for i, slot in enumerate(list(cond_or_uncond) + [None]):
        inside = slot is not None and slot in slots
        if inside and start is None:
            start = i
        elif not inside and start is not None:
            slices.append(slice(start * chunk, i * chunk))
            start = None
    return slices
