"""Self-NPO guidance: D = D_neg(x, c_neg) + g·(D_pos(x, c) − D_neg(x, c_neg)).

Built on `model_options["sampler_calc_cond_batch_function"]`: ComfyUI's `sampling_function` asks it
for the cond and uncond predictions and then runs every pre-CFG, CFG and post-CFG patch as usual, so
one MODEL→MODEL patch (`apply_self_npo`) serves KSampler and every sampler node, and
`SelfNPOGuider` is just a CFGGuider over the patched model.

The shared-weights trap. A negative model made as a clone of the positive one (checkpoint + NPO
LoRA) shares its nn.Module with it; ComfyUI patches weights in place and keeps only one patch set
live, so sending the uncond batch to "the other clone" silently runs plain CFG. Two residencies:

* separate: the negative gets its own module, built from the model config and a state dict with
  every patch baked in (+1 model of memory). It is registered with `set_additional_models`, so
  ComfyUI loads it together with the positive one, with memory accounting. The uncond list goes
  through ComfyUI's own `calc_cond_batch` with the negative module, so SDXL's pooled/ADM inputs,
  ControlNet, area and mask conditioning reach it as they reach the positive model.
* batched_lowrank: one copy of the weights. θ_neg − θ_pos is put in low-rank form per layer (exact
  for LoRA patches; full-rank offsets reduced by SVD to `rank`, relative error reported, or kept
  dense when rank is None) and added by forward hooks only to the rows of the batch that are
  unconditional (`transformer_options["cond_or_uncond"]`). A step costs one batched forward, like
  plain CFG. Hooks exist only while the patched model's own forward runs (an APPLY_MODEL wrapper
  installs and removes them), so other users of the shared module never see them.

A guard runs once per sampling run: separate mode compares the live weights of both modules where
the negative should differ; batched mode checks that the hooks fired on the uncond rows and changed
them. Either failure raises instead of silently running plain CFG.
"""
from __future__ import annotations

import logging
import math
import weakref
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

import comfy.model_patcher
import comfy.patcher_extension
import comfy.samplers
import comfy.utils

from .weights import NEGATIVE_ATTACHMENT, effective_weight, unpatched_weight

log = logging.getLogger("comfy_selfnpo")

RESIDENCIES = ("auto", "separate", "batched_lowrank")
KEY = "self_npo"  # key of our wrapper, callback and additional model on the patched MODEL
GUARD_KEYS = 4    # how many of the most-changed weights the separate-mode guard compares


class SelfNPOError(RuntimeError):
    """Self-NPO cannot guarantee the negative branch uses the negative weights."""


# ----------------------------------------------------------------------------------------------
# weight differences between the negative and the positive model

def _differing_keys(positive, negative) -> list[str]:
    """Keys whose weights the clone `negative` changes relative to `positive` (same module)."""
    keys = set(positive.patches) | set(negative.patches)
    return sorted(k for k in keys if positive.patches.get(k, []) != negative.patches.get(k, []))


def _exact_lora_tail(pos_list, neg_list):
    """The extra patches of `neg_list` when they are plain LoRAs added on top of `pos_list`:
    [(up (out, r), down (r, in…), scale)], else None (then the difference is taken numerically)."""
    import comfy.weight_adapter as weight_adapter

    if neg_list[: len(pos_list)] != pos_list or len(neg_list) == len(pos_list):
        return None
    factors = []
    for strength, adapter, strength_model, offset, function in neg_list[len(pos_list):]:
        if not isinstance(adapter, weight_adapter.LoRAAdapter):
            return None
        up, down, alpha, mid, dora_scale, reshape = adapter.weights
        if strength_model != 1.0 or offset is not None or function is not None \
                or mid is not None or dora_scale is not None or reshape is not None:
            return None
        scale = (alpha / down.shape[0]) if alpha is not None else 1.0
        factors.append((up, down, float(strength) * float(scale)))
    return factors


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
        key = (device, dtype)
        if key not in self._cache:
            cast = (lambda t: None if t is None else t.to(device=device, dtype=dtype))
            self._cache.clear()  # one device/dtype at a time
            self._cache[key] = (cast(self.up), cast(self.down), cast(self.weight), cast(self.bias))
        return self._cache[key]

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
    for key in _differing_keys(positive, negative):
        module_path, _, param = key.rpartition(".")
        if param not in ("weight", "bias"):
            raise SelfNPOError(f"batched_lowrank cannot apply a change to {key}; use residency 'separate'")
        entry = deltas.setdefault(module_path, LayerDelta(module_path))
        pos_list = positive.patches.get(key, [])
        neg_list = negative.patches.get(key, [])
        factors = _exact_lora_tail(pos_list, neg_list) if param == "weight" else None
        if factors:
            ups = [up.flatten(1).float() * s for up, _down, s in factors]
            kernel = factors[0][1].shape[1:]
            if any(d.shape[1:] != kernel for _u, d, _s in factors):
                factors = None
            else:
                entry.up = torch.cat(ups, dim=1).to(cpu)
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


# ----------------------------------------------------------------------------------------------
# batched low-rank: forward hooks on the uncond rows

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


def _check_supported(module, delta: LayerDelta) -> None:
    if isinstance(module, _CONV):
        if getattr(module, "padding_mode", "zeros") != "zeros":
            raise SelfNPOError(f"{delta.module_path}: padding mode {module.padding_mode} is not supported in batched_lowrank")
        if delta.up is not None and module.groups != 1:
            raise SelfNPOError(f"{delta.module_path}: grouped convolution with a low-rank change; use 'separate'")
    elif not isinstance(module, (torch.nn.Linear, torch.nn.GroupNorm, torch.nn.LayerNorm)):
        raise SelfNPOError(f"batched_lowrank cannot apply a weight change to {type(module).__name__} "
                           f"({delta.module_path}); use residency 'separate'")


class _UncondRowsHooks:
    """Installs the forward hooks for one forward pass and counts what they did."""

    def __init__(self, deltas: dict[str, LayerDelta], measure: bool = True):
        self.deltas = deltas
        self.measure = measure  # sum a few |changes| for the guard (a device sync): first forward only
        self.rows: list[slice] = []
        self.batch = 0
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
                _check_supported(module, delta)
                handles.append(module.register_forward_hook(self.hook_for(delta)))
        except Exception:
            for h in handles:
                h.remove()
            raise
        return handles


def _uncond_slices(cond_or_uncond, batch: int) -> list[slice]:
    n = len(cond_or_uncond)
    if n == 0 or batch % n:
        return []
    chunk = batch // n
    slices, start = [], None
    for i, kind in enumerate(list(cond_or_uncond) + [None]):
        if kind == 1 and start is None:
            start = i
        elif kind != 1 and start is not None:
            slices.append(slice(start * chunk, i * chunk))
            start = None
    return slices


# ----------------------------------------------------------------------------------------------
# separate residency: an independent module with the negative's patches baked in

# negative ModelPatcher -> (its patches_uuid, independent copy): the guider and the apply node fed the
# same negative model share one copy instead of holding two
_SEPARATE_COPIES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def separate_negative_for(negative):
    cached = _SEPARATE_COPIES.get(negative)
    if cached is not None and cached[0] == negative.patches_uuid:
        return cached[1].clone()
    copy = materialize_independent_copy(negative)
    _SEPARATE_COPIES[negative] = (negative.patches_uuid, copy)
    return copy.clone()


@torch.no_grad()
def materialize_independent_copy(patcher):
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
    copy = type(patcher)(new, load_device=patcher.load_device, offload_device=patcher.offload_device)
    copy.object_patches = dict(patcher.object_patches)  # e.g. a ModelSampling override
    return copy


def _live_weight(base_model, key: str) -> torch.Tensor:
    """The weight a forward pass of the loaded module would use right now."""
    path, _, param = key.rpartition(".")
    module = comfy.utils.get_attr(base_model, path)
    weight = getattr(module, param)
    functions = getattr(module, f"{param}_function", None) or []
    weight = weight.detach().to(torch.float32, copy=True)
    for fn in functions:  # lowvram: patches applied at cast time
        weight = fn(weight)
    return weight


# ----------------------------------------------------------------------------------------------
# the plan and the sampling hooks

@dataclass
class SelfNPOPlan:
    residency: str
    negative: object = None                 # separate: the independent negative ModelPatcher
    deltas: dict = field(default_factory=dict)   # batched: module path -> LayerDelta
    guard: dict = field(default_factory=dict)    # separate: key -> expected θ_neg − θ_pos (cpu, f32)
    lowrank: LowRankReport | None = None
    # per sampling run
    verified: bool = False
    negative_calls: int = 0

    def describe(self) -> str:
        if self.residency == "separate":
            return "Self-NPO residency separate (negative model holds its own weights)"
        return f"Self-NPO residency batched_lowrank ({self.lowrank.summary()})"

    # --- callbacks -------------------------------------------------------------------------
    def on_pre_run(self, patcher) -> None:
        """Start of a sampling run: models are loaded. Set the negative up and run the guard."""
        self.verified = False
        self.negative_calls = 0
        if self.residency != "separate":
            return
        negatives = patcher.get_additional_models_with_key(KEY)
        if not negatives:
            raise SelfNPOError("the Self-NPO negative model was not registered with the sampled model")
        negative = negatives[0]
        negative.pre_run()  # sets current_patcher on its module, which calc_cond_batch needs
        self._run_separate_guard(patcher, negative)

    def _run_separate_guard(self, positive, negative) -> None:
        if negative.model is positive.model:
            raise SelfNPOError("the negative model shares its weights with the positive model; "
                               "Self-NPO would silently run plain CFG")
        for key, expected in self.guard.items():
            try:
                live = _live_weight(negative.model, key).cpu() - _live_weight(positive.model, key).cpu()
            except Exception as exc:  # e.g. weights streamed on demand by a dynamic memory manager
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
        self.verified = True

    # --- APPLY_MODEL wrapper (batched) ------------------------------------------------------
    def apply_model_wrapper(self, executor, x, t, c_concat=None, c_crossattn=None, control=None,
                            transformer_options={}, **kwargs):
        rows = _uncond_slices(transformer_options.get("cond_or_uncond", []), x.shape[0])
        if not rows:
            return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)
        hooks = _UncondRowsHooks(self.deltas, measure=not self.verified)
        hooks.rows, hooks.batch = rows, x.shape[0]
        handles = hooks.install(executor.class_obj)
        try:
            out = executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)
        finally:
            for h in handles:
                h.remove()
        self.negative_calls += 1
        if not self.verified:
            if hooks.fired == 0 or not hooks.changed > 0:
                raise SelfNPOError(
                    f"Self-NPO guard: the negative branch's weight changes did not act (hooks fired on "
                    f"{hooks.fired} of {len(self.deltas)} layers); refusing to run plain CFG. "
                    "Use residency 'separate'.")
            if hooks.fired < len(self.deltas):
                log.warning("Self-NPO: only %d of the %d layers the negative model changes ran in this "
                            "forward pass (another patch skips layers?)", hooks.fired, len(self.deltas))
            self.verified = True
        return out

    # --- sampler_calc_cond_batch_function ---------------------------------------------------
    def calc_cond_batch(self, args):
        conds, x, sigma = args["conds"], args["input"], args["sigma"]
        model, model_options = args["model"], args["model_options"]
        has_uncond = len(conds) > 1 and conds[1] is not None
        if self.residency != "separate" or not has_uncond:
            # batched: the APPLY_MODEL wrapper changes the uncond rows; cfg = 1: no uncond at all
            return comfy.samplers.calc_cond_batch(model, conds, x, sigma, model_options)
        negative = model.current_patcher.get_additional_models_with_key(KEY)[0]
        positive_conds = [c if i != 1 else None for i, c in enumerate(conds)]
        negative_conds = [None, conds[1]]  # keep index 1: cond_or_uncond marks the rows as uncond
        out = comfy.samplers.calc_cond_batch(model, positive_conds, x, sigma, model_options)
        out_neg = comfy.samplers.calc_cond_batch(negative.model, negative_conds, x, sigma, model_options)
        self.negative_calls += 1
        out[1] = out_neg[1]
        return out


def _choose_residency(positive, negative, residency: str) -> str:
    if residency not in RESIDENCIES:
        raise ValueError(f"residency must be one of {RESIDENCIES}, not {residency!r}")
    shares = positive.is_clone(negative)
    if residency == "batched_lowrank" and not shares:
        raise SelfNPOError("batched_lowrank needs the negative model to be the positive model plus "
                           "patches (as 'Self-NPO Negative Model' makes it); this negative is a "
                           "different model: use residency 'separate'")
    if residency != "auto":
        return residency
    if not shares:
        return "separate"
    # exact low-rank changes ride along in the batch; anything else gets its own weights
    for key in _differing_keys(positive, negative):
        pos_list, neg_list = positive.patches.get(key, []), negative.patches.get(key, [])
        if not key.endswith(".weight") or not _exact_lora_tail(pos_list, neg_list):
            return "separate"
    return "batched_lowrank"


def _separate_guard_keys(positive, negative_copy, negative) -> dict:
    """The few weights where θ_neg − θ_pos is largest, with that expected difference."""
    info = negative.get_attachment(NEGATIVE_ATTACHMENT) if hasattr(negative, "get_attachment") else None
    if positive.is_clone(negative):
        keys = _differing_keys(positive, negative)
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


@torch.no_grad()
def apply_self_npo(model, negative_model, residency: str = "auto", rank: int | None = None):
    """A clone of `model` whose CFG uses `negative_model` for the negative/unconditional branch.

    residency: "separate" (the negative holds its own weights, loaded with the positive),
    "batched_lowrank" (one set of weights; the negative's change applied to the uncond rows),
    "auto" (batched when the negative is the positive plus LoRA patches, else separate).
    rank: in batched mode, full-rank weight offsets are reduced by SVD to this rank (None: exact)."""
    if negative_model is None:
        raise ValueError("Self-NPO needs a negative model")
    if model.model.model_config.unet_config != negative_model.model.model_config.unet_config:
        raise SelfNPOError("the negative model has another architecture than the positive model")
    mode = _choose_residency(model, negative_model, residency)
    plan = SelfNPOPlan(residency=mode)
    patched = model.clone()
    # applying Self-NPO again replaces the earlier application instead of stacking on it
    patched.remove_wrappers_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, KEY)
    patched.remove_callbacks_with_key(comfy.patcher_extension.CallbacksMP.ON_PRE_RUN, KEY)
    patched.remove_additional_models(KEY)
    if get_plan(patched) is not None:
        patched.model_options.pop("sampler_calc_cond_batch_function", None)
    if "sampler_calc_cond_batch_function" in patched.model_options:
        log.warning("Self-NPO replaces an earlier sampler_calc_cond_batch_function patch on this model")
    if mode == "separate":
        negative = negative_model
        if model.is_clone(negative_model):
            negative = separate_negative_for(negative_model)
        plan.guard = _separate_guard_keys(model, negative, negative_model)
        if not plan.guard:
            raise SelfNPOError("the negative model has the same weights as the positive model; "
                               "Self-NPO guidance would be plain CFG")
        plan.negative = negative
        patched.set_additional_models(KEY, [negative])
    else:
        plan.deltas, plan.lowrank = lowrank_deltas(model, negative_model, rank=rank)
        if not plan.deltas:
            raise SelfNPOError("the negative model has the same weights as the positive model; "
                               "Self-NPO guidance would be plain CFG")
        for path, delta in plan.deltas.items():
            _check_supported(comfy.utils.get_attr(model.model, path), delta)
        patched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, KEY, plan.apply_model_wrapper)
    patched.add_callback_with_key(comfy.patcher_extension.CallbacksMP.ON_PRE_RUN, KEY, plan.on_pre_run)
    patched.set_model_sampler_calc_cond_batch_function(plan.calc_cond_batch)
    patched.set_attachments(PLAN_ATTACHMENT, plan)
    log.info(plan.describe())
    return patched


PLAN_ATTACHMENT = "self_npo_plan"


def get_plan(model) -> SelfNPOPlan | None:
    return model.get_attachment(PLAN_ATTACHMENT)


class SelfNPOGuider(comfy.samplers.CFGGuider):
    """CFGGuider whose negative branch runs on the negative model (GUIDER for
    SamplerCustomAdvanced). `set_conds(positive, negative)` and `set_cfg(cfg)` as usual."""

    def __init__(self, model, negative_model, residency: str = "auto", rank: int | None = None):
        super().__init__(apply_self_npo(model, negative_model, residency=residency, rank=rank))
        self.plan = get_plan(self.model_patcher)
