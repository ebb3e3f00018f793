"""Graphs that used to give a silently wrong picture are refused, run by ComfyUI's own executor
(issue 18, hostile probe items 5 and 6; the model compiler of newer cores):

* Apply Self-NPO (separate) before a LoRA loader or a ModelSampling node: the negative branch ran
  without the user's LoRA, whatever layers it touched;
* two Apply Self-NPO nodes in a row: the second silently replaced the first;
* a negative model that changes nothing: batched and separate residencies gave contradictory advice;
* `auto` under newer ComfyUI's model compiler picks `separate`.
"""
from __future__ import annotations

import sys
import types

import pytest
import safetensors.torch
import torch

import comfy

import npo_files
from comfy_exec import PromptFailed, run_prompt
from comfy_selfnpo.nodes.guidance import SelfNPOApply
from comfy_selfnpo.npo.guidance import SelfNPOError, get_plan

STEPS, CFG, SEED = 3, 4.0, 11
# separate and batched_lowrank compute the same thing in another order (tests/test_npo_guidance.py)
RESIDENCY_AGREEMENT = 1e-4


def _feed_forward_lora(model) -> dict:
    """A user's LoRA on the feed-forward layers, which the NPO LoRA (attention) does not touch."""
    gen = torch.Generator().manual_seed(7)
    factors = {}
    for key, w in model.model.state_dict().items():
        if ".ff.net." in key and key.endswith(".weight") and w.ndim == 2:
            factors[key] = (torch.randn(w.shape[0], 4, generator=gen) * 0.3, torch.randn(4, w.shape[1], generator=gen)
                            / w.shape[1] ** 0.5, 4.0)
    assert factors
    return npo_files.kohya_state_dict(npo_files.LowRankOffset(factors), model)


@pytest.fixture
def files(comfy_dirs, tiny):
    checkpoint = tiny.save_checkpoint(str(comfy_dirs["checkpoints"] / "tiny_sd15.safetensors"), "sd15", seed=3)
    offset = npo_files.make_npo_offset(checkpoint.model, seed=1)
    npo_files.write(comfy_dirs["self_npo"] / "npo.safetensors", npo_files.kohya_state_dict(offset, checkpoint.model))
    npo_files.write(comfy_dirs["loras"] / "ff.safetensors", _feed_forward_lora(checkpoint.model))
    return comfy_dirs


def _graph(chain: list[tuple[str, dict]], residency: str) -> dict:
    """Checkpoint -> [model nodes of `chain`, in order, each fed the previous model] -> KSampler -> SaveLatent.
    "NPO" in the chain is Apply Self-NPO with a negative model made from the model that reaches it."""
    prompt = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "tiny_sd15.safetensors"}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "a red cube"}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": ""}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
    }
    model = ["1", 0]
    for number, (class_type, inputs) in enumerate(chain, start=10):
        node = str(number)
        if class_type == "NPO":
            prompt[f"{node}n"] = {"class_type": "SelfNPONegativeModelLoader",
                                  "inputs": {"model": model, "npo_weights": "self_npo/npo.safetensors",
                                             "strength": 1.0, "merge_weight": 0.0}}
            prompt[node] = {"class_type": "SelfNPOApply",
                            "inputs": {"model": model, "negative_model": [f"{node}n", 0], "residency": residency,
                                       "rank": 0}}
        else:
            prompt[node] = {"class_type": class_type, "inputs": {"model": model, **inputs}}
        model = [node, 0]
    prompt["5"] = {"class_type": "KSampler",
                   "inputs": {"model": model, "seed": SEED, "steps": STEPS, "cfg": CFG, "sampler_name": "euler",
                              "scheduler": "normal", "positive": ["2", 0], "negative": ["3", 0],
                              "latent_image": ["4", 0], "denoise": 1.0}}
    prompt["6"] = {"class_type": "SaveLatent", "inputs": {"samples": ["5", 0], "filename_prefix": "out"}}
    return prompt


def _sample(dirs, chain, residency) -> torch.Tensor:
    _, history = run_prompt(_graph(chain, residency))
    name = history["outputs"]["6"]["latents"][0]["filename"]
    return safetensors.torch.load_file(str(dirs["output"] / name))["latent_tensor"]


USER_LORA = ("LoraLoaderModelOnly", {"lora_name": "ff.safetensors", "strength_model": 1.0})
SHIFT = ("ModelSamplingDiscrete", {"sampling": "eps", "zsnr": True})


@pytest.mark.parametrize("later", [USER_LORA, SHIFT], ids=["lora_on_other_layers", "model_sampling_node"])
def test_a_patch_after_apply_self_npo_is_refused_in_separate_residency(comfy_registry, files, later):
    what = "weight patches" if later is USER_LORA else "object patches"
    with pytest.raises(PromptFailed, match=f"patched after 'Apply Self-NPO' \\({what}.*Put 'Apply Self-NPO' after "
                                           "your LoRA loaders"):
        _sample(files, [("NPO", {}), later], "separate")


def test_a_lora_after_apply_self_npo_in_batched_residency_is_the_right_picture(comfy_registry, files):
    # the batched change rides on whatever the positive model computes: order does not matter there
    right_order = _sample(files, [USER_LORA, ("NPO", {})], "separate")
    after = _sample(files, [("NPO", {}), USER_LORA], "batched_lowrank")
    without_lora = _sample(files, [("NPO", {})], "separate")
    scale = float(right_order.abs().max())
    assert float((after - right_order).abs().max()) / scale < RESIDENCY_AGREEMENT
    assert float((without_lora - right_order).abs().max()) / scale > 1e-2  # the user's LoRA matters


def test_two_apply_self_npo_nodes_in_a_row_are_refused(comfy_registry, files):
    with pytest.raises(PromptFailed, match="already guides with a Self-NPO negative model"):
        _sample(files, [("NPO", {}), ("NPO", {})], "auto")


def test_a_negative_that_changes_nothing_gets_one_answer_from_every_residency(comfy_registry, files, tiny):
    import comfy.sd
    import comfy.utils

    model = comfy.sd.load_checkpoint_guess_config(str(files["checkpoints"] / "tiny_sd15.safetensors"))[0]
    zero = {k: (torch.zeros_like(v) if k.endswith(".lora_up.weight") else v)
            for k, v in comfy.utils.load_torch_file(str(files["self_npo"] / "npo.safetensors")).items()}
    # made by core's LoRA loader, which takes the file as it is
    negative = comfy.sd.load_lora_for_models(model, None, zero, 1.0, 0.0)[0]
    for residency in ("auto", "separate", "batched_lowrank"):
        with pytest.raises(SelfNPOError, match="^the negative model has the same weights as the positive model"):
            SelfNPOApply.execute(model=model, negative_model=negative, residency=residency)


@pytest.mark.parametrize("compiler_on", [False, True])
def test_auto_picks_separate_under_the_comfy_model_compiler(comfy_registry, files, monkeypatch, compiler_on):
    import comfy.sd

    from comfy_selfnpo.npo.weights import load_npo_file, make_negative_model

    # newer core's switch (comfy/model_prefetch.py), absent at the pin: a stand-in answering as core does
    stand_in = types.ModuleType("comfy.model_prefetch")
    stand_in.malloc_graph_enabled = lambda device: compiler_on
    monkeypatch.setitem(sys.modules, "comfy.model_prefetch", stand_in)
    monkeypatch.setattr(comfy, "model_prefetch", stand_in, raising=False)
    model = comfy.sd.load_checkpoint_guess_config(str(files["checkpoints"] / "tiny_sd15.safetensors"))[0]
    negative, _ = make_negative_model(model, load_npo_file(str(files["self_npo"] / "npo.safetensors")))
    patched = SelfNPOApply.execute(model=model, negative_model=negative, residency="auto").result[0]
    assert get_plan(patched).residency == ("separate" if compiler_on else "batched_lowrank")
    # an explicit choice is kept
    patched = SelfNPOApply.execute(model=model, negative_model=negative, residency="batched_lowrank").result[0]
    assert get_plan(patched).residency == "batched_lowrank"
