"""The three Self-NPO nodes inside a real ComfyUI workflow run by ComfyUI's own executor."""
from __future__ import annotations


import pytest
import safetensors.torch
import torch

import comfy.sd
import comfy.utils

import npo_files
from comfy_selfnpo.nodes.negative_model import list_npo_files, resolve_npo_choice
from comfy_exec import run_prompt
from comfy_selfnpo.npo.guidance import apply_self_npo
from comfy_selfnpo.npo.weights import load_npo_file, make_negative_model


def test_loader_lists_files_from_its_three_folders_unambiguously(comfy_registry, comfy_dirs, tiny):
    model = tiny.build_model("sd15", seed=3)
    sd = npo_files.kohya_state_dict(npo_files.make_npo_offset(model), model)
    for folder in ("self_npo", "loras", "diffusion_models"):
        npo_files.write(comfy_dirs[folder] / "same_name.safetensors", sd)
    choices = list_npo_files()
    assert {"self_npo/same_name.safetensors", "loras/same_name.safetensors",
            "diffusion_models/same_name.safetensors"} <= set(choices)
    assert resolve_npo_choice("loras/same_name.safetensors") == str(comfy_dirs["loras"] / "same_name.safetensors")
    schema = comfy_registry.NODE_CLASS_MAPPINGS["SelfNPONegativeModelLoader"].GET_SCHEMA()
    combo = next(i for i in schema.inputs if i.id == "npo_weights")
    assert set(choices) <= set(combo.options)
    with pytest.raises(FileNotFoundError, match="was not found in the 'self_npo'"):
        resolve_npo_choice("self_npo/other.safetensors")
    with pytest.raises(ValueError, match="not a Self-NPO weight choice"):
        resolve_npo_choice("checkpoints/same_name.safetensors")


def test_workflow_with_loader_guider_and_apply_through_comfyui_executor(comfy_registry, comfy_dirs, tiny):
    tiny.save_checkpoint(str(comfy_dirs["checkpoints"] / "tiny_sd15.safetensors"), "sd15", seed=3)
    base = tiny.build_model("sd15", seed=3)
    offset = npo_files.make_npo_offset(base, seed=1)
    npo_path = npo_files.write(comfy_dirs["self_npo"] / "npo.safetensors", npo_files.peft_state_dict(offset, base))

    steps, cfg, seed = 4, 4.0, 11
    prompt = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "tiny_sd15.safetensors"}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "a red cube"}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": ""}},
        "4": {"class_type": "SelfNPONegativeModelLoader",
              "inputs": {"model": ["1", 0], "npo_weights": "self_npo/npo.safetensors", "strength": 1.5,
                         "merge_weight": 0.0}},
        "5": {"class_type": "SelfNPOApply",
              "inputs": {"model": ["1", 0], "negative_model": ["4", 0], "residency": "separate", "rank": 0}},
        "6": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "7": {"class_type": "KSampler",
              "inputs": {"model": ["5", 0], "seed": seed, "steps": steps, "cfg": cfg, "sampler_name": "euler",
                         "scheduler": "normal", "positive": ["2", 0], "negative": ["3", 0],
                         "latent_image": ["6", 0], "denoise": 1.0}},
        "8": {"class_type": "SaveLatent", "inputs": {"samples": ["7", 0], "filename_prefix": "npo_ksampler"}},
        "9": {"class_type": "SelfNPOCFGGuider",
              "inputs": {"model": ["1", 0], "negative_model": ["4", 0], "positive": ["2", 0],
                         "negative": ["3", 0], "cfg": cfg, "residency": "batched_lowrank", "rank": 0}},
        "10": {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "euler"}},
        "11": {"class_type": "BasicScheduler", "inputs": {"model": ["1", 0], "scheduler": "normal",
                                                          "steps": steps, "denoise": 1.0}},
        "12": {"class_type": "RandomNoise", "inputs": {"noise_seed": seed}},
        "13": {"class_type": "SamplerCustomAdvanced",
               "inputs": {"noise": ["12", 0], "guider": ["9", 0], "sampler": ["10", 0], "sigmas": ["11", 0],
                          "latent_image": ["6", 0]}},
        "14": {"class_type": "SaveLatent", "inputs": {"samples": ["13", 0], "filename_prefix": "npo_guider"}},
        "15": {"class_type": "KSampler",
               "inputs": {"model": ["1", 0], "seed": seed, "steps": steps, "cfg": cfg, "sampler_name": "euler",
                          "scheduler": "normal", "positive": ["2", 0], "negative": ["3", 0],
                          "latent_image": ["6", 0], "denoise": 1.0}},
        "16": {"class_type": "SaveLatent", "inputs": {"samples": ["15", 0], "filename_prefix": "plain"}},
    }
    run_prompt(prompt)
    load = lambda name: safetensors.torch.load_file(str(comfy_dirs["output"] / f"{name}_00001_.latent"))["latent_tensor"]
    via_ksampler, via_guider, plain = load("npo_ksampler"), load("npo_guider"), load("plain")

    # the same computation through the Python API on the same files
    import nodes

    model, clip, _vae, _ = comfy.sd.load_checkpoint_guess_config(str(comfy_dirs["checkpoints"] / "tiny_sd15.safetensors"))
    negative_model, report = make_negative_model(model, load_npo_file(npo_path), strength=1.5)
    assert report.unmatched == [] and report.format == "peft_lora"
    encode = lambda text: nodes.CLIPTextEncode().encode(clip, text)[0]
    (ref,) = nodes.common_ksampler(apply_self_npo(model, negative_model, residency="separate"), seed, steps, cfg,
                                   "euler", "normal", encode("a red cube"), encode(""),
                                   {"samples": torch.zeros(1, 4, 8, 8)})
    ref = ref["samples"]
    scale = ref.abs().max()
    # the executor runs the same KSampler computation: bit-identical (measured with 1, 2 and 4 threads);
    # the guider node batches differently: measured 2.1e-6 of the largest value, allowed 1e-4 (npo_setup.rel_err)
    assert torch.equal(via_ksampler, ref)
    assert float((via_guider - ref).abs().max() / scale) < 1e-4
    assert float((plain - ref).abs().max() / scale) > 1e-2
