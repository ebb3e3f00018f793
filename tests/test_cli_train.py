"""`comfy-selfnpo-train` end to end, as a user runs it: a subprocess of the installed console script
on a tiny checkpoint written to disk with ComfyUI's own saver."""
from __future__ import annotations

import csv
import json
import shutil
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import comfy.sd
from cli_setup import (TINY_HPARAMS, run_cli, start_cli, summary, uncond_prediction, weights,
                       write_prompts)

STEPS = 8


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    from comfy_selfnpo import tiny_models

    folder = tmp_path_factory.mktemp("cli")
    tiny_models.save_checkpoint(str(folder / "tiny_sd15.safetensors"), "sd15", seed=0)
    write_prompts(folder)
    return folder


def train_args(workdir: Path, out: Path, *extra) -> list[str]:
    return ["--checkpoint", workdir / "tiny_sd15.safetensors", "--prompts", workdir / "prompts.txt",
            *TINY_HPARAMS, "--steps", STEPS, "--save-every", 2, "--seed", 5, "--output", out, *extra]


@pytest.fixture(scope="module")
def full_run(workdir):
    out = workdir / "full"
    proc = run_cli(train_args(workdir, out, "--preview-every", 4, "--preview-steps", 3, "--name", "neg"))
    assert proc.returncode == 0, proc.stderr
    return out, proc


def test_cli_trains_a_tiny_checkpoint_and_writes_every_run_file(full_run):
    out, proc = full_run
    weights_path = out / "neg.safetensors"
    assert proc.stdout.strip().splitlines()[-1] == str(weights_path)  # scripts can capture the path
    s = summary(out)
    assert s["status"] == "finished" and s["step"] == STEPS and s["steps"] == STEPS
    assert s["paths"]["weights"] == str(weights_path) and weights_path.is_file()
    assert s["peak_memory_bytes"] > 0 and s["seconds"] > 0
    assert s["config"]["mode"] == "lora" and s["config"]["learning_rate"] == 1e-3  # flag beat the preset
    with open(out / "loss.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == list(range(1, STEPS + 1))
    losses = [float(r["loss"]) for r in rows]
    assert all(torch.isfinite(torch.tensor(losses))) and s["final_loss"] == pytest.approx(losses[-1])
    assert Image.open(out / "loss.png").size == (640, 360)
    previews = sorted(p.name for p in (out / "previews").glob("*.png"))
    assert previews == ["step_000004.png", "step_000008.png"]
    # a preview is CFG | NPO-CFG of the same seed: the two halves differ once the LoRA is trained
    grid = torch.from_numpy(np.asarray(Image.open(out / "previews" / "step_000008.png").convert("L"), dtype=np.float32))
    assert grid.std() > 0
    assert (out / "checkpoint" / "state.pt").is_file()
    assert "TDFT" in proc.stderr or "finished" in proc.stderr


def test_cli_weights_load_through_comfyui_lora_loader_and_the_negative_model_loader(full_run, workdir, tiny, comfy_dirs,
                                                                                    comfy_registry):
    out, _ = full_run
    model, clip, _, _ = comfy.sd.load_checkpoint_guess_config(str(workdir / "tiny_sd15.safetensors"))
    lora = comfy.utils.load_torch_file(str(out / "neg.safetensors"))
    # ComfyUI's LoRA loader (what LoraLoader runs): every key must be applied
    lora_model, _ = comfy.sd.load_lora_for_models(model, clip, lora, 1.0, 0.0)
    applied = set(lora_model.patches)
    assert len(applied) == sum(1 for k in lora if k.endswith(".lora_down.weight")) > 0
    # the pack's loader node, from the self_npo models folder
    shutil.copy(out / "neg.safetensors", comfy_dirs["self_npo"] / "neg.safetensors")
    from comfy_selfnpo.nodes.negative_model import SelfNPONegativeModelLoader, list_npo_files

    assert "self_npo/neg.safetensors" in list_npo_files()
    negative = SelfNPONegativeModelLoader.execute(model, "self_npo/neg.safetensors", 1.0, 0.0).result[0]

    base_pred = uncond_prediction(model, clip)
    lora_pred = uncond_prediction(lora_model, clip)
    npo_pred = uncond_prediction(negative, clip)
    change = (lora_pred - base_pred).abs().max()
    assert change > 1e-4, "the trained weights do not change the unconditional prediction"
    assert torch.allclose(npo_pred, lora_pred, atol=1e-5 + 1e-3 * float(change))  # same weights either way
    assert torch.equal(uncond_prediction(model, clip), base_pred)  # the base MODEL was left alone


def test_cli_every_save_exports_usable_step_weights_and_keeps_the_last_few(full_run, workdir, comfy_dirs,
                                                                         comfy_registry):
    out, _ = full_run  # 8 steps, a save every 2, keep_last at its default 3
    from comfy_selfnpo.nodes.negative_model import SelfNPONegativeModelLoader
    from comfy_selfnpo.training.config import TDFTConfig

    assert TDFTConfig().keep_last == 3
    names = sorted(p.name for p in out.glob("neg-step*.safetensors"))
    assert names == ["neg-step000004.safetensors", "neg-step000006.safetensors", "neg-step000008.safetensors"]
    last, final = weights(out / names[-1]), weights(out / "neg.safetensors")
    assert all(torch.equal(last[k], final[k]) for k in final)  # the last save is the final weights
    earlier = weights(out / names[0])
    assert any(not torch.equal(earlier[k], final[k]) for k in final)  # an earlier step is its own
    meta = __import__("safetensors").safe_open(str(out / names[0]), "pt").metadata()
    assert meta["comfy_selfnpo.steps"] == "4"
    model, clip, _, _ = comfy.sd.load_checkpoint_guess_config(str(workdir / "tiny_sd15.safetensors"))
    lora_model, _ = comfy.sd.load_lora_for_models(model, clip, earlier, 1.0, 0.0)
    assert len(lora_model.patches) == sum(1 for k in earlier if k.endswith(".lora_down.weight")) > 0
    shutil.copy(out / names[0], comfy_dirs["self_npo"] / names[0])
    negative = SelfNPONegativeModelLoader.execute(model, f"self_npo/{names[0]}", 1.0, 0.0).result[0]
    change = (uncond_prediction(negative, clip) - uncond_prediction(model, clip)).abs().max()
    assert change > 1e-5
    torch.testing.assert_close(uncond_prediction(negative, clip), uncond_prediction(lora_model, clip),
                               rtol=0, atol=1e-5 + 1e-3 * float(change))


def test_cli_keep_last_zero_keeps_every_step_file(workdir):
    out = workdir / "keep-all"
    proc = run_cli(["--checkpoint", workdir / "tiny_sd15.safetensors", "--prompts", workdir / "prompts.txt",
                    *TINY_HPARAMS, "--steps", 4, "--save-every", 1, "--keep-last", 0, "--output", out])
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in out.glob("self_npo-step*.safetensors")) == [
        f"self_npo-step00000{i}.safetensors" for i in range(1, 5)]


def test_cli_sigint_then_resume_gives_the_uninterrupted_weights(full_run, workdir):
    out_full, _ = full_run
    out = workdir / "interrupted"
    proc = start_cli(train_args(workdir, out, "--name", "neg"))
    deadline = time.monotonic() + 180
    while not (out / "checkpoint" / "state.pt").is_file():  # first periodic save (step 2)
        assert proc.poll() is None, proc.communicate()[1]
        assert time.monotonic() < deadline
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert "SIGINT received" in stderr and "--resume" in stderr
    s = summary(out)
    assert s["status"] == "cancelled" and 2 <= s["step"] < STEPS, s
    assert not (out / "neg.safetensors").exists()  # no half-finished export pretending to be done

    resumed = run_cli(train_args(workdir, out, "--name", "neg", "--resume"))
    assert resumed.returncode == 0, resumed.stderr
    assert summary(out)["resumed_from_step"] == s["step"]
    a, b = weights(out_full / "neg.safetensors"), weights(out / "neg.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    with open(out / "loss.csv") as f1, open(out_full / "loss.csv") as f2:
        resumed_losses = [float(r["loss"]) for r in csv.DictReader(f1)]
        full_losses = [float(r["loss"]) for r in csv.DictReader(f2)]
    assert resumed_losses == full_losses  # resume is not off by one


def test_cli_demo_shortened_trains_the_digits_model_and_writes_a_measured_grid(tmp_path):
    out = tmp_path / "demo"
    # a high learning rate: three steps must move the negative model enough to change samples
    proc = run_cli(["--demo", "--steps", 3, "--batch-size", 4, "--trajectory-buffer", 4, "--learning-rate", 1e-3, "--no-progress",
                    "--output", out])
    assert proc.returncode == 0, proc.stderr
    s = summary(out)
    assert s["status"] == "finished" and s["step"] == 3
    grid_path = Path(s["paths"]["demo_grid"])
    assert grid_path == out / "demo_grid.png"
    tensors = weights(out / "self_npo.safetensors")
    assert any(k.endswith(".diff") and v.abs().max() > 0 for k, v in tensors.items())  # a weight offset
    meta = json.loads(__import__("safetensors").safe_open(str(out / "self_npo.safetensors"), "pt").metadata()["comfy_selfnpo.config"])
    assert meta["mode"] == "full" and meta["steps"] == 3
    # the shipped digits model draws the digit it is asked for; the judge's numbers reach the user
    demo = s["demo"]
    assert demo["cfg"] == 1.5
    cfg, npo = demo["scores"]["CFG"], demo["scores"]["NPO-CFG"]
    assert cfg["accuracy"] > 0.8 and npo["accuracy"] > 0.8
    assert 0 < cfg["fd"] < 60 and 0 < npo["fd"] < 60  # uniform noise scores FD > 400 (bench/quality.py)
    assert cfg != npo  # the grid's right column really ran the negative model
    assert f"CFG: FD {cfg['fd']:.1f}, {100 * cfg['accuracy']:.0f}% right digit" in proc.stderr
    # and what a user is told to look for: a slight difference, a flat and noisy loss by nature
    assert "most digits look alike" in proc.stderr and "flat and noisy by nature" in proc.stderr
    from comfy_selfnpo.images import grid_cell_box

    grid = Image.open(grid_path).convert("RGB")
    cell_w, cell_h = (4 * 33 + 1) * 2, (8 * 4 + 2) * 2  # four 8x8 digits at 4x with 1 px gaps, at scale 2
    rows = (grid.height - 18 - 4) // (cell_h + 4)
    assert rows == 10  # a row per digit
    differs = 0
    for r in range(rows):
        cfg_cell = torch.from_numpy(np.asarray(grid.crop(grid_cell_box(r, 0, cell_w, cell_h, True)), dtype=np.float32))
        npo_cell = torch.from_numpy(np.asarray(grid.crop(grid_cell_box(r, 1, cell_w, cell_h, True)), dtype=np.float32))
        assert cfg_cell.std() > 20 and npo_cell.std() > 20  # strokes on a dark ground, not a flat image
        differs += int((cfg_cell - npo_cell).abs().max() > 0)
    assert differs >= 1


def test_loss_trend_is_a_centred_rolling_median_that_ignores_the_first_large_steps():
    from comfy_selfnpo.images import loss_plot, loss_trend

    losses = [5.0, 4.0] + [0.1 + 0.01 * (i % 3) for i in range(98)]  # two large first steps, then flat noise
    trend = loss_trend(losses)
    assert len(trend) == 100
    # window 11 (a tenth of the run, made odd): at step 0 the median of the first 6 values, not their mean
    first6 = sorted(losses[:6])
    assert trend[0] == (first6[2] + first6[3]) / 2 and trend[0] < 0.2
    assert trend[50] == sorted(losses[45:56])[5]
    assert loss_trend([1.0, 9.0, 2.0], window=3) == [5.0, 2.0, 5.5]
    image = loss_plot(list(range(1, 101)), losses)
    assert image.size == (640, 360) and len(set(image.getdata())) > 3


def test_cli_defaults_to_lora_12gb_writes_sample_prompt_rows_and_tensorboard_and_starts_quietly(workdir, tmp_path):
    """No --preset: lora-12gb's values where no flag is given. --sample-prompts: a preview row per
    prompt with its own seed/negative/cfg. --tensorboard: the loss of every step. ComfyUI's start-up
    warnings about optional packages (torchaudio, comfy_kitchen) stay out of the terminal."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from comfy_selfnpo.training.config import DEFAULT_PRESET, PRESETS

    samples = tmp_path / "samples.txt"
    samples.write_text("# kohya sample prompts\na red cube --d 3 --l 4.5\n\na portrait of a cat --n blurry --s 2\n")
    out, board = tmp_path / "run", tmp_path / "tb"
    proc = run_cli(["--checkpoint", workdir / "tiny_sd15.safetensors", "--prompts", workdir / "prompts.txt",
                    "--resolution", 64, "--batch-size", 1, "--grad-accum", 1, "--trajectory-buffer", 2,
                    "--no-gradient-checkpointing", "--mixed-precision", "no", "--no-progress", "--steps", 2,
                    "--preview-every", 2, "--preview-steps", 3, "--sample-prompts", samples,
                    "--tensorboard", board, "--output", out])
    assert proc.returncode == 0, proc.stderr
    config = summary(out)["config"]
    preset = PRESETS[DEFAULT_PRESET]
    for name in ("lora_rank", "lora_alpha", "lora_targets", "mode", "output_format"):
        assert config[name] == preset[name], name
    assert config["batch_size"] == 1 and DEFAULT_PRESET == "lora-12gb"
    # the recipe from the model's family (SD1.5): w, unconditional input; a LoRA's learning rate
    assert (config["corruption_guidance"], config["uncond"], config["learning_rate"]) == (-1.0, "empty_prompt", 1e-4)
    for noise in ("torchaudio", "comfy_kitchen", "Traceback"):
        assert noise not in proc.stderr, proc.stderr

    from comfy_selfnpo.images import GRID_HEADER, GRID_PAD

    grid = Image.open(out / "previews" / "step_000002.png")
    cell = 256  # 64 px previews scaled to 256
    assert (grid.height - GRID_HEADER - GRID_PAD) // (cell + GRID_PAD) == 2  # one row per sample prompt

    events = EventAccumulator(str(board))
    events.Reload()
    logged = [(e.step, e.value) for e in events.Scalars("tdft/loss")]
    with open(out / "loss.csv") as f:
        written = [(int(r["step"]), float(r["loss"])) for r in csv.DictReader(f)]
    assert [s for s, _ in logged] == [1, 2]
    assert [v for _, v in logged] == pytest.approx([v for _, v in written], rel=1e-6)
    assert "previews/cfg_vs_npo" in events.Tags()["images"]
