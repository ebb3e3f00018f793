"""The guidance nodes' mode and interval inputs inside a real workflow run by ComfyUI's own executor,
against the same computation through the Python API; and the inputs' defaults keep older workflows
(without them) meaning what they meant."""
from __future__ import annotations

import safetensors.torch
import torch

import comfy.sd

import npo_files
from comfy_exec import run_prompt
from comfy_selfnpo.npo.guidance import MODES, SelfNPOGuider, apply_self_npo
from comfy_selfnpo.npo.weights import load_npo_file, make_negative_model

STEPS, CFG, SEED = 4, 4.0, 11


def _prompt(guidance: dict) -> dict:
    """Checkpoint + Self-NPO loader; Apply Self-NPO into KSampler and the guider into
    SamplerCustomAdvanced, both with the given guidance inputs."""
    sampler = {"model": ["1", 0], "seed": SEED, "steps": STEPS, "cfg": CFG, "sampler_name": "euler",
               "scheduler": "normal", "positive": ["2", 0], "negative": ["3", 0], "latent_image": ["6", 0],
               "denoise": 1.0}
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "tiny_sd15.safetensors"}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "a red cube"}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "blurry"}},
        "4": {"class_type": "SelfNPONegativeModelLoader",
              "inputs": {"model": ["1", 0], "npo_weights": "self_npo/npo.safetensors", "strength": 1.5,
                         "merge_weight": 0.0}},
        "5": {"class_type": "SelfNPOApply", "inputs": {"model": ["1", 0], "negative_model": ["4", 0], **guidance}},
        "6": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "7": {"class_type": "KSampler", "inputs": {**sampler, "model": ["5", 0]}},
        "8": {"class_type": "SaveLatent", "inputs": {"samples": ["7", 0], "filename_prefix": "apply"}},
        "9": {"class_type": "SelfNPOCFGGuider",
              "inputs": {"model": ["1", 0], "negative_model": ["4", 0], "positive": ["2", 0], "negative": ["3", 0],
                         "cfg": CFG, **guidance}},
        "10": {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "euler"}},
        "11": {"class_type": "BasicScheduler", "inputs": {"model": ["1", 0], "scheduler": "normal", "steps": STEPS,
                                                          "denoise": 1.0}},
        "12": {"class_type": "RandomNoise", "inputs": {"noise_seed": SEED}},
        "13": {"class_type": "SamplerCustomAdvanced",
               "inputs": {"noise": ["12", 0], "guider": ["9", 0], "sampler": ["10", 0], "sigmas": ["11", 0],
                          "latent_image": ["6", 0]}},
        "14": {"class_type": "SaveLatent", "inputs": {"samples": ["13", 0], "filename_prefix": "guider"}},
    }


def _python_api_reference(comfy_dirs, npo_path, **options):
    """KSampler's and the guider's results through the Python API on the same files."""
    import comfy.sample
    import comfy.samplers
    import nodes

    model, clip, _vae, _ = comfy.sd.load_checkpoint_guess_config(str(comfy_dirs["checkpoints"] / "tiny_sd15.safetensors"))
    negative_model, _report = make_negative_model(model, load_npo_file(npo_path), strength=1.5)
    encode = lambda text: nodes.CLIPTextEncode().encode(clip, text)[0]
    positive, negative = encode("a red cube"), encode("blurry")
    latent = torch.zeros(1, 4, 8, 8)
    (via_apply,) = nodes.common_ksampler(apply_self_npo(model, negative_model, **options), SEED, STEPS, CFG,
                                         "euler", "normal", positive, negative, {"samples": latent})
    guider = SelfNPOGuider(model, negative_model, **options)
    guider.set_conds(positive, negative)
    guider.set_cfg(CFG)
    sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "normal", STEPS)
    via_guider = guider.sample(comfy.sample.prepare_noise(latent, SEED), latent, comfy.samplers.sampler_object("euler"),
                               sigmas, disable_pbar=True, seed=SEED)
    return via_apply["samples"], via_guider


def _saved(comfy_dirs, name):
    path = comfy_dirs["output"] / f"{name}_00001_.latent"
    latent = safetensors.torch.load_file(str(path))["latent_tensor"]
    path.unlink()  # the next run of the same prompt writes the same name
    return latent


def _close(a, b) -> bool:
    return float((a - b).abs().max() / b.abs().max()) < 1e-4


def test_mode_and_interval_inputs_reach_the_guidance_through_comfyui_executor(comfy_registry, comfy_dirs, tiny):
    tiny.save_checkpoint(str(comfy_dirs["checkpoints"] / "tiny_sd15.safetensors"), "sd15", seed=3)
    base = tiny.build_model("sd15", seed=3)
    npo_path = npo_files.write(comfy_dirs["self_npo"] / "npo.safetensors",
                               npo_files.kohya_state_dict(npo_files.make_npo_offset(base, seed=1), base))
    results = {}
    for mode in MODES:
        guidance = {"residency": "batched_lowrank", "rank": 0, "mode": mode, "autoguidance_scale": 2.0,
                    "start_percent": 0.2, "end_percent": 0.8}
        run_prompt(_prompt(guidance))
        via_apply, via_guider = _saved(comfy_dirs, "apply"), _saved(comfy_dirs, "guider")
        ref_apply, ref_guider = _python_api_reference(comfy_dirs, npo_path, residency="batched_lowrank", mode=mode,
                                                      autoguidance_scale=2.0, start_percent=0.2, end_percent=0.8)
        assert _close(via_apply, ref_apply) and _close(via_guider, ref_guider)
        results[mode] = via_apply
    assert not _close(results["npo"], results["autoguidance"]) and not _close(results["npo"], results["cfg+autoguidance"])

    # a workflow saved before the inputs existed: residency and rank only -> npo over the whole run
    run_prompt(_prompt({"residency": "separate", "rank": 0}))
    ref_apply, ref_guider = _python_api_reference(comfy_dirs, npo_path, residency="separate")
    assert _close(_saved(comfy_dirs, "apply"), ref_apply) and _close(_saved(comfy_dirs, "guider"), ref_guider)


def test_node_inputs_offer_every_mode_and_explain_them(comfy_registry):
    for node_id in ("SelfNPOApply", "SelfNPOCFGGuider"):
        schema = comfy_registry.NODE_CLASS_MAPPINGS[node_id].GET_SCHEMA()
        inputs = {i.id: i for i in schema.inputs}
        assert inputs["mode"].options == list(MODES) and inputs["mode"].default == "npo"
        assert all(m in inputs["mode"].tooltip for m in MODES)
        assert (inputs["start_percent"].default, inputs["end_percent"].default) == (0.0, 1.0)
        assert all(inputs[k].optional for k in ("mode", "autoguidance_scale", "start_percent", "end_percent"))
