"""Where the negative model's weights live and how one step's predictions are computed with them.

A residency takes the step's cond lists (for the positive and for the negative model, indexed by
slot: see `modes.py`) and returns the predictions by slot:

* SeparateResidency: the negative holds its own weights (`separate.py`), registered on the patched
  MODEL with `set_additional_models` so ComfyUI loads it with the positive one, with memory
  accounting. Its conds go through ComfyUI's own `calc_cond_batch` on the negative module, so
  SDXL's pooled/ADM inputs, ControlNet, area and mask conditioning reach it as they reach the
  positive model. Two forwards per step (positive, negative).
* BatchedLowRankResidency: one copy of the weights; θ_neg − θ_pos is added by forward hooks to the
  rows of the negative slots (`lowrank.py`). All slots go into one `calc_cond_batch`, so a step
  costs one batched forward, like plain CFG. Hooks exist only while the patched model's own forward
  runs for a step that asked for negative rows (an APPLY_MODEL wrapper installs and removes them),
  so other users of the shared module, and plain-CFG steps, never see them.
"""
from __future__ import annotations

import logging

import comfy.patcher_extension
import comfy.samplers
import comfy.utils

from .errors import SelfNPOError
from .lowrank import LowRankReport, NegativeRowsHooks, check_supported, negative_row_slices
from .separate import LaterPatches, check_live_weights, negative_model_options

log = logging.getLogger("comfy_selfnpo")

KEY = "self_npo"  # key of our wrapper, callbacks and additional model on the patched MODEL
NEGATIVE_SLOTS = "self_npo_negative_slots"  # transformer_options entry: slots the negative model computes


def _evaluated(conds) -> bool:
    return any(c is not None for c in conds)


class SeparateResidency:
    name = "separate"

    def __init__(self, negative, guard: dict):
        self.negative = negative  # the independent negative ModelPatcher
        self.guard = guard        # key -> expected θ_neg − θ_pos (cpu, f32)
        self.verified = False
        self.applied_to = None    # LaterPatches: what the positive carried at apply time

    def describe(self) -> str:
        return "residency separate (the negative model holds its own weights)"

    def install(self, patched) -> None:
        patched.set_additional_models(KEY, [self.negative])
        self.applied_to = LaterPatches(patched)

    def start_run(self, patcher) -> None:
        """Models are loaded: set the negative up and check its live weights."""
        self.verified = False
        if not getattr(patcher, "is_multigpu_base_clone", False):  # per-GPU copies: core's, checked once
            self.applied_to.check(patcher)
        negatives = patcher.get_additional_models_with_key(KEY)
        if not negatives:
            raise SelfNPOError("the Self-NPO negative model was not registered with the sampled model")
        negatives[0].pre_run()  # sets current_patcher on its module, which calc_cond_batch needs
        check_live_weights(patcher, negatives[0], self.guard)
        self.verified = True

    def predict(self, model, positive_conds, negative_conds, x, sigma, model_options) -> list:
        out = comfy.samplers.calc_cond_batch(model, positive_conds, x, sigma, model_options)
        if _evaluated(negative_conds):
            negative = model.current_patcher.get_additional_models_with_key(KEY)[0]
            out_neg = comfy.samplers.calc_cond_batch(negative.model, negative_conds, x, sigma,
                                                     negative_model_options(model_options, KEY))
            out = [n if c is not None else o for o, n, c in zip(out, out_neg, negative_conds)]
        return out


class BatchedLowRankResidency:
    name = "batched_lowrank"

    def __init__(self, deltas: dict, report: LowRankReport):
        self.deltas = deltas  # module path -> LayerDelta
        self.lowrank = report
        self.verified = False

    def describe(self) -> str:
        return f"residency batched_lowrank ({self.lowrank.summary()})"

    def install(self, patched) -> None:
        for path, delta in self.deltas.items():
            check_supported(comfy.utils.get_attr(patched.model, path), delta)
        patched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, KEY, self.apply_model_wrapper)

    def start_run(self, patcher) -> None:
        self.verified = False

    def predict(self, model, positive_conds, negative_conds, x, sigma, model_options) -> list:
        merged = [n if n is not None else p for p, n in zip(positive_conds, negative_conds)]
        slots = tuple(i for i, c in enumerate(negative_conds) if c is not None)
        if slots:
            transformer_options = {**model_options.get("transformer_options", {}), NEGATIVE_SLOTS: slots}
            model_options = {**model_options, "transformer_options": transformer_options}
        return comfy.samplers.calc_cond_batch(model, merged, x, sigma, model_options)

    def apply_model_wrapper(self, executor, x, t, c_concat=None, c_crossattn=None, control=None,
                            transformer_options={}, **kwargs):
        rows = negative_row_slices(transformer_options.get("cond_or_uncond", []), x.shape[0],
                                   transformer_options.get(NEGATIVE_SLOTS, ()))
        if not rows:
            return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)
        hooks = NegativeRowsHooks(self.deltas, rows, x.shape[0], measure=not self.verified)
        handles = hooks.install(executor.class_obj)
        try:
            out = executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)
        finally:
            for h in handles:
                h.remove()
        if not self.verified:
            self._check_first_forward(hooks)
        return out

    def _check_first_forward(self, hooks: NegativeRowsHooks) -> None:
        if hooks.fired == 0 or not hooks.changed > 0:
            raise SelfNPOError(
                f"Self-NPO guard: the negative branch's weight changes did not act (hooks fired on "
                f"{hooks.fired} of {len(self.deltas)} layers); refusing to run plain CFG. "
                "Use residency 'separate'.")
        if hooks.fired < len(self.deltas):
            log.warning("Self-NPO: only %d of the %d layers the negative model changes ran in this "
                        "forward pass (another patch skips layers?)", hooks.fired, len(self.deltas))
        self.verified = True
