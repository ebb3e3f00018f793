"""Self-NPO guidance on the flow DiTs and video models: every step equals CFG with the negative model
on the uncond branch, computed by hand on two independently built models, in both residencies,
through KSampler (Apply Self-NPO) and SamplerCustomAdvanced (the guider). The negative model is the
positive plus an NPO LoRA that ComfyUI's own LoRA code applies as weight patches: in ComfyUI-native
names, and in diffusers names, which land on the fused qkv / linear1 weights of SD3 and Chroma as
slice patches. Also: Wan 2.2 A14B's two experts, each with its own negative model, and the warning
for guidance-distilled models (Flux-dev, HunyuanVideo)."""
from __future__ import annotations

import dataclasses
import logging

import pytest
import torch

import comfy.sample
import comfy.samplers
import nodes

from comfy_selfnpo import tiny_models
from npo_setup import (CFG, SEED, STRENGTH, StepRecorder, family_setup, guider_sample, hand_cfg, independent_model_with,
                       ksample, latent, rel_err, with_lora)
from comfy_selfnpo.npo.guidance import SelfNPOError, SelfNPOGuider, apply_self_npo, get_plan, is_guidance_distilled
from comfy_selfnpo.npo.lowrank import lora_patch_factors

RESIDENCIES = ("separate", "batched_lowrank")
FAMILIES = ("sd3", "wan21", "wan22_5b", "qwen_image", "chroma", "ltxv", "hunyuan_video15", "lumina2")
STEPS = 3
HIDDEN = 128  # the width of the tiny SD3 and Chroma: their fused qkv weights have 3 · HIDDEN rows


def _sample(path, s, negative_model, residency, recorder, **options):
    model = recorder.attach(s.model)
    if path == "guider":
        guider = SelfNPOGuider(model, negative_model, residency=residency, **options)
        return guider_sample(guider, s, steps=STEPS), guider.plan
    patched = apply_self_npo(model, negative_model, residency=residency, **options)
    return ksample(patched, s, steps=STEPS), get_plan(patched)


@pytest.mark.parametrize("path", ["ksampler", "guider"])
@pytest.mark.parametrize("kind", FAMILIES)
def test_every_step_is_cfg_with_the_negative_model_on_each_family(kind, path):
    s = family_setup(kind)
    negative_model = s.negative_model()
    results = {}
    for residency in RESIDENCIES:
        recorder = StepRecorder()
        results[residency], plan = _sample(path, s, negative_model, residency, recorder)
        assert plan.residency == residency and plan.verified and plan.negative_calls == STEPS
        assert len(recorder.steps) == STEPS
        for step in recorder.steps:
            expected = hand_cfg(s, step)
            assert rel_err(step["denoised"], expected) < 1e-4
            # the NPO LoRA acts: plain CFG predicts another update x − D
            plain = hand_cfg(s, step, negative_model=s.pos_ind)
            assert rel_err(plain - step["x"], expected - step["x"]) > 1e-2
    assert results["separate"].shape == s.latent_shape and torch.isfinite(results["separate"]).all()
    assert rel_err(results["batched_lowrank"], results["separate"]) < 1e-4


_QKV = ("to_q", "to_k", "to_v")
_ADDED_QKV = ("add_q_proj", "add_k_proj", "add_v_proj")


def _diffusers_layout(kind: str, h: int = HIDDEN) -> dict:
    """diffusers module name -> (ComfyUI weight key, rows of it the module is), written out from the
    two model layouts (not read from ComfyUI's key maps): q, k, v (and Flux's single-block MLP input)
    are row blocks of one fused weight."""
    q, k, v = slice(0, h), slice(h, 2 * h), slice(2 * h, 3 * h)
    layout = {}
    if kind == "sd3":
        for i in range(2):
            d, c = f"transformer.transformer_blocks.{i}.attn", f"diffusion_model.joint_blocks.{i}"
            for names, stream in ((_QKV, "x_block"), (_ADDED_QKV, "context_block")):
                layout.update({f"{d}.{n}": (f"{c}.{stream}.attn.qkv.weight", rows) for n, rows in zip(names, (q, k, v))})
            layout[f"{d}.to_out.0"] = (f"{c}.x_block.attn.proj.weight", None)
        # the last block's context stream ends before its output projection (pre_only)
        layout["transformer.transformer_blocks.0.attn.to_add_out"] = (
            "diffusion_model.joint_blocks.0.context_block.attn.proj.weight", None)
        return layout
    if kind == "wan21":  # no fused layers: every diffusers module is one whole ComfyUI weight
        renames = {"attn1.to_q": "self_attn.q", "attn1.to_k": "self_attn.k", "attn1.to_v": "self_attn.v",
                   "attn1.to_out.0": "self_attn.o", "attn2.to_q": "cross_attn.q", "attn2.to_k": "cross_attn.k",
                   "attn2.to_v": "cross_attn.v", "attn2.to_out.0": "cross_attn.o", "ffn.net.0.proj": "ffn.0",
                   "ffn.net.2": "ffn.2"}
        return {f"transformer.blocks.{i}.{d}": (f"diffusion_model.blocks.{i}.{c}.weight", None)
                for i in range(2) for d, c in renames.items()}
    assert kind == "chroma"
    d, c = "transformer.transformer_blocks.0.attn", "diffusion_model.double_blocks.0"
    for names, attn in ((_QKV, "img_attn"), (_ADDED_QKV, "txt_attn")):
        layout.update({f"{d}.{n}": (f"{c}.{attn}.qkv.weight", rows) for n, rows in zip(names, (q, k, v))})
    layout[f"{d}.to_out.0"] = (f"{c}.img_attn.proj.weight", None)
    layout[f"{d}.to_add_out"] = (f"{c}.txt_attn.proj.weight", None)
    d, c = "transformer.single_transformer_blocks.0", "diffusion_model.single_blocks.0"
    layout.update({f"{d}.attn.{n}": (f"{c}.linear1.weight", rows) for n, rows in zip(_QKV, (q, k, v))})
    layout[f"{d}.proj_mlp"] = (f"{c}.linear1.weight", slice(3 * h, 7 * h))
    layout[f"{d}.proj_out"] = (f"{c}.linear2.weight", None)
    return layout


def _diffusers_lora(model, layout: dict, seed=2, rank=4, scale=0.5):
    """A PEFT/diffusers LoRA (lora_A/lora_B, no alpha) on the modules of `layout`, and the change it
    makes to each ComfyUI weight (zeros outside a module's rows), computed by hand."""
    gen = torch.Generator().manual_seed(seed)
    sd = model.model.state_dict()
    lora, change = {}, {}
    for name, (key, rows) in layout.items():
        weight = sd[key]
        out_dim = weight.shape[0] if rows is None else rows.stop - rows.start
        down = torch.randn(rank, weight.shape[1], generator=gen) / weight.shape[1] ** 0.5
        up = torch.randn(out_dim, rank, generator=gen) * scale / rank ** 0.5
        lora.update({f"{name}.lora_A.weight": down, f"{name}.lora_B.weight": up})
        delta = change.setdefault(key, torch.zeros_like(weight))
        delta[rows if rows is not None else slice(None)] += STRENGTH * (up @ down)
    return lora, change


@pytest.mark.parametrize("kind", ["sd3", "chroma"])
def test_diffusers_lora_on_fused_layers_is_exact_low_rank_and_auto_batches_it(kind):
    """diffusers-named LoRAs land on MMDiT/Flux fused qkv and linear1 weights as slice patches
    (ComfyUI's own key map sets their offset); batched_lowrank takes them as exact low rank."""
    s = family_setup(kind)
    layout = _diffusers_layout(kind)
    lora, change = _diffusers_lora(s.model, layout)
    negative_model = with_lora(s.model, lora, STRENGTH)
    sliced = [p for k in change for p in negative_model.patches[k] if p[3] is not None]
    assert len(sliced) == sum(rows is not None for _key, rows in layout.values())  # the case at hand
    reference = dataclasses.replace(s, neg_ind=independent_model_with(kind, None, change))

    plan = get_plan(apply_self_npo(s.model, negative_model))
    assert plan.residency == "batched_lowrank"
    assert (plan.lowrank.exact_layers, plan.lowrank.dense_layers, plan.lowrank.svd_layers) == (len(change), 0, 0)
    _assert_guides_like_hand_cfg("ksampler", s, reference, negative_model)


def _assert_guides_like_hand_cfg(route: str, s, reference, negative_model) -> None:
    """In both residencies, every step through `route` equals CFG computed by hand with the
    independent `reference` negative model, and not with the setup's own (another LoRA)."""
    results = {}
    for residency in RESIDENCIES:
        recorder = StepRecorder()
        results[residency], plan = _sample(route, reference, negative_model, residency, recorder)
        assert plan.verified and plan.negative_calls == STEPS
        for step in recorder.steps:
            expected = hand_cfg(reference, step)
            assert rel_err(step["denoised"], expected) < 1e-4
            assert rel_err(hand_cfg(s, step) - step["x"], expected - step["x"]) > 1e-2  # not the other LoRA
    assert rel_err(results["batched_lowrank"], results["separate"]) < 1e-4


def test_diffusers_named_wan_lora_through_the_packs_loader_guides_like_the_change_applied_by_hand():
    from comfy_selfnpo.npo.weights import make_negative_model, npo_weights_from_state_dict

    s = family_setup("wan21")
    lora, change = _diffusers_lora(s.model, _diffusers_layout("wan21"))
    npo = npo_weights_from_state_dict(lora, "wan_npo_diffusers.safetensors")
    negative_model, report = make_negative_model(s.model, npo, strength=STRENGTH)
    assert report.unmatched == [] and report.patched == len(change) == 20
    reference = dataclasses.replace(s, neg_ind=independent_model_with("wan21", None, change))
    _assert_guides_like_hand_cfg("guider", s, reference, negative_model)
    assert get_plan(apply_self_npo(s.model, negative_model)).residency == "batched_lowrank"


def _warnings(caplog):
    return [r.getMessage() for r in caplog.records if r.name == "comfy_selfnpo" and r.levelno == logging.WARNING]


@pytest.mark.parametrize("kind", ["flux_dev", "hunyuan_video"])
def test_guidance_on_a_guidance_distilled_model_warns_once_why(kind, caplog):
    s = family_setup(kind)
    assert tiny_models.family(kind).guidance_distilled and is_guidance_distilled(s.model)
    negative_model = s.negative_model()
    caplog.set_level(logging.WARNING, logger="comfy_selfnpo")
    for residency in RESIDENCIES:
        # how such a model is sampled: cfg 1, where ComfyUI never evaluates the negative branch
        caplog.clear()
        patched = apply_self_npo(s.model, negative_model, residency=residency)
        out = ksample(patched, s, cfg=1.0, steps=STEPS)
        (message,) = _warnings(caplog)
        assert "guidance-distilled" in message and "no real unconditional branch" in message
        assert "never evaluated the negative model (cfg 1)" in message and "plain sampling" in message
        assert get_plan(patched).negative_calls == 0 and torch.equal(out, ksample(s.model, s, cfg=1.0, steps=STEPS))

        caplog.clear()  # real CFG on a distilled model: the negative model runs, the warning still says why
        patched = apply_self_npo(s.model, negative_model, residency=residency)
        ksample(patched, s, cfg=CFG, steps=STEPS)
        (message,) = _warnings(caplog)
        assert "guidance-distilled" in message and "cfg > 1" in message
        assert get_plan(patched).negative_calls == STEPS

        caplog.clear()  # cfg+autoguidance needs no unconditional branch: it acts at cfg 1, quietly
        patched = apply_self_npo(s.model, negative_model, residency=residency, mode="cfg+autoguidance")
        ksample(patched, s, cfg=1.0, steps=STEPS)
        assert _warnings(caplog) == [] and get_plan(patched).negative_calls == STEPS


def test_models_with_real_cfg_are_not_taken_for_guidance_distilled():
    for kind in FAMILIES:
        assert not is_guidance_distilled(tiny_models.build_model(kind)), kind


def _expert_switch(model, steps: int) -> int:
    """The first step the low-noise expert takes: where t/T falls below Wan 2.2's boundary."""
    sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "normal", steps)
    timesteps = model.get_model_object("model_sampling").timestep(sigmas[:-1]) / 1000
    return int((timesteps >= tiny_models.WAN22_A14B_BOUNDARY).sum())


def _two_stage_ksampler(high, low, s, steps, switch):
    """ComfyUI's Wan 2.2 A14B workflow: KSamplerAdvanced on the high-noise expert for the first
    steps (leftover noise kept), then on the low-noise expert from there, without new noise."""
    first = nodes.common_ksampler(high, SEED, steps, CFG, "euler", "normal", s.positive, s.negative,
                                  latent(s.latent_shape), last_step=switch, force_full_denoise=False)[0]
    return nodes.common_ksampler(low, SEED, steps, CFG, "euler", "normal", s.positive, s.negative, first,
                                 start_step=switch, disable_noise=True)[0]["samples"]


def _two_stage_guiders(high, low, s, steps, switch):
    """The same with two SamplerCustomAdvanced: SplitSigmas at the switch, DisableNoise for stage 2."""
    sigmas = comfy.samplers.calculate_sigmas(high.model_patcher.get_model_object("model_sampling"), "normal", steps)
    sampler = comfy.samplers.sampler_object("euler")
    lat = latent(s.latent_shape)["samples"]
    for guider in (high, low):
        guider.set_conds(s.positive, s.negative)
        guider.set_cfg(CFG)
    first = high.sample(comfy.sample.prepare_noise(lat, SEED), lat, sampler, sigmas[: switch + 1], seed=SEED)
    return low.sample(torch.zeros_like(first), first, sampler, sigmas[switch:], seed=SEED)


@pytest.mark.parametrize("path", ["ksampler", "guider"])
def test_wan22_a14b_two_experts_each_guided_by_its_own_negative_model(path):
    high_s, low_s = family_setup("wan22_a14b", "high_noise", 1), family_setup("wan22_a14b", "low_noise", 2)
    steps = 4
    switch = _expert_switch(high_s.model, steps)
    assert 0 < switch < steps
    results = {}
    for residency in RESIDENCIES:
        recorders = StepRecorder(), StepRecorder()
        experts = [rec.attach(e.model) for rec, e in zip(recorders, (high_s, low_s))]
        negatives = (high_s.negative_model(), low_s.negative_model())
        if path == "ksampler":
            patched = [apply_self_npo(e, n, residency=residency) for e, n in zip(experts, negatives)]
            results[residency] = _two_stage_ksampler(*patched, high_s, steps, switch)
            plans = [get_plan(p) for p in patched]
        else:
            guiders = [SelfNPOGuider(e, n, residency=residency) for e, n in zip(experts, negatives)]
            results[residency] = _two_stage_guiders(*guiders, high_s, steps, switch)
            plans = [g.plan for g in guiders]
        assert [len(r.steps) for r in recorders] == [switch, steps - switch]
        assert [p.negative_calls for p in plans] == [switch, steps - switch] and all(p.verified for p in plans)
        for recorder, s, other in ((recorders[0], high_s, low_s), (recorders[1], low_s, high_s)):
            for step in recorder.steps:
                expected = hand_cfg(s, step)
                assert rel_err(step["denoised"], expected) < 1e-4
                # the other expert with its negative would predict another update
                assert rel_err(hand_cfg(other, step) - step["x"], expected - step["x"]) > 1e-2
    assert results["separate"].shape == high_s.latent_shape and torch.isfinite(results["separate"]).all()
    assert rel_err(results["batched_lowrank"], results["separate"]) < 1e-4


@pytest.mark.parametrize("shape,offset", [((12, 5), (0, 4, 6)), ((12, 5), (1, 1, 3)), ((12, 5), None),
                                          ((6, 4, 3, 3), (0, 2, 3)), ((6, 4, 3, 3), (1, 0, 2))])
def test_slice_lora_patch_factors_equal_comfyui_own_weight_calculation(shape, offset):
    """scale·up @ down of the factors equals what comfy.lora.calculate_weight adds for the patch."""
    import comfy.lora
    import comfy.weight_adapter

    gen = torch.Generator().manual_seed(0)
    part = list(shape)
    if offset is not None:
        part[offset[0]] = offset[2]
    rank = 2
    up = torch.randn((part[0], rank) + (1,) * (len(shape) - 2), generator=gen)
    down = torch.randn((rank,) + tuple(part[1:]), generator=gen)
    adapter = comfy.weight_adapter.LoRAAdapter(set(), (up, down, 3.0, None, None, None))
    patch = (0.7, adapter, 1.0, offset, None)
    weight = torch.randn(shape, generator=gen)
    expected = comfy.lora.calculate_weight([patch], weight.clone(), "w") - weight
    f_up, f_down, scale = lora_patch_factors(patch, shape)
    assert f_down.shape[1:] == shape[1:] and f_up.shape == (shape[0], rank)
    assert rel_err(scale * (f_up @ f_down.flatten(1)).reshape(shape), expected) < 1e-6
    # not a plain LoRA: ComfyUI's strength_model rescales the weight itself, a function transforms the change
    assert lora_patch_factors((0.7, adapter, 0.5, offset, None), shape) is None
    assert lora_patch_factors((0.7, adapter, 1.0, offset, lambda w: w * 2), shape) is None


@pytest.mark.parametrize("kind,key", [("wan21", "diffusion_model.blocks.0.modulation"),
                                      ("ltxv", "diffusion_model.transformer_blocks.0.scale_shift_table")])
def test_an_offset_on_a_parameter_that_is_no_layer_weight_gets_separate_weights(kind, key):
    """A full offset (`.diff`) also changes Wan's `modulation` or LTXV's `scale_shift_table`: no layer
    output carries that change, so auto gives the negative its own weights, and batched_lowrank says so."""
    s = family_setup(kind)
    delta = 0.5 * torch.randn(s.model.model.state_dict()[key].shape, generator=torch.Generator().manual_seed(3))
    negative_model = s.negative_model()
    assert negative_model.add_patches({key: ("diff", (delta,))}, STRENGTH) == [key]
    dense = s.offset.dense(s.model.model.state_dict())
    reference = dataclasses.replace(s, neg_ind=independent_model_with(
        kind, None, {**{k: STRENGTH * d for k, d in dense.items()}, key: STRENGTH * delta}))
    with pytest.raises(SelfNPOError, match=f"cannot apply a change to {key}.*separate"):
        apply_self_npo(s.model, negative_model, residency="batched_lowrank")
    recorder = StepRecorder()
    _, plan = _sample("ksampler", reference, negative_model, "auto", recorder)
    assert plan.residency == "separate" and plan.verified
    for step in recorder.steps:
        expected = hand_cfg(reference, step)
        assert rel_err(step["denoised"], expected) < 1e-4
        assert rel_err(hand_cfg(s, step) - step["x"], expected - step["x"]) > 1e-3  # the offset matters
