"""Guidance modes and the sampling interval: every step equals its mode's formula computed by hand on
two independently built models — inside the interval the mode, outside it plain CFG — in both
residencies, through KSampler and through the guider (SamplerCustomAdvanced's path)."""
from __future__ import annotations

import logging

import pytest
import torch

from npo_setup import (AG_SCALE, CFG, StepRecorder, guider_sample, hand_guided, ksample, predict, rel_err, setup)
from comfy_selfnpo.npo.guidance import MODES, SelfNPOGuider, apply_self_npo, get_plan

RESIDENCIES = ("separate", "batched_lowrank")
INTERVAL = (0.2, 0.8)  # 4 normal-scheduler steps sit at t = 999, 666, 333, 0: steps 2 and 3 inside


def _sample(path, s, negative_model, recorder, cfg=CFG, sigmas=None, **options):
    model = recorder.attach(s.model)
    if path == "guider":
        guider = SelfNPOGuider(model, negative_model, **options)
        return guider_sample(guider, s, cfg=cfg, sigmas=sigmas), guider.plan
    patched = apply_self_npo(model, negative_model, **options)
    return ksample(patched, s, cfg=cfg), get_plan(patched)


def _inside(s, step, interval) -> bool:
    """ComfyUI's convention: percent_to_sigma(end) <= σ <= percent_to_sigma(start), compared in the
    σ tensor's dtype as ComfyUI compares a conditioning's timestep range."""
    ms = s.model.get_model_object("model_sampling")
    sigma = step["sigma"][0]
    return bool(ms.percent_to_sigma(interval[1]) <= sigma <= ms.percent_to_sigma(interval[0]))


def test_modes_are_the_three_published_names():
    assert MODES == ("npo", "autoguidance", "cfg+autoguidance")


@pytest.mark.parametrize("interval", [None, INTERVAL], ids=["whole_run", "interval"])
@pytest.mark.parametrize("path", ["ksampler", "guider"])
@pytest.mark.parametrize("residency", RESIDENCIES)
@pytest.mark.parametrize("mode", MODES)
def test_every_step_equals_the_mode_formula_inside_the_interval_and_plain_cfg_outside(mode, residency, path,
                                                                                      interval):
    s = setup("sd15")
    recorder = StepRecorder()
    options = dict(residency=residency, mode=mode, autoguidance_scale=AG_SCALE)
    if interval:
        options.update(start_percent=interval[0], end_percent=interval[1])
    _, plan = _sample(path, s, s.negative_model(), recorder, **options)
    inside = [_inside(s, step, interval) if interval else True for step in recorder.steps]
    assert inside == ([False, True, True, False] if interval else [True] * 4)
    assert plan.verified and plan.residency == residency and plan.negative_calls == sum(inside)
    for step, step_inside in zip(recorder.steps, inside):
        expected = hand_guided(s, step, mode if step_inside else "plain")
        assert rel_err(step["denoised"], expected) < 1e-4
        # the mode and plain CFG predict clearly different updates x − D, so the check can tell them apart
        other = hand_guided(s, step, "plain" if step_inside else mode)
        assert rel_err(other - step["x"], expected - step["x"]) > 1e-2


@pytest.mark.parametrize("kind", ["sd15", "flow"])
def test_interval_borders_belong_to_the_interval(kind):
    """Sigmas placed exactly on percent_to_sigma(start) and percent_to_sigma(end), and just outside."""
    s = setup(kind)
    ms = s.model.get_model_object("model_sampling")
    start, end = 0.3, 0.7
    high, low = ms.percent_to_sigma(start), ms.percent_to_sigma(end)
    sigmas = torch.tensor([high * 1.02, high, (high + low) / 2, low, low * 0.98, 0.0])
    assert float(sigmas[0]) <= float(ms.sigma_max)  # a sigma the model is trained for
    for residency in RESIDENCIES:
        recorder = StepRecorder()
        _sample("guider", s, s.negative_model(), recorder, sigmas=sigmas, residency=residency,
                mode="autoguidance", start_percent=start, end_percent=end)
        assert [float(st["sigma"][0]) for st in recorder.steps] == sigmas[:-1].tolist()
        for step, step_inside in zip(recorder.steps, [False, True, True, True, False]):
            assert rel_err(step["denoised"], hand_guided(s, step, "autoguidance" if step_inside else "plain")) < 1e-4


class ForwardCounter:
    """Counts forward passes of a diffusion model and their batch sizes."""

    def __init__(self, module):
        self.batches = []
        self.handle = module.register_forward_pre_hook(lambda m, args: self.batches.append(args[0].shape[0]))

    def remove(self):
        self.handle.remove()


@pytest.mark.parametrize("mode", MODES)
def test_batched_lowrank_is_one_forward_per_step_in_every_mode(mode):
    s = setup("sd15")
    counter = ForwardCounter(s.model.model.diffusion_model)
    try:
        for interval in [(0.0, 1.0), INTERVAL]:
            counter.batches.clear()
            patched = apply_self_npo(s.model, s.negative_model(), residency="batched_lowrank", mode=mode,
                                     autoguidance_scale=AG_SCALE, start_percent=interval[0], end_percent=interval[1])
            ksample(patched, s)
            rows_inside = 3 if mode == "cfg+autoguidance" else 2  # cfg+autoguidance: c, c_neg and the negative's c
            expected = [rows_inside] * 4 if interval == (0.0, 1.0) else [2, rows_inside, rows_inside, 2]
            assert counter.batches == expected
    finally:
        counter.remove()


def test_separate_runs_the_negative_model_only_inside_the_interval():
    s = setup("sd15")
    patched = apply_self_npo(s.model, s.negative_model(), residency="separate", mode="cfg+autoguidance",
                             start_percent=INTERVAL[0], end_percent=INTERVAL[1])
    positive = ForwardCounter(s.model.model.diffusion_model)
    negative = ForwardCounter(get_plan(patched).negative.model.diffusion_model)
    try:
        ksample(patched, s)
    finally:
        positive.remove()
        negative.remove()
    assert positive.batches == [2, 2, 2, 2]  # c and c_neg in one batch, as plain CFG
    assert negative.batches == [1, 1]        # the negative's c, on the two steps inside


@pytest.mark.parametrize("residency", RESIDENCIES)
def test_cfg_one_is_the_positive_model_except_for_the_autoguidance_term(residency):
    s = setup("sd15")
    plain = ksample(s.model, s, cfg=1.0)
    for mode in MODES:
        recorder = StepRecorder()
        out, plan = _sample("ksampler", s, s.negative_model(), recorder, cfg=1.0, residency=residency, mode=mode,
                            autoguidance_scale=AG_SCALE)
        for step in recorder.steps:
            assert step["uncond"] is None
            assert rel_err(step["denoised"], hand_guided(s, step, mode, cfg=1.0)) < 1e-4
        if mode == "cfg+autoguidance":
            assert plan.negative_calls == 4 and rel_err(out, plain) > 1e-2
        else:
            assert plan.negative_calls == 0 and torch.equal(out, plain)


def test_cfg_plus_autoguidance_with_scale_zero_is_plain_cfg():
    s = setup("sd15")
    patched = apply_self_npo(s.model, s.negative_model(), mode="cfg+autoguidance", autoguidance_scale=0.0)
    assert torch.equal(ksample(patched, s), ksample(s.model, s))
    assert get_plan(patched).negative_calls == 0


def _warnings(caplog):
    return [r for r in caplog.records if r.name == "comfy_selfnpo" and r.levelno == logging.WARNING]


@pytest.mark.parametrize("residency", RESIDENCIES)
def test_a_run_that_never_evaluates_the_negative_model_warns_once(residency, caplog):
    s = setup("sd15")
    negative_model = s.negative_model()
    caplog.set_level(logging.WARNING, logger="comfy_selfnpo")
    ksample(apply_self_npo(s.model, negative_model, residency=residency), s)
    assert _warnings(caplog) == []  # a normal run is quiet

    ksample(apply_self_npo(s.model, negative_model, residency=residency), s, cfg=1.0)
    (record,) = _warnings(caplog)
    assert "not evaluated" in record.getMessage() and "cfg 1" in record.getMessage()

    caplog.clear()
    # between the steps at t = 999 and 666: no step inside
    patched = apply_self_npo(s.model, negative_model, residency=residency, start_percent=0.1, end_percent=0.2)
    ksample(patched, s)
    (record,) = _warnings(caplog)
    assert get_plan(patched).negative_calls == 0 and "0.1–0.2" in record.getMessage()

    caplog.clear()
    ksample(apply_self_npo(s.model, negative_model, residency=residency, mode="cfg+autoguidance"), s, cfg=1.0)
    assert _warnings(caplog) == []  # the autoguidance term evaluates it at any cfg


@pytest.mark.parametrize("mode", MODES)
def test_pre_cfg_cfg_and_post_cfg_patches_act_on_each_mode(comfy_registry, mode):
    """APG (pre-CFG), RescaleCFG (CFG function) and CFGNorm (post-CFG) receive each mode's (cond,
    uncond) pair: npo (D_pos(c), D_neg(c_neg)); autoguidance (D_pos(c), D_neg(c)); cfg+autoguidance
    (D_pos(c) + Δ, D_pos(c_neg) + Δ) with Δ = g_ag·(D_pos(c) − D_neg(c))."""
    import comfy.samplers

    s = setup("sd15")
    mappings = comfy_registry.NODE_CLASS_MAPPINGS
    apg = mappings["APG"].execute(s.model, eta=0.5, norm_threshold=2.0, momentum=0.0).result[0]
    npo = apply_self_npo(apg, s.negative_model(), residency="batched_lowrank", mode=mode, autoguidance_scale=AG_SCALE)
    rescaled = mappings["RescaleCFG"]().patch(npo, 0.7)[0]
    normed = mappings["CFGNorm"].execute(rescaled, strength=0.9).result[0]
    recorder = StepRecorder()
    ksample(recorder.attach(normed), s)

    options = normed.model_options
    chain = {"sampler_pre_cfg_function": options["sampler_pre_cfg_function"],
             "sampler_cfg_function": options["sampler_cfg_function"],
             "sampler_post_cfg_function": options["sampler_post_cfg_function"][:1]}  # without the recorder
    for step in recorder.steps:
        x, sigma, c, c_neg = step["x"], step["sigma"], step["cond"], step["uncond"]
        with torch.no_grad():
            d_pos_c = predict(s.pos_ind, c, x, sigma)
            pair = {"npo": lambda: [d_pos_c, predict(s.neg_ind, c_neg, x, sigma)],
                    "autoguidance": lambda: [d_pos_c, predict(s.neg_ind, c, x, sigma)],
                    "cfg+autoguidance": lambda: [d_pos_c + AG_SCALE * (d_pos_c - predict(s.neg_ind, c, x, sigma)),
                                                 predict(s.pos_ind, c_neg, x, sigma)
                                                 + AG_SCALE * (d_pos_c - predict(s.neg_ind, c, x, sigma))]}[mode]()
            for fn in chain["sampler_pre_cfg_function"]:
                pair = fn({"conds": [c, c_neg], "conds_out": pair, "cond_scale": CFG, "timestep": sigma, "input": x,
                           "sigma": sigma, "model": s.pos_ind.model, "model_options": chain})
            expected = comfy.samplers.cfg_function(s.pos_ind.model, pair[0], pair[1], CFG, x, sigma,
                                                   model_options=chain, cond=c, uncond=c_neg)
        assert rel_err(step["denoised"], expected) < 1e-4
        assert rel_err(hand_guided(s, step, mode), expected) > 1e-3  # the three nodes really act


def test_sdxl_modes_agree_between_residencies_and_with_the_hand_computation():
    s = setup("sdxl")
    negative_model = s.negative_model()
    for mode in MODES:
        results = {}
        for residency in RESIDENCIES:
            recorder = StepRecorder()
            results[residency], _ = _sample("guider", s, negative_model, recorder, residency=residency, mode=mode,
                                            autoguidance_scale=AG_SCALE, start_percent=0.2, end_percent=1.0)
            for i, step in enumerate(recorder.steps):
                assert rel_err(step["denoised"], hand_guided(s, step, mode if i > 0 else "plain")) < 1e-4
        assert rel_err(results["batched_lowrank"], results["separate"]) < 1e-4


@pytest.mark.parametrize("bad,message", [
    (dict(mode="autoguide"), "mode must be one of"),
    (dict(start_percent=0.8, end_percent=0.2), "after end_percent"),
    (dict(end_percent=1.5), "end_percent must be a number from 0.0 to 1.0"),
    (dict(start_percent=float("nan")), "start_percent must be"),
    (dict(mode="cfg+autoguidance", autoguidance_scale=float("inf")), "autoguidance_scale must be a finite"),
])
def test_bad_mode_and_interval_settings_are_refused_with_the_value(bad, message):
    s = setup("sd15")
    with pytest.raises(ValueError, match=message):
        apply_self_npo(s.model, s.negative_model(), **bad)
