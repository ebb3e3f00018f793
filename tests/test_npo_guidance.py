"""Self-NPO guidance equals CFG with the negative model on the uncond branch, step by step, computed
by hand on two independently built models; in both residencies, through the guider and KSampler."""
from __future__ import annotations

import pytest
import torch

import comfy.model_management
import comfy.samplers
import nodes

from npo_setup import (CFG, StepRecorder, guider_sample, hand_cfg, ksample, predict, rel_err, setup)
from comfy_selfnpo.npo import guidance
from comfy_selfnpo.npo.guidance import SelfNPOError, SelfNPOGuider, apply_self_npo, get_plan

RESIDENCIES = ("separate", "batched_lowrank")


def _run(path, s, negative_model, residency, recorder, cfg=CFG, **conds):
    model = recorder.attach(s.model)
    if path == "guider":
        guider = SelfNPOGuider(model, negative_model, residency=residency)
        return guider_sample(guider, s, cfg=cfg, **conds), guider.plan
    patched = apply_self_npo(model, negative_model, residency=residency)
    return ksample(patched, s, cfg=cfg, **conds), get_plan(patched)


@pytest.mark.parametrize("kind,path", [("sd15", "guider"), ("sd15", "ksampler"), ("sdxl", "guider"),
                                       ("sdxl", "ksampler"), ("sd2", "ksampler"), ("flow", "ksampler")])
def test_every_step_is_cfg_with_the_negative_model_on_the_uncond_branch(kind, path):
    s = setup(kind)
    negative_model = s.negative_model()
    assert negative_model.model is s.model.model  # the shared-weights case: a clone of the positive
    results = {}
    for residency in RESIDENCIES:
        recorder = StepRecorder()
        results[residency], plan = _run(path, s, negative_model, residency, recorder)
        assert plan.residency == residency and plan.verified
        assert len(recorder.steps) == 4 and plan.negative_calls == 4
        for step in recorder.steps:
            expected = hand_cfg(s, step)
            assert rel_err(step["denoised"], expected) < 1e-4
            # not plain CFG: the positive model on the uncond branch predicts another update x − D
            plain = hand_cfg(s, step, negative_model=s.pos_ind)
            assert rel_err(plain - step["x"], expected - step["x"]) > 1e-2
    assert torch.isfinite(results["separate"]).all()
    assert rel_err(results["batched_lowrank"], results["separate"]) < 1e-4


def test_trap_positive_clone_plus_npo_lora_gives_the_npo_result_not_plain_cfg():
    s = setup("sd15")
    negative_model = s.negative_model()
    # The trap, in this ComfyUI: load both clones and evaluate the "negative" one -> positive weights.
    comfy.model_management.load_models_gpu([s.model, negative_model])
    step = {"x": torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)), "sigma": torch.tensor([3.0])}
    naive = StepRecorder()
    ksample(naive.attach(s.model), s, steps=1)
    uncond = naive.steps[0]["uncond"]
    negative_model.model.current_patcher = negative_model
    with torch.no_grad():
        naive_neg = comfy.samplers.calc_cond_batch(negative_model.model, [uncond], step["x"], step["sigma"], {})[0]
    assert rel_err(naive_neg, predict(s.pos_ind, uncond, step["x"], step["sigma"])) < 1e-6
    assert rel_err(naive_neg, predict(s.neg_ind, uncond, step["x"], step["sigma"])) > 1e-2

    plain = ksample(s.model, s)
    for residency in ("auto",) + RESIDENCIES:
        recorder = StepRecorder()
        out = ksample(apply_self_npo(recorder.attach(s.model), negative_model, residency=residency), s)
        assert rel_err(out, plain) > 1e-2
        for step in recorder.steps:
            assert rel_err(step["denoised"], hand_cfg(s, step)) < 1e-4


def test_auto_residency_picks_batched_for_lora_and_separate_for_other_models():
    s = setup("sd15")
    negative_model = s.negative_model()
    assert get_plan(apply_self_npo(s.model, negative_model)).residency == "batched_lowrank"
    assert get_plan(apply_self_npo(s.model, s.neg_ind)).residency == "separate"  # its own module
    with pytest.raises(SelfNPOError, match="separate"):
        apply_self_npo(s.model, s.neg_ind, residency="batched_lowrank")
    with pytest.raises(ValueError, match="residency"):
        apply_self_npo(s.model, negative_model, residency="fast")


def test_an_independent_negative_model_is_used_as_it_is():
    s = setup("sdxl")
    recorder = StepRecorder()
    ksample(apply_self_npo(recorder.attach(s.model), s.neg_ind, residency="auto"), s)
    for step in recorder.steps:
        assert rel_err(step["denoised"], hand_cfg(s, step)) < 1e-4


@pytest.mark.parametrize("residency", RESIDENCIES)
def test_guard_refuses_a_negative_branch_without_the_negative_weights(residency):
    s = setup("sd15")
    with pytest.raises(SelfNPOError, match="same weights"):
        apply_self_npo(s.model, s.model.clone(), residency=residency)

    patched = apply_self_npo(s.model, s.negative_model(), residency=residency)
    plan = get_plan(patched)
    if residency == "separate":
        # the loaded negative module lost its NPO weights (what a shared module would do)
        negative_module = plan.negative.model
        negative_module.load_state_dict(s.model.model.state_dict())
    else:
        # the hooks act but the NPO change is gone on every layer
        for delta in plan.deltas.values():
            delta.up = torch.zeros_like(delta.up)
            delta._cache.clear()
    with pytest.raises(SelfNPOError, match="guard"):
        ksample(patched, s)


@pytest.mark.parametrize("residency", RESIDENCIES)
def test_cfg_one_skips_the_negative_branch(residency):
    s = setup("sd15")
    patched = apply_self_npo(s.model, s.negative_model(), residency=residency)
    out = ksample(patched, s, cfg=1.0)
    assert get_plan(patched).negative_calls == 0
    assert torch.equal(out, ksample(s.model, s, cfg=1.0))


@pytest.mark.parametrize("residency", RESIDENCIES)
def test_area_and_mask_conditioning_reach_the_negative_model(residency):
    s = setup("sdxl")
    mask = torch.zeros(1, 8, 8)
    mask[:, :, :5] = 1.0
    masked = nodes.ConditioningSetMask().append(s.encode("blurry"), mask, "default", 1.0)[0]
    area = nodes.ConditioningSetArea().append(s.encode("ugly"), 32, 32, 32, 0, 1.0)[0]
    negative = masked + area
    recorder = StepRecorder()
    patched = apply_self_npo(recorder.attach(s.model), s.negative_model(), residency=residency)
    ksample(patched, s, negative=negative)
    for step in recorder.steps:
        assert any("mask" in c for c in step["uncond"]) and any("area" in c for c in step["uncond"])
        assert rel_err(step["denoised"], hand_cfg(s, step)) < 1e-4
        # the mask and the area matter: the same prompts without them predict something else
        plain_uncond = [{k: v for k, v in c.items() if k not in ("mask", "area", "mask_strength")} for c in step["uncond"]]
        without = hand_cfg(s, dict(step, uncond=plain_uncond))
        assert rel_err(without, hand_cfg(s, step)) > 1e-3


def test_batched_lowrank_reduces_full_rank_offsets_by_svd_and_reports_the_error():
    s = setup("sd15")
    from npo_files import offset_state_dict
    from comfy_selfnpo.npo import weights

    dense_npo = weights.npo_weights_from_state_dict(offset_state_dict(s.offset, s.model))
    negative_model, report = weights.make_negative_model(s.model, dense_npo, strength=1.5)
    assert report.format == "offset"
    # the .diff offsets are exactly rank 4: rank 4 reproduces them, rank 1 does not
    exact, exact_report = guidance.lowrank_deltas(s.model, negative_model, rank=4)
    assert exact_report.svd_layers == len(s.offset.factors) and exact_report.relative_error < 1e-5
    _, coarse = guidance.lowrank_deltas(s.model, negative_model, rank=1)
    assert 0.05 < coarse.relative_error < 1 and coarse.max_relative_error >= coarse.relative_error
    recorder = StepRecorder()
    patched = apply_self_npo(recorder.attach(s.model), negative_model, residency="batched_lowrank", rank=4)
    assert get_plan(patched).lowrank.svd_layers == len(s.offset.factors)
    ksample(patched, s)
    for step in recorder.steps:
        assert rel_err(step["denoised"], hand_cfg(s, step)) < 1e-4
    # auto keeps full-rank offsets exact by giving the negative its own weights
    assert get_plan(apply_self_npo(s.model, negative_model)).residency == "separate"


def _tiny_controlnet(s):
    """A tiny ControlNet for the tiny UNet, built the way ComfyUI's loader builds one."""
    import comfy.cldm.cldm
    import comfy.controlnet
    import comfy.ops
    from comfy_selfnpo import tiny_models

    config = dict(s.model.model.model_config.unet_config)
    config.pop("out_channels")
    config.update(hint_channels=3, operations=comfy.ops.disable_weight_init, dtype=torch.float32,
                  device=torch.device("cpu"))
    control_model = tiny_models.seeded_init_(comfy.cldm.cldm.ControlNet(**config), seed=9)
    with torch.no_grad():  # zero-initialised output convs in real training; random here so it acts
        for p in control_model.zero_convs.parameters():
            p.mul_(3.0)
    return comfy.controlnet.ControlNet(control_model, load_device=torch.device("cpu"))  # pixel hints


@pytest.mark.parametrize("residency", RESIDENCIES)
def test_controlnet_reaches_the_negative_model(residency):
    s = setup("sd15")
    control = _tiny_controlnet(s)
    hint = torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(4))
    positive, negative = nodes.ControlNetApplyAdvanced().apply_controlnet(s.positive, s.negative, control, hint,
                                                                          0.8, 0.0, 1.0)
    checks = []

    def hand_inside_the_step(args):
        # the control object is live only during sampling: compute the hand values right here
        step = {"x": args["input"], "sigma": args["sigma"], "cond": args["cond"], "uncond": args["uncond"]}
        assert all("control" in c for c in step["uncond"])
        expected = hand_cfg(s, step)
        without = hand_cfg(s, dict(step, uncond=[{k: v for k, v in c.items() if k != "control"} for c in step["uncond"]]))
        checks.append((rel_err(args["denoised"], expected), rel_err(without - step["x"], expected - step["x"])))
        return args["denoised"]

    model = s.model.clone()
    model.set_model_sampler_post_cfg_function(hand_inside_the_step)
    ksample(apply_self_npo(model, s.negative_model(), residency=residency), s, positive=positive, negative=negative)
    assert len(checks) == 4
    for err, control_effect in checks:
        assert err < 1e-4
        assert control_effect > 1e-3  # the ControlNet really changes the negative branch


def test_guider_and_apply_share_one_separate_copy_and_applying_twice_is_refused():
    s = setup("sd15")
    negative_model = s.negative_model()
    a = apply_self_npo(s.model, negative_model, residency="separate")
    b = SelfNPOGuider(s.model, negative_model, residency="separate")
    assert get_plan(a).negative.model is b.plan.negative.model  # one extra model of memory, not two
    assert get_plan(a).negative.model is not s.model.model
    # a second negative model would silently replace the first (issue 18): refused, by the guider too
    with pytest.raises(SelfNPOError, match="already guides with a Self-NPO negative model"):
        apply_self_npo(a, negative_model, residency="batched_lowrank")
    with pytest.raises(SelfNPOError, match="already guides with a Self-NPO negative model"):
        SelfNPOGuider(a, negative_model)


def test_separate_negative_is_loaded_by_comfyui_together_with_the_positive():
    s = setup("sdxl")
    patched = apply_self_npo(s.model, s.negative_model(), residency="separate")
    seen = []

    def loaded_modules(args):
        seen.append({id(m.model.model) for m in comfy.model_management.current_loaded_models if m.model is not None})
        return args["denoised"]

    patched.set_model_sampler_post_cfg_function(loaded_modules)
    ksample(patched, s)
    negative_module = get_plan(patched).negative.model
    assert seen and all({id(s.model.model), id(negative_module)} <= ids for ids in seen)


def test_batched_and_separate_agree_on_a_batch_of_two_latents():
    s = setup("sd15")
    negative_model = s.negative_model()
    import nodes as comfy_nodes

    outs = {}
    for residency in RESIDENCIES:
        (out,) = comfy_nodes.common_ksampler(apply_self_npo(s.model, negative_model, residency=residency), 3, 4, CFG,
                                             "euler", "normal", s.positive, s.negative,
                                             {"samples": torch.zeros(2, 4, 8, 8)})
        outs[residency] = out["samples"]
    assert outs["separate"].shape[0] == 2 and rel_err(outs["separate"][0], outs["separate"][1]) > 1e-3
    assert rel_err(outs["batched_lowrank"], outs["separate"]) < 1e-4
