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
from comfy_selfnpo.npo import weights
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


def _whole_model_file(path, trained_from, changes, metadata: bool) -> None:
    """A whole-model NPO file as the pack's trainer exports it (format unet), with the metadata its
    exporter writes for the MODEL it trained from."""
    from comfy_selfnpo.training.config import make_config
    from comfy_selfnpo.training.export import metadata as export_metadata
    from comfy_selfnpo.training.identity import model_identity

    tensors = npo_files.full_model_state_dict(trained_from, changes, "bare")
    meta = export_metadata("unet", trained_from.model, make_config("sd15"), model_identity(trained_from), 10,
                           "prompts", name="npo", model_name="base_v1.safetensors") if metadata else None
    safetensors.torch.save_file(tensors, str(path), metadata=meta)


def test_a_whole_model_file_reports_the_base_it_is_an_offset_against_and_warns_on_another(comfy_dirs, tiny, caplog):
    from comfy_selfnpo.nodes.negative_model import SelfNPONegativeModelLoader

    base = tiny.build_model("sd15", seed=3)
    fine_tuned = tiny.build_model("sd15", seed=4)  # e.g. a DPO model: the same architecture, other weights
    changes = npo_files.dense_change(base, seed=1)
    _whole_model_file(comfy_dirs["self_npo"] / "whole.safetensors", base, changes, metadata=True)
    _whole_model_file(comfy_dirs["self_npo"] / "plain.safetensors", base, changes, metadata=False)
    load = lambda name, model, base_model=None: SelfNPONegativeModelLoader.execute(
        model=model, npo_weights=f"self_npo/{name}", strength=1.0, merge_weight=0.0, base_model=base_model).result

    # no base connected on a fine-tuned positive: θ_neg − θ_pos silently carried (θ_base − θ_ft): said and warned
    with caplog.at_level("WARNING", logger="comfy_selfnpo"):
        negative, report = load("whole.safetensors", fine_tuned)
    assert ("whole model taken as an offset against the positive model's checkpoint weights (no base_model "
            "connected)") in report
    assert "\nWARNING: the file was trained from base_v1.safetensors (base hash " in report
    assert "connect the model it was trained from as base_model" in report
    assert any("whole.safetensors: the file was trained from base_v1.safetensors" in r.message for r in caplog.records)
    key = "diffusion_model.out.2.weight"
    torch.testing.assert_close(weights.effective_weight(negative, key) - fine_tuned.model.state_dict()[key],
                               base.model.state_dict()[key] + changes[key] - fine_tuned.model.state_dict()[key])

    # the base connected: the offset is the trained change, and the file's hash agrees
    negative, report = load("whole.safetensors", fine_tuned, base)
    assert "offset against the base_model input's checkpoint weights, the model the file was trained from" in report
    assert "WARNING" not in report
    torch.testing.assert_close(weights.effective_weight(negative, key) - fine_tuned.model.state_dict()[key],
                               changes[key])
    # on its own base no warning; a file without the pack's metadata says what it was taken against, nothing more
    assert "WARNING" not in load("whole.safetensors", base)[1]
    report = load("plain.safetensors", fine_tuned)[1]
    assert "offset against the positive model's checkpoint weights (no base_model connected)" in report
    assert "WARNING" not in report


def test_the_loader_lists_a_folder_with_symlink_loops_once_per_file_and_quickly(comfy_registry, comfy_dirs, tiny):
    import os
    import time

    import folder_paths

    model = tiny.build_model("sd15", seed=3)
    sd = npo_files.kohya_state_dict(npo_files.make_npo_offset(model), model)
    root = comfy_dirs["self_npo"]
    (root / "sub").mkdir()
    npo_files.write(root / "a.safetensors", sd)
    npo_files.write(root / "sub" / "b.safetensors", sd)
    os.symlink(root, root / "loop")                 # back to the top: core lists every file dozens of times
    os.symlink(root, root / "sub" / "loop2")        # a second loop: core walks for minutes
    os.symlink(root / "sub", root / "sub_again")    # the same folder under two names
    (root / "notes.txt").write_text("not a model")
    started = time.monotonic()
    choices = [c for c in list_npo_files() if c.startswith("self_npo/")]
    assert time.monotonic() - started < 5.0
    assert choices == ["self_npo/a.safetensors", os.path.join("self_npo/sub", "b.safetensors")]
    assert resolve_npo_choice(choices[1]) == str(root / "sub" / "b.safetensors")
    assert folder_paths.get_full_path("self_npo", "a.safetensors") == str(root / "a.safetensors")


def test_an_overwritten_weights_file_is_read_again_instead_of_the_cached_negative_model(comfy_registry, comfy_dirs,
                                                                                       tiny):
    import copy
    import os
    import uuid

    import execution

    from comfy_exec import ServerStub, validate

    tiny.save_checkpoint(str(comfy_dirs["checkpoints"] / "tiny_sd15.safetensors"), "sd15", seed=3)
    base = tiny.build_model("sd15", seed=3)
    path = comfy_dirs["self_npo"] / "npo.safetensors"
    prompt = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "tiny_sd15.safetensors"}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "a red cube"}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": ""}},
        "4": {"class_type": "SelfNPONegativeModelLoader",
              "inputs": {"model": ["1", 0], "npo_weights": "self_npo/npo.safetensors", "strength": 1.0,
                         "merge_weight": 0.0}},
        "5": {"class_type": "SelfNPOApply", "inputs": {"model": ["1", 0], "negative_model": ["4", 0],
                                                       "residency": "auto", "rank": 0}},
        "6": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "7": {"class_type": "KSampler",
              "inputs": {"model": ["5", 0], "seed": 1, "steps": 2, "cfg": 4.0, "sampler_name": "euler",
                         "scheduler": "normal", "positive": ["2", 0], "negative": ["3", 0], "latent_image": ["6", 0],
                         "denoise": 1.0}},
        "8": {"class_type": "SaveLatent", "inputs": {"samples": ["7", 0], "filename_prefix": "run"}},
    }
    write = lambda seed: npo_files.write(path, npo_files.kohya_state_dict(npo_files.make_npo_offset(base, seed=seed),
                                                                           base))
    write(1)
    outputs = validate(prompt)[2]
    executor = execution.PromptExecutor(ServerStub(), cache_type=execution.CacheType.CLASSIC,
                                        cache_args={"lru": 0, "ram": 0})
    saved = lambda: sorted(comfy_dirs["output"].glob("run_*.latent"))

    def run(seed):
        write(seed)
        os.utime(path, ns=(10**18 + seed, 10**18 + seed))  # a new modification time, whatever the clock's resolution
        executor.execute(copy.deepcopy(prompt), str(uuid.uuid4()), {}, outputs)  # a fresh prompt, as queued
        assert executor.success

    run(1)
    run(1)  # the same file again: ComfyUI's cache answers, nothing is written
    assert len(saved()) == 1
    run(2)  # overwritten: the loader runs again, and the picture changes
    first, second = (safetensors.torch.load_file(str(p))["latent_tensor"] for p in saved())
    assert float((first - second).abs().max() / first.abs().max()) > 1e-2
