"""Every bad input of `comfy-selfnpo-train` gets its own clear message, a non-zero exit status, and
no earlier file is damaged. These call the CLI's `main()` in-process (the same code the console
script runs, minus ~4 s of ComfyUI import per case) on real files and the real trainer."""
from __future__ import annotations

import errno
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cli_setup import TINY_HPARAMS, base_args, files, run, snapshot, summary, write_image, write_prompts  # noqa: F401
from comfy_selfnpo.training import cli


# ------------------------------------------------------------------ model files

def test_missing_checkpoint(files, capsys):
    code, err = run(capsys, *base_args(files, files / "out"), "--checkpoint", files / "nope.safetensors")
    assert code == cli.EXIT_INPUT
    assert "checkpoint file not found" in err and "nope.safetensors" in err
    assert not (files / "out" / "checkpoint").exists()


def test_corrupt_checkpoint(files, capsys):
    broken = files / "broken.safetensors"
    good = (files / "tiny.safetensors").read_bytes()
    broken.write_bytes(good[: len(good) // 3])  # a download that stopped a third of the way
    code, err = run(capsys, *base_args(files, files / "out"), "--checkpoint", broken)
    assert code == cli.EXIT_INPUT
    assert "damaged or not a model file" in err and "broken.safetensors" in err


def test_unsupported_architecture(files, capsys):
    import safetensors.torch

    odd = files / "odd.safetensors"
    safetensors.torch.save_file({"encoder.layer.0.weight": torch.ones(4, 4)}, str(odd))
    code, err = run(capsys, *base_args(files, files / "out"), "--checkpoint", odd)
    assert code == cli.EXIT_INPUT
    assert "does not recognise" in err and "odd.safetensors" in err and "architecture" in err


# ------------------------------------------------------------------ data

def test_empty_data_folder(files, capsys):
    empty = files / "empty"
    empty.mkdir()
    code, err = run(capsys, *base_args(files, files / "out", data=empty))
    assert code == cli.EXIT_INPUT
    assert "no usable training image" in err and "no image files" in err


def test_unreadable_image_is_skipped_and_missing_caption_is_empty_with_warnings(files, capsys):
    data = files / "images"
    data.mkdir()
    write_image(data / "a.png", 0, "a red cube")
    write_image(data / "b.png", 1)  # no caption
    (data / "c.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    out = files / "out"
    code, err = run(capsys, *base_args(files, out, steps=1, data=data))
    assert code == cli.EXIT_OK, err
    assert "skipped 1 unreadable image" in err and "c.png" in err
    assert "have no .txt caption" in err and "b.png" in err
    assert summary(out)["status"] == "finished"


def test_no_readable_image_left_stops(files, capsys):
    data = files / "broken_images"
    data.mkdir()
    (data / "x.jpg").write_bytes(b"garbage")
    code, err = run(capsys, *base_args(files, files / "out", data=data))
    assert code == cli.EXIT_INPUT
    assert "none readable" in err and "skipped 1 unreadable" in err


def test_empty_prompts_file(files, capsys):
    (files / "blank.txt").write_text("\n  \n")
    code, err = run(capsys, *base_args(files, files / "out"), "--prompts", files / "blank.txt")
    assert code == cli.EXIT_INPUT and "has no non-empty line" in err


# ------------------------------------------------------------------ output

def test_output_folder_not_writable(files, capsys):
    blocker = files / "a_file"
    blocker.write_text("keep me")
    code, err = run(capsys, *base_args(files, blocker / "run"))
    assert code == cli.EXIT_WRITE
    assert "cannot write to the output folder" in err
    assert blocker.read_text() == "keep me"


def test_disk_full_during_save_keeps_the_previous_checkpoint(files, capsys, monkeypatch):
    out = files / "out"
    code, err = run(capsys, *base_args(files, out, steps=2))
    assert code == cli.EXIT_OK, err
    before = snapshot(out)
    state = out / "checkpoint" / "state.pt"
    real_fsync = os.fsync

    def fsync_disk_full(fd):  # the checkpoint's bytes cannot reach the disk
        if os.readlink(f"/proc/self/fd/{fd}").startswith(str(state.parent / ".state.pt")):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync_disk_full)
    code, err = run(capsys, *base_args(files, out, "--resume", steps=4))
    assert code == cli.EXIT_WRITE
    assert "disk is full" in err and "resumable checkpoint of step 2" in err and "is intact" in err
    after = snapshot(out)
    for name in ("checkpoint/state.pt", "self_npo.safetensors"):
        assert after[name] == before[name], name  # intact, byte for byte
    assert not [p for p in (out / "checkpoint").iterdir() if p.name != "state.pt"]  # no temp litter
    assert summary(out)["status"] == "write_failed"
    monkeypatch.setattr(os, "fsync", real_fsync)
    code, err = run(capsys, *base_args(files, out, "--resume", steps=4))  # space is back: resume works
    assert code == cli.EXIT_OK, err
    assert summary(out)["step"] == 4 and summary(out)["resumed_from_step"] == 2


# ------------------------------------------------------------------ resume

def test_resume_refuses_another_base_model_and_an_existing_run_without_resume(files, capsys, tiny):
    out = files / "out"
    code, err = run(capsys, *base_args(files, out))
    assert code == cli.EXIT_OK, err
    before = snapshot(out)

    tiny.save_checkpoint(str(files / "other.safetensors"), "sd15", seed=9)
    code, err = run(capsys, *base_args(files, out, "--resume"), "--checkpoint", files / "other.safetensors")
    assert code == cli.EXIT_MISMATCH
    assert "base model: checkpoint" in err and "damaged" not in err and "delete" not in err

    code, err = run(capsys, *base_args(files, out))  # same run again without --resume
    assert code == cli.EXIT_EXISTS
    assert "already holds a training checkpoint" in err and "--resume" in err and "delete" not in err
    assert snapshot(out) == before  # nothing of the finished run was touched


def test_resume_without_a_checkpoint(files, capsys):
    code, err = run(capsys, *base_args(files, files / "fresh", "--resume"))
    assert code == cli.EXIT_INPUT and "no checkpoint to resume from" in err


# ------------------------------------------------------------------ memory

def test_out_of_memory_saves_a_checkpoint_and_prints_a_hint(files, capsys, monkeypatch):
    from comfy_selfnpo.training.trained import LoRAWeights

    real_forward, calls = LoRAWeights.student_forward, []

    def forward_then_oom(self, *args):  # the second step's student forward pass does not fit
        calls.append(1)
        if len(calls) == 3:  # call 1: the trainer's set-up probe, call 2: step 1
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_forward(self, *args)

    monkeypatch.setattr(LoRAWeights, "student_forward", forward_then_oom)
    out = files / "out"
    code, err = run(capsys, *base_args(files, out, "--save-every", 0, steps=3))
    assert code == cli.EXIT_OOM
    for hint in ("Out of memory", "LoRA preset", "batch_size", "gradient_checkpointing", "resolution"):
        assert hint in err
    s = summary(out)
    assert s["status"] == "out_of_memory" and s["step"] == 1
    assert s["paths"]["checkpoint"] and (out / "checkpoint" / "state.pt").is_file()
    assert torch.load(out / "checkpoint" / "state.pt", weights_only=True)["step"] == 1  # the state before the step


# ------------------------------------------------------------------ arguments and config

def test_toml_config_fills_options_and_flags_win(files, capsys):
    toml = files / "run.toml"
    toml.write_text(f'checkpoint = "{files / "tiny.safetensors"}"\nprompts = "{files / "prompts.txt"}"\n'
                    'preset = "lora-8gb"\nname = "from_toml"\nno_progress = true\n'
                    '[hyperparameters]\nsteps = 1\nresolution = 64\nbatch_size = 1\ngrad_accum = 1\n'
                    'learning_rate = 0.01\nlora_rank = 2\ntrajectory_buffer = 2\ngradient_checkpointing = false\n'
                    'mixed_precision = "no"\n')
    out = files / "out"
    code, err = run(capsys, "--config", toml, "--learning-rate", "0.002", "--output", out)
    assert code == cli.EXIT_OK, err
    config = summary(out)["config"]
    assert config["steps"] == 1 and config["lora_rank"] == 2  # from the file
    assert config["learning_rate"] == 0.002                    # the flag wins
    assert config["lora_targets"] == "attn"                    # the preset fills the rest
    assert (out / "from_toml.safetensors").is_file()


@pytest.mark.parametrize("content, message", [
    ('stepz = 3\n', "unknown option 'stepz'"),
    ('steps = "many"\n', "steps='many' is not a valid int"),
    ('steps = [1\n', "is not valid TOML"),
])
def test_bad_toml_config(files, capsys, content, message):
    toml = files / "bad.toml"
    toml.write_text(content)
    code, err = run(capsys, *base_args(files, files / "out"), "--config", toml)
    assert code == cli.EXIT_USAGE and message in err


def test_bad_arguments(files, capsys):
    code, err = run(capsys, *base_args(files, files / "out"), "--data", files)
    assert code == cli.EXIT_USAGE and "either --data DIR or --prompts FILE" in err
    code, err = run(capsys, "--prompts", files / "prompts.txt")
    assert code == cli.EXIT_USAGE and "no model" in err
    code, err = run(capsys, *base_args(files, files / "out"), "--truncation-steps", 30)
    assert code == cli.EXIT_USAGE and "truncation_steps=30 must be smaller than grid_size=25" in err
    code, err = run(capsys, *base_args(files, files / "out"), "--name", "../escape")
    assert code == cli.EXIT_USAGE and "not usable" in err
    code, err = run(capsys, "--preset", "sd99")
    assert code == cli.EXIT_USAGE and "invalid choice" in err
    assert not (files / "out").exists()


# ------------------------------------------------------------------ separate model files

def test_separate_diffusion_model_and_vae_files_replace_the_checkpoint_parts(files, capsys, tiny):
    import comfy.utils
    from comfy_selfnpo.training.identity import model_identity

    other = tiny.build_checkpoint("sd15", seed=3)
    comfy.utils.save_torch_file(other.model.model.diffusion_model.state_dict(), str(files / "unet.safetensors"))
    comfy.utils.save_torch_file(other.vae.first_stage_model.state_dict(), str(files / "vae.safetensors"))
    out = files / "out"
    code, err = run(capsys, *base_args(files, out, steps=1), "--diffusion-model", files / "unet.safetensors",
                    "--vae", files / "vae.safetensors")
    assert code == cli.EXIT_OK, err
    s = summary(out)
    assert s["model"] == "checkpoint tiny.safetensors, diffusion model unet.safetensors, VAE vae.safetensors"
    assert s["base_model_hash"] == model_identity(other.model)  # trained the separate UNet ...
    assert s["base_model_hash"] != model_identity(tiny.build_model("sd15", seed=0))  # ... not the checkpoint's

    (files / "bad_vae.safetensors").write_bytes(b"\x00" * 64)
    code, err = run(capsys, *base_args(files, files / "out2"), "--vae", files / "bad_vae.safetensors")
    assert code == cli.EXIT_INPUT and "cannot read the VAE" in err


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(files, capsys):
    out = files / "out"
    code, err = run(capsys, *base_args(files, out, steps=6), "--learning-rate", "1e30", "--max-grad-norm", "0")
    assert code == cli.EXIT_NONFINITE
    assert "the TDFT loss became" in err and "lower the learning rate" in err
    s = summary(out)
    assert s["status"] == "non_finite_loss" and 1 <= s["step"] < 6
    import torch as _torch

    state = _torch.load(out / "checkpoint" / "state.pt", weights_only=True)
    assert state["step"] == s["step"]  # the last good step, saved before the bad one
    assert all(_torch.isfinite(_torch.tensor(loss)) for loss in state["losses"])
    assert not (out / "self_npo.safetensors").exists()


def test_a_failing_preview_warns_and_training_goes_on(files, capsys):
    out = files / "out"
    # learning rate 0: the negative model equals the base, which the Self-NPO guider refuses to sample
    code, err = run(capsys, *base_args(files, out, "--preview-every", 1, "--preview-steps", 2, steps=2),
                    "--learning-rate", "0")
    assert code == cli.EXIT_OK, err
    assert "preview at step 1 failed" in err and "training goes on" in err
    assert summary(out)["status"] == "finished" and (out / "self_npo.safetensors").is_file()
