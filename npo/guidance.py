"""Self-NPO guidance: CFG whose negative branch runs on the Self-NPO negative model.

  npo (the paper)   D = D_neg(x, c_neg) + g·(D_pos(x, c) − D_neg(x, c_neg))
  autoguidance      D = D_neg(x, c) + g·(D_pos(x, c) − D_neg(x, c))
  cfg+autoguidance  D = D_pos(x, c_neg) + g·(D_pos(x, c) − D_pos(x, c_neg)) + g_ag·(D_pos(x, c) − D_neg(x, c))

(`modes.py`), optionally only inside a start_percent–end_percent interval of the run: outside it a
step is plain CFG on the positive model and costs nothing extra.

Built on `model_options["sampler_calc_cond_batch_function"]`: ComfyUI's `sampling_function` asks it
for the cond and uncond predictions and then runs every pre-CFG, CFG and post-CFG patch as usual, so
one MODEL→MODEL patch (`apply_self_npo`) serves KSampler and every sampler node, and
`SelfNPOGuider` is just a CFGGuider over the patched model.

The shared-weights trap: a negative model made as a clone of the positive one shares its nn.Module
with it, and ComfyUI keeps one patch set live, so sending a branch to "the other clone" silently
runs the positive weights. Two residencies avoid it (`residency.py`): `separate` (the negative gets
its own weights) and `batched_lowrank` (one copy of the weights, the NPO change added to the rows
the negative model computes). A guard runs once per sampling run and raises instead of silently
running plain CFG. A run in which the negative model was never evaluated logs one warning, and so
does a run on a guidance-distilled model (Flux-dev, HunyuanVideo), which has no real unconditional
branch for Self-NPO to act through.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

import comfy.patcher_extension
import comfy.samplers

from .errors import SelfNPOError
from .lowrank import LayerDelta, LowRankReport, differing_keys, exact_lora_change, lowrank_deltas  # noqa: F401
from .modes import MODES, PLAIN_CFG, Interval, make_mode, sigma_inside
from .residency import KEY, BatchedLowRankResidency, SeparateResidency
from .separate import guard_keys, materialize_independent_copy, separate_negative_for  # noqa: F401

log = logging.getLogger("comfy_selfnpo")

RESIDENCIES = ("auto", "separate", "batched_lowrank")
PLAN_ATTACHMENT = "self_npo_plan"
_CALLBACKS = comfy.patcher_extension.CallbacksMP

__all__ = ["GUIDANCE_DISTILLED_WHY", "MODES", "RESIDENCIES", "KEY", "SelfNPOError", "SelfNPOPlan", "SelfNPOGuider",
           "apply_self_npo", "get_plan", "is_guidance_distilled", "lowrank_deltas"]


@dataclass
class RunRecord:
    """What one sampling run did, for its warning (`run_warning`) and for tests."""
    steps: int = 0
    inside_steps: int = 0    # steps inside the interval
    negative_calls: int = 0  # steps that evaluated the negative model


GUIDANCE_DISTILLED_WHY = (
    "this model is guidance-distilled (the guidance strength is an input of the model, `guidance_embed`, as in "
    "Flux-dev and HunyuanVideo): it is made to be sampled at cfg 1 and has no real unconditional branch. Self-NPO "
    "needs one: the negative model takes the place of the model's unconditional prediction, and CFG pushes the "
    "sample away from it. Use a model trained with classifier-free guidance (e.g. Chroma instead of Flux-dev, "
    "HunyuanVideo 1.5 instead of HunyuanVideo)")


def is_guidance_distilled(model) -> bool:
    """Whether a MODEL embeds its guidance strength instead of using CFG (Flux-dev, HunyuanVideo v1)."""
    return bool(model.model.model_config.unet_config.get("guidance_embed", False))


def run_warning(run: RunRecord, mode, interval: Interval, distilled: bool) -> str | None:
    """The one warning a sampling run deserves, or None: a guidance-distilled model under a mode that
    acts through CFG's unconditional branch, or a run that never evaluated the negative model."""
    if run.steps == 0:
        return None
    if distilled and mode.uses_uncond_branch and run.inside_steps:
        outcome = ("ComfyUI never evaluated the negative model (cfg 1): the result is plain sampling with the "
                   "positive model" if not run.negative_calls else
                   "the unconditional branch ran at cfg > 1, where this model's predictions are not what it was "
                   "trained for")
        return (f"Self-NPO mode {mode.name}: {GUIDANCE_DISTILLED_WHY}. In this sampling run of {run.steps} steps "
                f"{outcome}. (Mode cfg+autoguidance uses the negative model on the prompt instead, at any cfg.)")
    if run.negative_calls:
        return None
    if run.inside_steps == 0:
        reason = f"no step fell inside start_percent–end_percent ({interval.describe()})"
    elif mode is PLAIN_CFG:
        reason = "mode cfg+autoguidance with autoguidance_scale 0 is plain CFG"
    else:
        reason = (f"at cfg 1 ComfyUI skips the negative branch, through which mode {mode.name} acts "
                  "(use cfg > 1, or mode cfg+autoguidance, which adds its term at any cfg)")
    return (f"Self-NPO: the negative model was not evaluated in this sampling run of {run.steps} steps: {reason}. "
            "The result is plain sampling with the positive model.")


class SelfNPOPlan:
    """The guidance chosen once at apply time (residency, mode, interval) and its per-run state."""

    def __init__(self, holder, mode, interval: Interval, distilled: bool = False):
        self.holder = holder  # SeparateResidency or BatchedLowRankResidency
        self.mode = mode
        self.interval = interval
        self.distilled = distilled  # the sampled model is guidance-distilled (`is_guidance_distilled`)
        self.run = RunRecord()
        self._bounds = None   # the interval in σ, from the sampled model's model_sampling

    # what callers and tests read
    residency = property(lambda self: self.holder.name)
    verified = property(lambda self: self.holder.verified)
    negative_calls = property(lambda self: self.run.negative_calls)
    negative = property(lambda self: getattr(self.holder, "negative", None))
    deltas = property(lambda self: getattr(self.holder, "deltas", {}))
    lowrank = property(lambda self: getattr(self.holder, "lowrank", None))

    def describe(self) -> str:
        interval = "" if self.interval.whole_run else f", interval {self.interval.describe()}"
        return f"Self-NPO mode {self.mode.name}{interval}, {self.holder.describe()}"

    # --- callbacks on the patched MODEL -------------------------------------------------------
    def on_pre_run(self, patcher) -> None:
        """Start of a sampling run: the models are loaded."""
        if not getattr(patcher, "is_multigpu_base_clone", False):  # newer core: once per run, not per GPU
            self.run = RunRecord()
            self._bounds = None
        self.holder.start_run(patcher)

    def on_cleanup(self, patcher) -> None:
        """End of a sampling run: one warning when the negative model did not act as the mode means."""
        if getattr(patcher, "is_multigpu_base_clone", False):
            return
        message = run_warning(self.run, self.mode, self.interval, self.distilled)
        if message:
            log.warning(message)

    # --- sampler_calc_cond_batch_function ---------------------------------------------------
    def calc_cond_batch(self, args):
        conds, x, sigma = args["conds"], args["input"], args["sigma"]
        model, model_options = args["model"], args["model_options"]
        cond, uncond = conds[0], (conds[1] if len(conds) > 1 else None)
        mode = self._step_mode(model, sigma)
        positive_conds, negative_conds = mode.cond_lists(cond, uncond)
        self.run.steps += 1
        self.run.inside_steps += mode is self.mode
        self.run.negative_calls += any(c is not None for c in negative_conds)
        out = self.holder.predict(model, positive_conds, negative_conds, x, sigma, model_options)
        return mode.to_cfg(out, uncond is not None)

    def _step_mode(self, model, sigma):
        if self.interval.whole_run:
            return self.mode
        if self._bounds is None:  # the model_sampling in use, with a ModelSampling* node's override
            self._bounds = self.interval.sigma_bounds(model.model_sampling)
        return self.mode if sigma_inside(sigma, self._bounds) else PLAIN_CFG


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
    if model_compiler_active(positive.load_device):
        log.info("Self-NPO: ComfyUI's model compiler is on, residency auto picks separate (the batched "
                 "residency's per-step forward hooks change the allocations the compiler records)")
        return "separate"
    # exact low-rank changes ride along in the batch; anything else gets its own weights
    for key in differing_keys(positive, negative):
        if not key.endswith(".weight") or not exact_lora_change(positive, negative, key):
            return "separate"
    return "batched_lowrank"


_SAME_WEIGHTS = "the negative model has the same weights as the positive model; Self-NPO guidance would be plain CFG"


def _separate(positive, negative, rank):
    copy = separate_negative_for(negative) if positive.is_clone(negative) else negative
    guard = guard_keys(positive, copy, negative)
    if not guard:
        raise SelfNPOError(_SAME_WEIGHTS)
    return SeparateResidency(copy, guard)


def _batched_lowrank(positive, negative, rank):
    deltas, report = lowrank_deltas(positive, negative, rank=rank)
    if not deltas:
        raise SelfNPOError(_SAME_WEIGHTS)
    return BatchedLowRankResidency(deltas, report)


_RESIDENCY_FACTORIES = {"separate": _separate, "batched_lowrank": _batched_lowrank}


def model_compiler_active(device) -> bool:
    """Whether newer ComfyUI's "Comfy model compiler" (v0.38+: on by default with dynamic VRAM on
    CUDA, off with --disable-comfy-compiler) records this device's allocations: core's own test,
    `comfy.model_prefetch.malloc_graph_enabled`. Cores without it (the pin) have no compiler."""
    try:
        import comfy.model_prefetch as prefetch
    except ImportError:
        return False
    enabled = getattr(prefetch, "malloc_graph_enabled", None)
    return bool(enabled(device)) if enabled is not None else False


_APPLIED_TWICE = (
    "this model already guides with a Self-NPO negative model (an 'Apply Self-NPO' earlier in the graph). "
    "Self-NPO takes one negative model; a second would silently replace the first. Connect the model from "
    "before the first 'Apply Self-NPO' (one 'Apply Self-NPO' or 'Self-NPO CFG Guider' per sampled model)")


@torch.no_grad()
def apply_self_npo(model, negative_model, residency: str = "auto", rank: int | None = None, mode: str = "npo",
                   autoguidance_scale: float = 1.0, start_percent: float = 0.0, end_percent: float = 1.0):
    """A clone of `model` whose CFG uses `negative_model` as `mode` says (one of MODES).

    residency: "separate" (the negative holds its own weights, loaded with the positive),
    "batched_lowrank" (one set of weights; the negative's change applied to its rows of the batch),
    "auto" (batched when the negative is the positive plus LoRA patches, else separate).
    rank: in batched mode, full-rank weight offsets are reduced by SVD to this rank (None: exact).
    autoguidance_scale: g_ag of mode cfg+autoguidance (unused by the other modes).
    start_percent, end_percent: the part of the run where the mode acts (ComfyUI's percent
    convention); other steps are plain CFG on the positive model."""
    if negative_model is None:
        raise ValueError("Self-NPO needs a negative model")
    if get_plan(model) is not None:
        raise SelfNPOError(_APPLIED_TWICE)
    guidance_mode = make_mode(mode, autoguidance_scale)
    interval = Interval(start_percent, end_percent)
    if model.model.model_config.unet_config != negative_model.model.model_config.unet_config:
        raise SelfNPOError("the negative model has another architecture than the positive model")
    name = _choose_residency(model, negative_model, residency)
    plan = SelfNPOPlan(_RESIDENCY_FACTORIES[name](model, negative_model, rank), guidance_mode, interval,
                       distilled=is_guidance_distilled(model))
    patched = model.clone()
    if "sampler_calc_cond_batch_function" in patched.model_options:
        log.warning("Self-NPO replaces an earlier sampler_calc_cond_batch_function patch on this model")
    plan.holder.install(patched)
    patched.add_callback_with_key(_CALLBACKS.ON_PRE_RUN, KEY, plan.on_pre_run)
    patched.add_callback_with_key(_CALLBACKS.ON_CLEANUP, KEY, plan.on_cleanup)
    patched.set_model_sampler_calc_cond_batch_function(plan.calc_cond_batch)
    patched.set_attachments(PLAN_ATTACHMENT, plan)
    log.info(plan.describe())
    return patched


def get_plan(model) -> SelfNPOPlan | None:
    return model.get_attachment(PLAN_ATTACHMENT)


class SelfNPOGuider(comfy.samplers.CFGGuider):
    """CFGGuider whose negative branch runs on the negative model (GUIDER for
    SamplerCustomAdvanced). `set_conds(positive, negative)` and `set_cfg(cfg)` as usual; the other
    arguments as in `apply_self_npo`."""

    def __init__(self, model, negative_model, residency: str = "auto", rank: int | None = None, mode: str = "npo",
                 autoguidance_scale: float = 1.0, start_percent: float = 0.0, end_percent: float = 1.0):
        super().__init__(apply_self_npo(model, negative_model, residency=residency, rank=rank, mode=mode,
                                        autoguidance_scale=autoguidance_scale, start_percent=start_percent,
                                        end_percent=end_percent))
        self.plan = get_plan(self.model_patcher)
