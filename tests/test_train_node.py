"""'Self-NPO Train (TDFT)' inside ComfyUI: run by ComfyUI's executor (under torch.inference_mode()),
reporting progress with previews, feeding its MODEL output to the Self-NPO guider in the same
workflow, resuming by name, and turning a cancel into a resumable checkpoint + ComfyUI's interrupt."""
from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import safetensors.torch
import torch

import comfy.model_management
import comfy.utils
from comfy_exec import run_prompt
from cli_setup import TINY_OVERRIDES_TEXT, PROMPTS

NAME = "node_run"


class ProgressRecorder:
    """Stands in for the server's progress hook (main.py's hijack_progress), which also raises
    InterruptProcessingException when the user pressed cancel."""

    def __init__(self, cancel_at: int | None = None):
        self.calls = []
        self.cancel_at = cancel_at
        self.cancel_total = None  # cancel only on reports of this total (training steps, not the pre-roll)
        self.cancelled_at = None

    def __call__(self, value, total, preview, node_id=None, prompt_id=None):
        self.calls.append((value, total, preview, torch.is_inference_mode_enabled()))
        counts = self.cancel_total is None or total == self.cancel_total
        if self.cancel_at is not None and counts and value >= self.cancel_at and self.cancelled_at is None:
            self.cancelled_at = value  # (ProgressBar throttles: the first report at or after cancel_at)
            comfy.model_management.interrupt_current_processing()  # the user presses cancel
        comfy.model_management.throw_exception_if_processing_interrupted()


@pytest.fixture
def progress():
    recorder = ProgressRecorder()
    comfy.utils.set_progress_bar_global_hook(recorder)
    yield recorder
    comfy.utils.set_progress_bar_global_hook(None)
    comfy.model_management.interrupt_current_processing(False)


def train_inputs(**changes) -> dict:
    inputs = dict(data_folder="", prompts="\n".join(PROMPTS), preset="lora-8gb", steps=3, learning_rate=1e-3,
                  lora_rank=4, teacher="preset", seed=3, output_name=NAME, save_every=2, preview_every=0,
                  overrides=TINY_OVERRIDES_TEXT)
    inputs.update(changes)
    return inputs


def run_dir(comfy_dirs) -> Path:
    return comfy_dirs["output"] / "self_npo_training" / NAME


def summary(comfy_dirs) -> dict:
    return json.loads((run_dir(comfy_dirs) / "summary.json").read_text())


def test_train_node_in_a_workflow_feeds_the_guider(comfy_registry, comfy_dirs, tiny, progress):

    tiny.save_checkpoint(str(comfy_dirs["checkpoints"] / "tiny.safetensors"), "sd15", seed=0)
    sample = lambda guider, prefix: {  # noqa: E731
        f"{prefix}_s": {"class_type": "SamplerCustomAdvanced",
                        "inputs": {"noise": ["noise", 0], "guider": [guider, 0], "sampler": ["sampler", 0],
                                   "sigmas": ["sigmas", 0], "latent_image": ["latent", 0]}},
        f"{prefix}_save": {"class_type": "SaveLatent", "inputs": {"samples": [f"{prefix}_s", 0], "filename_prefix": prefix}},
    }
    prompt = {
        "ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "tiny.safetensors"}},
        "train": {"class_type": "SelfNPOTrainTDFT",
                  "inputs": {"model": ["ckpt", 0], "clip": ["ckpt", 1], "vae": ["ckpt", 2],
                             **train_inputs(preview_every=3)}},
        "pos": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["ckpt", 1], "text": "a red cube"}},
        "neg": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["ckpt", 1], "text": ""}},
        "npo_guider": {"class_type": "SelfNPOCFGGuider",
                       "inputs": {"model": ["ckpt", 0], "negative_model": ["train", 0], "positive": ["pos", 0],
                                  "negative": ["neg", 0], "cfg": 5.0, "residency": "auto", "rank": 0}},
        "cfg_guider": {"class_type": "CFGGuider",
                       "inputs": {"model": ["ckpt", 0], "positive": ["pos", 0], "negative": ["neg", 0], "cfg": 5.0}},
        "noise": {"class_type": "RandomNoise", "inputs": {"noise_seed": 7}},
        "sampler": {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "euler"}},
        "sigmas": {"class_type": "BasicScheduler", "inputs": {"model": ["ckpt", 0], "scheduler": "normal",
                                                              "steps": 4, "denoise": 1.0}},
        "latent": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        **sample("npo_guider", "npo"), **sample("cfg_guider", "cfg"),
        "curve": {"class_type": "PreviewImage", "inputs": {"images": ["train", 2]}},
    }
    _, history = run_prompt(prompt)

    # it ran under ComfyUI's inference mode and reported every step, with a CFG | NPO-CFG preview
    assert progress.calls[0][3] is True
    steps_seen = [c[0] for c in progress.calls if c[1] == 3]
    # ComfyUI's ProgressBar throttles intermediate updates; the first and the last always arrive
    assert steps_seen[0] == 0 and steps_seen[-1] == 3 and steps_seen == sorted(steps_seen)
    previews = [c[2] for c in progress.calls if c[2] is not None and c[1] == 3]
    assert len(previews) == 1 and previews[0][0] == "PNG" and previews[0][1].width > previews[0][1].height

    # the weights are in the self_npo models folder, listed by the loader straight away
    weights = comfy_dirs["self_npo"] / f"{NAME}.safetensors"
    assert weights.is_file()
    from comfy_selfnpo.nodes.negative_model import list_npo_files

    assert f"self_npo/{NAME}.safetensors" in list_npo_files()
    s = summary(comfy_dirs)
    assert s["status"] == "finished" and s["step"] == 3 and s["paths"]["weights"] == str(weights)
    # the resolved recipe the node showed before training (the model family's, with the overrides' size)
    assert s["recipe"].startswith("recipe SD1.5 (authors) for SD1.x: w -1, unconditional input the empty prompt, 64 px")
    assert not list(comfy_dirs["self_npo"].rglob("*.pt"))  # checkpoints stay out of the models folder
    assert (run_dir(comfy_dirs) / "checkpoint" / "state.pt").is_file()

    # the guider sampled with the trained negative: same noise, different result than plain CFG
    npo = safetensors.torch.load_file(str(next(comfy_dirs["output"].rglob("npo_*.latent"))))["latent_tensor"]
    cfg = safetensors.torch.load_file(str(next(comfy_dirs["output"].rglob("cfg_*.latent"))))["latent_tensor"]
    assert torch.isfinite(npo).all() and torch.isfinite(cfg).all()
    assert (npo - cfg).abs().max() > 1e-4
    assert history["outputs"]["curve"]["images"]  # the loss curve IMAGE output


def test_train_node_resumes_by_name_and_refuses_changed_hyper_parameters(comfy_registry, comfy_dirs, tiny, progress):
    from comfy_selfnpo.nodes.train import SelfNPOTrainTDFT
    from comfy_selfnpo.training.errors import ResumeMismatch

    ckpt = tiny.build_checkpoint("sd15", seed=0)
    with torch.inference_mode():  # as ComfyUI's executor runs nodes
        out = SelfNPOTrainTDFT.execute(ckpt.model, ckpt.clip, vae=None, **train_inputs(steps=2))
        negative, path, curve, lora, loss_map = out.result
        assert len(loss_map["loss"]) == 2 and any(k.endswith("lora_up.weight") for k in lora)
        assert summary(comfy_dirs)["resumed_from_step"] is None
        first = safetensors.torch.load_file(path)

        out = SelfNPOTrainTDFT.execute(ckpt.model, ckpt.clip, vae=None, **train_inputs(steps=4))
        s = summary(comfy_dirs)
        assert s["resumed_from_step"] == 2 and s["step"] == 4
        second = safetensors.torch.load_file(out.result[1])
        assert any(not torch.equal(first[k], second[k]) for k in first)  # two more steps trained
        lines = (run_dir(comfy_dirs) / "loss.csv").read_text().strip().splitlines()
        assert [int(line.split(",")[0]) for line in lines[1:]] == [1, 2, 3, 4]
        # every save (every 2 steps) also exported the weights of that step next to the final file,
        # where the loader lists them
        from comfy_selfnpo.nodes.negative_model import list_npo_files

        steps = sorted(p.name for p in comfy_dirs["self_npo"].glob(f"{NAME}-step*.safetensors"))
        assert steps == [f"{NAME}-step000002.safetensors", f"{NAME}-step000004.safetensors"]
        assert f"self_npo/{NAME}-step000002.safetensors" in list_npo_files()
        step2 = safetensors.torch.load_file(str(comfy_dirs["self_npo"] / steps[0]))
        assert all(torch.equal(step2[k], first[k]) for k in first)

        before = (run_dir(comfy_dirs) / "checkpoint" / "state.pt").read_bytes()
        with pytest.raises(ResumeMismatch, match="lora_rank: checkpoint 4, now 8.*on_existing_run to start_over"):
            SelfNPOTrainTDFT.execute(ckpt.model, ckpt.clip, vae=None, **train_inputs(steps=4, lora_rank=8))
        assert (run_dir(comfy_dirs) / "checkpoint" / "state.pt").read_bytes() == before
    assert curve.shape == (1, 360, 640, 3) and 0 <= float(curve.min()) and float(curve.max()) <= 1
    # the MODEL output carries the trained weights: its unconditional prediction differs from the base
    from cli_setup import uncond_prediction

    assert (uncond_prediction(negative, ckpt.clip) - uncond_prediction(ckpt.model, ckpt.clip)).abs().max() > 1e-4


def test_train_node_cancel_saves_a_resumable_checkpoint_then_interrupts(comfy_registry, comfy_dirs, tiny, progress):
    from comfy_selfnpo.nodes.train import SelfNPOTrainTDFT

    ckpt = tiny.build_checkpoint("sd15", seed=0)
    progress.cancel_at, progress.cancel_total = 2, 5  # at training step 2 of 5
    with torch.inference_mode():
        with pytest.raises(comfy.model_management.InterruptProcessingException):
            SelfNPOTrainTDFT.execute(ckpt.model, ckpt.clip, vae=None, **train_inputs(steps=5, save_every=0))
    s = summary(comfy_dirs)
    assert progress.cancelled_at is not None and progress.cancelled_at < 5
    assert s["status"] == "cancelled" and s["step"] == progress.cancelled_at  # stopped at that step boundary
    assert (run_dir(comfy_dirs) / "checkpoint" / "state.pt").is_file()
    assert not (comfy_dirs["self_npo"] / f"{NAME}.safetensors").exists()
    assert not comfy.model_management.processing_interrupted()  # the next prompt can run

    progress.cancel_at = None
    with torch.inference_mode():
        SelfNPOTrainTDFT.execute(ckpt.model, ckpt.clip, vae=None, **train_inputs(steps=5, save_every=0))
    s = summary(comfy_dirs)
    assert s["status"] == "finished" and s["resumed_from_step"] == progress.cancelled_at and s["step"] == 5


def test_train_node_rejects_bad_overrides_before_training(comfy_registry, comfy_dirs, tiny):
    from comfy_selfnpo.nodes.train import SelfNPOTrainTDFT
    from comfy_selfnpo.training.session import OutputError

    ckpt = tiny.build_checkpoint("sd15", seed=0)
    with pytest.raises(ValueError, match="overrides line 2: unknown hyper-parameter 'batchsize'"):
        SelfNPOTrainTDFT.execute(ckpt.model, ckpt.clip, **train_inputs(overrides="steps = 2\nbatchsize = 4"))
    with pytest.raises(OutputError, match="not usable"):
        SelfNPOTrainTDFT.execute(ckpt.model, ckpt.clip, **train_inputs(output_name="../../x"))
    assert not run_dir(comfy_dirs).exists()


def test_train_node_out_of_memory_saves_and_says_how_to_fit(comfy_registry, comfy_dirs, tiny, monkeypatch):
    from comfy_selfnpo.nodes.train import SelfNPOTrainTDFT
    from comfy_selfnpo.training.trainer import TDFTTrainer

    real_step = TDFTTrainer.train_step

    def step_then_oom(self):  # a bare torch OOM from outside the forward passes (e.g. the optimizer)
        if self.step == 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 4.00 GiB")
        return real_step(self)

    monkeypatch.setattr(TDFTTrainer, "train_step", step_then_oom)
    ckpt = tiny.build_checkpoint("sd15", seed=0)
    with torch.inference_mode(), pytest.raises(RuntimeError, match="Out of memory.*LoRA preset.*batch_size"):
        SelfNPOTrainTDFT.execute(ckpt.model, ckpt.clip, **train_inputs(steps=3, save_every=0))
    s = summary(comfy_dirs)
    assert s["status"] == "out_of_memory" and s["step"] == 1
    assert (run_dir(comfy_dirs) / "checkpoint" / "state.pt").is_file()


def test_train_node_cancel_during_the_trajectory_preroll_stops_within_seconds(comfy_registry, comfy_dirs, tiny,
                                                                               progress):
    from comfy_selfnpo.nodes.train import SelfNPOTrainTDFT

    ckpt = tiny.build_checkpoint("sd15", seed=0)
    progress.cancel_at = 1  # the first progress report comes from the pre-roll of the 3000 trajectories
    overrides = TINY_OVERRIDES_TEXT.replace("trajectory_buffer = 2", "trajectory_buffer = 3000")
    started = time.monotonic()
    with torch.inference_mode(), pytest.raises(comfy.model_management.InterruptProcessingException):
        SelfNPOTrainTDFT.execute(ckpt.model, ckpt.clip, vae=None, **train_inputs(steps=5, overrides=overrides))
    assert time.monotonic() - started < 30  # the whole pre-roll takes minutes
    assert any(c[1] == 3000 for c in progress.calls)  # the pre-roll reported its own progress
    s = summary(comfy_dirs)
    assert s["status"] == "cancelled" and s["step"] == 0
    assert (run_dir(comfy_dirs) / "checkpoint" / "state.pt").is_file()
    assert not comfy.model_management.processing_interrupted()


def test_train_node_outputs_feed_cores_lora_and_loss_nodes_and_show_the_run_on_the_node(comfy_registry, comfy_dirs,
                                                                                      tiny, progress):
    """LORA_MODEL -> core's 'Load LoRA Model' (the negative without our loader), LOSS_MAP -> core's 'Plot
    Loss Graph'; the node shows its loss curve and a report; data picked from input/."""
    from PIL import Image

    from comfy_selfnpo.nodes.train import SelfNPOTrainTDFT
    from cli_setup import uncond_prediction
    from tdft_helpers import make_image_folder

    make_image_folder(comfy_dirs["input"] / "my_images", count=2)
    ckpt = tiny.build_checkpoint("sd15", seed=0)
    with torch.inference_mode():
        out = SelfNPOTrainTDFT.execute(ckpt.model, ckpt.clip, vae=ckpt.vae, input_folder="my_images",
                                       **train_inputs(steps=2, data_folder=""))
    negative, weights_path, curve, lora, loss_map = out.result
    assert summary(comfy_dirs)["config"]["resolution"] == 64 and len(loss_map["loss"]) == 2
    lora_nodes = comfy_registry.NODE_CLASS_MAPPINGS
    lora_model = lora_nodes["LoraModelLoader"]().execute(ckpt.model, lora, 1.0)
    lora_model = (lora_model.result if hasattr(lora_model, "result") else lora_model)[0]
    # core's LoRA loader and the node's negative MODEL patch the same tensors the same way: bit-identical
    # (measured with 1, 2 and 4 threads)
    assert torch.equal(uncond_prediction(lora_model, ckpt.clip), uncond_prediction(negative, ckpt.clip))
    assert (uncond_prediction(lora_model, ckpt.clip) - uncond_prediction(ckpt.model, ckpt.clip)).abs().max() > 1e-5
    plotted = lora_nodes["LossGraphNode"]().execute(loss_map, "selfnpo_loss")
    assert plotted.ui.as_dict()["images"]  # core's loss plot drew our LOSS_MAP
    shown = out.ui
    assert shown["images"] and "2/2 steps" in shown["text"][0] and "final loss" in shown["text"][0]
    with pytest.raises(ValueError, match="not both"):
        SelfNPOTrainTDFT.execute(ckpt.model, ckpt.clip, vae=ckpt.vae, input_folder="my_images",
                                 **train_inputs(steps=2, data_folder="/somewhere"))
