"""Guidance on the ways ComfyUI loads and splits models: the separate-mode guard reads patches that
ComfyUI applies at cast time (lowvram partial loads; dynamic VRAM in newer core), and a MultiGPU CFG
split (newer core's `model_options["multigpu_clones"]`) never sends the negative pass to the positive
model's copies. What the pinned core cannot run (dynamic VRAM on a GPU, several GPUs) is set up as
newer core leaves it, with ComfyUI's own classes, and documented in docs/compatibility.md."""
from __future__ import annotations

import pytest
import torch

import comfy.model_patcher
import comfy.patcher_extension
import comfy.sd
import comfy.utils

import npo_files
from npo_setup import StepRecorder, hand_cfg, ksample, rel_err, setup
from comfy_selfnpo.npo import separate
from comfy_selfnpo.npo.errors import SelfNPOError
from comfy_selfnpo.npo.guidance import KEY, apply_self_npo, get_plan
from comfy_selfnpo.npo.weights import effective_weight, make_negative_model, npo_weights_from_state_dict

CPU = torch.device("cpu")


def _positive_with_lora_and_negative(tiny):
    """A fresh tiny SD1.5 carrying a user LoRA (ComfyUI's own LoRA loader) on the same attention
    layers the NPO LoRA changes, and its negative model: positive + NPO."""
    base = tiny.build_model("sd15", seed=3)
    user_lora = npo_files.kohya_state_dict(npo_files.make_npo_offset(base, seed=7, scale=1.0), base)
    positive, _ = comfy.sd.load_lora_for_models(base, None, user_lora, 1.0, 0.0)
    npo = npo_weights_from_state_dict(npo_files.kohya_state_dict(npo_files.make_npo_offset(base, seed=1), base))
    negative, _ = make_negative_model(positive, npo, strength=0.5)
    return positive, negative


def _guarded_modules(positive, plan):
    return [comfy.utils.get_attr(positive.model, key.rpartition(".")[0]) for key in plan.holder.guard]


def test_guard_reads_lowvram_cast_time_patches_of_a_partially_loaded_positive(tiny):
    positive, negative = _positive_with_lora_and_negative(tiny)
    plan = get_plan(apply_self_npo(positive, negative, residency="separate"))
    copy = plan.negative
    try:
        # ComfyUI's own partial load with a budget that fits no layer: every patch moves to cast time
        positive.partially_load(CPU, extra_memory=1)
        copy.partially_load(CPU, extra_memory=1)
        for module, key in zip(_guarded_modules(positive, plan), plan.holder.guard):
            assert [type(f) for f in module.weight_function] == [comfy.model_patcher.LowVramPatch]
            stored = module.weight.detach().float()
            effective = effective_weight(positive, key)
            assert rel_err(stored, effective) > 1e-2  # the user's LoRA is not in the stored weight
            # a reader of the stored weights alone would see the LoRA as part of θ_neg − θ_pos
            raw_diff = comfy.utils.get_attr(copy.model, key).detach().float() - stored
            assert float((raw_diff - plan.holder.guard[key]).norm()) > 0.25 * float(plan.holder.guard[key].norm())
            assert rel_err(separate.live_weight(positive.model, key), effective) < 1e-5
        separate.check_live_weights(positive, copy, plan.holder.guard)  # passes: no false refusal

        # and still refuses a negative module that lost its NPO change
        copy.model.load_state_dict(positive.model.state_dict())
        with pytest.raises(SelfNPOError, match="guard"):
            separate.check_live_weights(positive, copy, plan.holder.guard)
    finally:
        positive.detach()
        copy.detach()


def test_guard_reads_the_dynamic_vram_lowvram_function_of_newer_core(tiny):
    """Newer core's dynamic VRAM loader (ModelPatcherDynamic.load, which the pinned core reroutes to
    the classic patcher on a CPU) leaves each patched layer's stored weight unpatched, its patches in
    `weight_lowvram_function` (a LowVramPatch) and only weight wrappers in `weight_function`."""
    positive, negative = _positive_with_lora_and_negative(tiny)
    plan = get_plan(apply_self_npo(positive, negative, residency="separate"))
    try:
        positive.partially_load(CPU, extra_memory=1)
        for module, key in zip(_guarded_modules(positive, plan), plan.holder.guard):
            module.weight_lowvram_function = module.weight_function.pop()
            assert module.weight_function == [] and isinstance(module.weight_lowvram_function,
                                                               comfy.model_patcher.LowVramPatch)
            assert rel_err(separate.live_weight(positive.model, key), effective_weight(positive, key)) < 1e-5
        separate.check_live_weights(positive, plan.negative, plan.holder.guard)
    finally:
        for module in _guarded_modules(positive, plan):
            module.weight_lowvram_function = None
        positive.detach()


def _record_calc_cond_batch(patched):
    """Every calc_cond_batch call (through core's CALC_COND_BATCH wrapper): the module it runs and the
    MultiGPU split it was given."""
    calls = []

    def record(executor, model, conds, x, timestep, model_options):
        calls.append((model, model_options.get("multigpu_clones")))
        return executor(model, conds, x, timestep, model_options)

    patched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.CALC_COND_BATCH, "test", record)
    return calls


@pytest.mark.parametrize("copies_carry_the_negative", [True, False])
def test_a_multigpu_split_never_runs_the_negative_pass_on_the_positive_copies(copies_carry_the_negative):
    """Newer core's CFG split puts {device: the positive model's copy on it} into model_options, and
    calc_cond_batch then runs on those copies whatever model it is given. Copies made by core carry
    their own copy of the negative (additional models are copied with them): the negative pass is
    split over those; a copy without one makes the negative pass run unsplit, on the negative model."""
    s = setup("sd15")
    recorder = StepRecorder()
    patched = recorder.attach(apply_self_npo(s.model, s.negative_model(), residency="separate"))
    negative_module = get_plan(patched).negative.model
    calls = _record_calc_cond_batch(patched)
    split = {patched.load_device: patched if copies_carry_the_negative else s.model.clone()}
    patched.model_options["multigpu_clones"] = split
    ksample(patched, s)

    negative_calls = [clones for model, clones in calls if model is negative_module]
    positive_calls = [clones for model, clones in calls if model is s.model.model]
    assert len(negative_calls) == len(positive_calls) == 4
    assert all(clones.keys() == split.keys() for clones in positive_calls)  # the positive pass keeps its split
    for clones in negative_calls:
        if copies_carry_the_negative:
            assert [p.model for p in clones.values()] == [negative_module]
            assert clones[patched.load_device].get_additional_models_with_key(KEY) == []
        else:
            assert clones is None
    for step in recorder.steps:
        assert rel_err(step["denoised"], hand_cfg(s, step)) < 1e-4


def test_separate_copy_falls_back_where_core_has_no_deep_copy_and_can_be_rebuilt():
    s = setup("sd15")
    negative = s.negative_model()
    # the pinned core's clone() has no force_deepcopy: the negative's effective weights are copied
    assert separate.core_deep_copy(negative) is None
    copy = get_plan(apply_self_npo(s.model, negative, residency="separate")).negative
    # the recipe newer core calls (cached_patcher_init) to make more copies, e.g. one per GPU
    rebuilt = separate._rebuild_independent_copy(negative, disable_dynamic=True)
    assert type(rebuilt) is comfy.model_patcher.ModelPatcher
    assert len({id(s.model.model), id(copy.model), id(rebuilt.model)}) == 3
    for key in get_plan(apply_self_npo(s.model, negative, residency="separate")).holder.guard:
        expected = effective_weight(negative, key)
        assert rel_err(comfy.utils.get_attr(rebuilt.model, key).float(), expected) < 1e-6
        assert rel_err(comfy.utils.get_attr(copy.model, key).float(), expected) < 1e-6
