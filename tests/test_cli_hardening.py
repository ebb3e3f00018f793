"""Defects found by a hostile run of bad inputs and faults against `comfy-selfnpo-train` (issue 12, B):
each drives the real CLI (in-process `main()`, or the console script where signals or a second
process are involved) as a user would, and fails on the code before the fix."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import safetensors
import safetensors.torch
import torch
from PIL import Image

from cli_setup import (TINY_HPARAMS, base_args, files, run, snapshot, start_cli, summary,  # noqa: F401
                       weights, write_image)
from comfy_selfnpo.training import cli


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def state(out: Path) -> dict:
    return torch.load(out / "checkpoint" / "state.pt", weights_only=True)


# ------------------------------------------------------------------ B1 base-model identity


def test_model_identity_is_exact_across_thread_counts_and_patch_merging(tiny):
    """The old hash printed a float32 sum to 7 digits: large tensors summed with 1 or 2 threads differ."""
    import comfy.lora
    import comfy.model_management

    from comfy_selfnpo.training.identity import model_identity

    model = tiny.build_model("sd15", seed=0)
    model.model.diffusion_model.register_buffer(
        "big", torch.randn(3_000_000, generator=torch.Generator().manual_seed(1)))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = model_identity(model)
        torch.set_num_threads(2)
        two = model_identity(model)
    finally:
        torch.set_num_threads(threads)
    assert one == two
    # with a LoRA: the same identity whether ComfyUI has merged the patch into the weights or not
    key = "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight"
    weight = model.model.state_dict()[key]
    lora = {"lora_unet_x.lora_up.weight": torch.ones(weight.shape[0], 2),
            "lora_unet_x.lora_down.weight": torch.ones(2, weight.shape[1]) * 0.01}
    patched = model.clone()
    patched.add_patches(comfy.lora.load_lora(lora, {"lora_unet_x": key}), 1.0)
    before = model_identity(patched)
    comfy.model_management.load_models_gpu([patched], force_full_load=True)  # merges the patch in place
    assert not torch.equal(model.model.state_dict()[key], weight)
    assert model_identity(patched) == before != one


def test_resume_after_a_thread_count_change(files, capsys):
    out = files / "out"
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        code, err = run(capsys, *base_args(files, out, steps=1))
        assert code == cli.EXIT_OK, err
        torch.set_num_threads(2)  # taskset, a container CPU limit, OMP_NUM_THREADS ...
        code, err = run(capsys, *base_args(files, out, "--resume", steps=2))
    finally:
        torch.set_num_threads(threads)
    assert code == cli.EXIT_OK, err
    assert summary(out)["resumed_from_step"] == 1 and summary(out)["step"] == 2


# ------------------------------------------------------------------ B2 a full disk


class FullDisk:
    """A small tmpfs the test can fill at will (mounted where the machine allows it); otherwise the
    exact exceptions torch.save and safetensors raise on a full disk, injected at the writers, with
    the filesystem reporting no free space."""

    def __init__(self, folder: Path, monkeypatch):
        self.folder, self.monkeypatch = folder, monkeypatch
        folder.mkdir(parents=True)
        self.mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(folder)],
                                      capture_output=True).returncode == 0
        self.full = False

    def fill(self) -> None:
        self.full = True
        if self.mounted:
            with open(self.folder / "filler", "wb") as f:
                try:
                    while True:
                        f.write(b"\0" * 65536)
                except OSError:
                    pass
            return
        import shutil as sh
        from collections import namedtuple

        usage = namedtuple("usage", "total used free")
        self.monkeypatch.setattr(sh, "disk_usage", lambda path: usage(8 << 20, 8 << 20, 0))

    def free(self) -> None:
        self.full = False
        (self.folder / "filler").unlink(missing_ok=True)
        self.monkeypatch.undo()

    def injected(self, real, exception):
        """`real` (a writer) that raises `exception` while the (simulated) disk is full."""
        def write(*args, **kwargs):
            if self.full and not self.mounted:
                raise exception
            return real(*args, **kwargs)
        return write

    def close(self) -> None:
        if self.mounted:
            subprocess.run(["umount", str(self.folder)], capture_output=True)


@pytest.fixture
def full_disk(tmp_path, monkeypatch):
    disk = FullDisk(tmp_path / "disk", monkeypatch)
    yield disk
    disk.close()


def test_full_disk_during_the_final_export_keeps_the_run_resumable(files, capsys, full_disk, monkeypatch):
    """save_every 0 (every preset): the state is saved before the export, which then fails."""
    import safetensors.torch as st

    from comfy_selfnpo.training import export

    real_write = export.write

    def fill_then_write(*args, **kwargs):
        full_disk.fill()
        return real_write(*args, **kwargs)

    monkeypatch.setattr(export, "write", fill_then_write)
    monkeypatch.setattr(st, "save_file", full_disk.injected(st.save_file, safetensors.SafetensorError(
        "Error while serializing: I/O error: No space left on device (os error 28)")))
    out = full_disk.folder / "run"
    code, err = run(capsys, *base_args(files, out, "--save-every", 0, steps=2))
    assert code == cli.EXIT_WRITE, err
    assert "Traceback" not in err
    assert "disk is full while writing" in err and "self_npo.safetensors" in err
    assert "resumable checkpoint of step 2" in err and "is intact" in err
    assert state(out)["step"] == 2
    assert not (out / "self_npo.safetensors").exists() and not list(out.glob(".*.tmp"))
    full_disk.free()
    monkeypatch.setattr(export, "write", real_write)
    code, err = run(capsys, *base_args(files, out, "--save-every", 0, "--resume", steps=2))
    assert code == cli.EXIT_OK, err
    assert (out / "self_npo.safetensors").is_file() and summary(out)["status"] == "finished"


def test_full_disk_in_torch_save_keeps_the_previous_checkpoint(files, capsys, full_disk, monkeypatch):
    from comfy_selfnpo.training import checkpoint

    real_write = checkpoint.write

    def fill_before_step_2(folder, identity, parts):
        if parts["step"] == 2:
            full_disk.fill()
        return real_write(folder, identity, parts)

    monkeypatch.setattr(checkpoint, "write", fill_before_step_2)
    monkeypatch.setattr(torch, "save", full_disk.injected(torch.save, RuntimeError(
        "[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")))
    out = full_disk.folder / "run"
    code, err = run(capsys, *base_args(files, out, steps=3))
    assert code == cli.EXIT_WRITE, err
    assert "Traceback" not in err and "disk is full while writing" in err and "state.pt" in err
    assert "resumable checkpoint of step 1" in err
    assert state(out)["step"] == 1
    assert [p.name for p in (out / "checkpoint").iterdir()] == ["state.pt"]


# ------------------------------------------------------------------ B3 temp files of killed saves


def test_temp_files_left_by_a_killed_save_are_removed(files, capsys):
    out = files / "out"
    code, err = run(capsys, *base_args(files, out, steps=1))
    assert code == cli.EXIT_OK, err
    pid = dead_pid()  # what kill -9 during a save leaves: the writer is gone, its temp file is not
    leftovers = [out / "checkpoint" / f".state.pt.{pid}.k3j2.tmp", out / "checkpoint" / ".state.pt.a1b2c3d4.tmp",
                 out / f".self_npo.safetensors.{pid}.x.tmp"]
    for path in leftovers:
        path.write_bytes(b"\0" * 4096)
    alive = out / "checkpoint" / f".state.pt.{os.getpid()}.live.tmp"  # a write in progress is left alone
    alive.write_bytes(b"")
    code, err = run(capsys, *base_args(files, out, "--resume", steps=2))
    assert code == cli.EXIT_OK, err
    assert not any(p.exists() for p in leftovers) and alive.exists()


# ------------------------------------------------------------------ B4 one run per output folder


def test_a_second_run_on_the_same_output_folder_is_refused_while_the_first_runs(files, capsys):
    out = files / "out"
    first = start_cli(base_args(files, out, steps=500))
    try:
        deadline = time.monotonic() + 120
        while not (out / "checkpoint" / "state.pt").is_file():
            assert first.poll() is None and time.monotonic() < deadline
            time.sleep(0.1)
        before = state(out)["step"]
        code, err = run(capsys, *base_args(files, out, "--resume", steps=500))
        assert code == cli.EXIT_WRITE
        assert "in use by another training run" in err and f"pid {first.pid}" in err
        assert not (out / "self_npo.safetensors").exists() and state(out)["step"] >= before
    finally:
        first.kill()  # kill -9: the OS releases the lock with the process
        first.communicate()
    code, err = run(capsys, *base_args(files, out, "--resume", steps=state(out)["step"] + 1))
    assert code == cli.EXIT_OK, err


# ------------------------------------------------------------------ B5 output inside the data


def test_an_output_folder_inside_the_data_folder_is_refused(files, capsys):
    data = files / "images"
    data.mkdir()
    write_image(data / "a.png", 0, "a red cube")
    before = snapshot(data)
    code, err = run(capsys, *base_args(files, data / "runs" / "npo", data=data))
    assert code == cli.EXIT_WRITE and "inside the training data folder" in err
    assert snapshot(data) == before and not (data / "runs").exists()


# ------------------------------------------------------------------ B6 resume with other data


def test_resume_with_other_prompts_or_images_is_refused_unless_accepted(files, capsys):
    out = files / "out"
    code, err = run(capsys, *base_args(files, out, steps=1))
    assert code == cli.EXIT_OK, err
    prompts = files / "prompts.txt"
    prompts.write_text("a green pyramid\na yellow sphere on grass\na portrait of a dog\n")  # same count
    code, err = run(capsys, *base_args(files, out, "--resume", steps=2))
    assert code == cli.EXIT_MISMATCH and "data: other prompts or captions" in err and "--allow-data-change" in err
    code, err = run(capsys, *base_args(files, out, "--resume", "--allow-data-change", steps=2))
    assert code == cli.EXIT_OK, err

    data = files / "images"
    data.mkdir()
    for i in range(2):
        write_image(data / f"{i}.png", i, "a red cube")
    out = files / "out-images"
    code, err = run(capsys, *base_args(files, out, data=data, steps=1))
    assert code == cli.EXIT_OK, err
    write_image(data / "1.png", 7, "a red cube")  # other pixels, same name and caption
    code, err = run(capsys, *base_args(files, out, "--resume", data=data, steps=2))
    assert code == cli.EXIT_MISMATCH and "data: other images or captions" in err
    write_image(data / "1.png", 1, "a red cube")  # the original pixels again
    moved = files / "moved"
    shutil.copytree(data, moved)  # the same content elsewhere is the same data
    code, err = run(capsys, *base_args(files, out, "--resume", data=moved, steps=2))
    assert code == cli.EXIT_OK, err


# ------------------------------------------------------------------ B8 hyper-parameters


@pytest.mark.parametrize("flag, value, message", [
    ("--corruption-guidance", "nan", "corruption_guidance must be a finite number"),
    ("--corruption-guidance", "inf", "corruption_guidance must be a finite number"),
    ("--huber-c", "inf", "huber_c must be a finite number"),
    ("--adam-eps", "inf", "adam_eps must be a finite number"),
    ("--resolution", "8", "resolution must be >= 64"),
    ("--resolution", "16", "resolution must be >= 64"),
    ("--seed", "12345678901234567890", "seed must be < 9223372036854775808"),
])
def test_absurd_hyper_parameters_are_refused_naming_the_value(files, capsys, flag, value, message):
    code, err = run(capsys, *base_args(files, files / "out"), flag, value)
    assert code == cli.EXIT_USAGE and message in err, err
    assert not (files / "out").exists()


@pytest.mark.parametrize("line, message", [
    ('checkpoint = 5', "checkpoint must be text"),
    ('resume = "no"', "resume must be true or false"),
    ('device = "tpu"', "device='tpu' is not one of"),
    ('preview_every = "often"', "preview_every must be a number"),
])
def test_toml_options_of_the_wrong_type_are_refused(files, capsys, line, message):
    toml = files / "run.toml"
    toml.write_text(line + "\n")
    code, err = run(capsys, *base_args(files, files / "out"), "--config", toml)
    assert code == cli.EXIT_USAGE and message in err, err


def test_a_lora_rank_beyond_the_layers_is_capped_at_their_size(files, capsys):
    out = files / "out"
    code, err = run(capsys, *base_args(files, out, steps=1), "--lora-rank", 100000, "--lora-alpha", 100000)
    assert code == cli.EXIT_OK, err
    assert "lora_rank=100000 is larger than" in err
    tensors = weights(out / "self_npo.safetensors")
    downs = {k: v for k, v in tensors.items() if k.endswith(".lora_down.weight")}
    for key, down in downs.items():
        up = tensors[key.replace("lora_down", "lora_up")]
        assert down.shape[0] == min(up.shape[0], down.shape[1])  # full rank of that layer, no more
        alpha = float(tensors[key.replace(".lora_down.weight", ".alpha")])
        assert alpha / down.shape[0] == pytest.approx(1.0)  # the requested scale alpha/rank = 1
    assert (out / "self_npo.safetensors").stat().st_size < 5_000_000


def test_a_caption_extension_without_the_dot_finds_the_captions(files, capsys):
    data = files / "images"
    data.mkdir()
    write_image(data / "a.png", 0, "a red cube")
    out = files / "out"
    code, err = run(capsys, *base_args(files, out, data=data, steps=1), "--caption-extension", "txt")
    assert code == cli.EXIT_OK, err
    assert "no txt caption" not in err and "no .txt caption" not in err


# ------------------------------------------------------------------ B9 tracebacks


def test_a_corrupt_latent_cache_is_encoded_again(files, capsys):
    data = files / "images"
    data.mkdir()
    write_image(data / "a.png", 0, "a red cube")
    out = files / "out"
    code, err = run(capsys, *base_args(files, out, data=data, steps=1))
    assert code == cli.EXIT_OK, err
    cache = next((out / "cache").glob("latents-*.pt"))
    cache.write_bytes(cache.read_bytes()[:40])  # a crash while copying
    code, err = run(capsys, *base_args(files, out, "--resume", "--verbose", data=data, steps=2))
    assert code == cli.EXIT_OK, err
    assert "is unreadable" in err and "Traceback" not in err
    torch.load(cache, weights_only=True)  # written anew


def test_a_checkpoint_with_missing_parts_says_how_to_start_over(files, capsys):
    out = files / "out"
    code, err = run(capsys, *base_args(files, out, steps=1))
    assert code == cli.EXIT_OK, err
    damaged = state(out)
    del damaged["optimization"]
    torch.save(damaged, out / "checkpoint" / "state.pt")
    code, err = run(capsys, *base_args(files, out, "--resume", steps=2))
    assert code == cli.EXIT_INPUT and "Traceback" not in err
    assert "damaged or incomplete" in err and "To start over, delete" in err


def test_a_vae_given_as_text_encoder_is_refused(files, capsys, tiny):
    import comfy.utils

    ckpt = tiny.build_checkpoint("sd15", seed=0)
    comfy.utils.save_torch_file(ckpt.model.model.diffusion_model.state_dict(), str(files / "unet.safetensors"))
    comfy.utils.save_torch_file(ckpt.vae.first_stage_model.state_dict(), str(files / "vae.safetensors"))
    code, err = run(capsys, "--diffusion-model", files / "unet.safetensors", "--text-encoder", files / "vae.safetensors",
                    "--prompts", files / "prompts.txt", *TINY_HPARAMS, "--steps", 1, "--output", files / "out")
    assert code == cli.EXIT_INPUT and "vae.safetensors" in err and "is it a text encoder" in err, err


# ------------------------------------------------------------------ B10 messages and codes


def test_unreadable_prompts_and_caption_files_are_input_errors_not_write_errors(files, capsys, monkeypatch):
    real = Path.read_bytes

    def unreadable(self):
        if self.name in ("prompts.txt", "a.txt"):
            raise PermissionError(13, "Permission denied", str(self))
        return real(self)

    monkeypatch.setattr(Path, "read_bytes", unreadable)
    code, err = run(capsys, *base_args(files, files / "out"))
    assert code == cli.EXIT_INPUT and "cannot read the prompts file" in err and "Permission denied" in err
    data = files / "images"
    data.mkdir()
    write_image(data / "a.png", 0, "a red cube")
    code, err = run(capsys, *base_args(files, files / "out", data=data))
    assert code == cli.EXIT_INPUT and "cannot read the caption file" in err


def test_a_checkpoint_that_is_a_folder_or_unreadable_is_named_as_such(files, capsys, monkeypatch):
    (files / "folder.safetensors").mkdir()
    code, err = run(capsys, *base_args(files, files / "out"), "--checkpoint", files / "folder.safetensors")
    assert code == cli.EXIT_INPUT and "is a folder" in err
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if str(p).endswith("tiny.safetensors") else real_access(p, mode))
    code, err = run(capsys, *base_args(files, files / "out"))
    assert code == cli.EXIT_INPUT and "permission denied" in err


def test_images_behind_a_symlinked_folder_are_found(files, capsys):
    real = files / "real"
    real.mkdir()
    write_image(real / "a.png", 0, "a red cube")
    data = files / "data"
    data.mkdir()
    (data / "linked").symlink_to(real, target_is_directory=True)
    (real / "loop").symlink_to(data, target_is_directory=True)  # a link cycle does not hang the search
    code, err = run(capsys, *base_args(files, files / "out", data=data, steps=1))
    assert code == cli.EXIT_OK, err
    assert summary(files / "out")["step"] == 1


def test_a_truncated_checkpoint_says_how_to_start_over_with_and_without_resume(files, capsys):
    out = files / "out"
    code, err = run(capsys, *base_args(files, out, steps=1))
    assert code == cli.EXIT_OK, err
    path = out / "checkpoint" / "state.pt"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    code, err = run(capsys, *base_args(files, out, steps=1))
    assert code == cli.EXIT_EXISTS and "--resume" in err and "to start over" in err
    code, err = run(capsys, *base_args(files, out, "--resume", steps=2))
    assert code == cli.EXIT_INPUT and "damaged" in err and "To start over, delete" in err


def test_a_non_finite_loss_at_step_1_does_not_point_to_a_missing_checkpoint(files, capsys):
    out = files / "out"
    code, err = run(capsys, *base_args(files, out), "--corruption-guidance", "1e38")
    assert code == cli.EXIT_NONFINITE, err
    assert "at step 1" in err and "no checkpoint had been saved yet" in err
    assert not (out / "checkpoint" / "state.pt").exists()


def test_a_burst_of_sigterms_exits_143_and_the_summary_matches_the_checkpoint(files):
    out = files / "out"
    proc = start_cli(base_args(files, out, steps=500))
    deadline = time.monotonic() + 120
    while not (out / "checkpoint" / "state.pt").is_file():
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    for _ in range(5):
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.01)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 143, stderr
    s = summary(out)
    assert s["status"] == "cancelled" and s["step"] == state(out)["step"]


# ------------------------------------------------------------------ B11 silent garbage in data


def test_16_bit_images_keep_their_brightness():
    from comfy_selfnpo.training.data import center_crop_resize

    grey = np.full((32, 32), 32768, dtype=np.uint16)  # mid-grey in 16 bits
    image = Image.fromarray(grey)
    assert image.mode.startswith("I;16")
    out = center_crop_resize(image, 16)
    assert float(out.mean()) == pytest.approx(0.5, abs=0.01)  # not white


def test_utf16_captions_are_read_and_latin1_prompts_refused(files, capsys):
    data = files / "images"
    data.mkdir()
    write_image(data / "a.png", 0)
    (data / "a.txt").write_bytes("un café crème".encode("utf-16"))
    from comfy_selfnpo.training.data import ImageCaptionFolder

    assert ImageCaptionFolder(data, 64).captions == ["un café crème"]
    (files / "prompts.txt").write_bytes("un café crème\n".encode("latin-1"))
    code, err = run(capsys, *base_args(files, files / "out"))
    assert code == cli.EXIT_INPUT and "prompts.txt" in err and "is not UTF-8 text" in err


# ------------------------------------------------------------------ B12 a quick stop


def test_sigterm_during_the_trajectory_prerolls_stops_within_seconds(files):
    out = files / "out"
    proc = start_cli(base_args(files, out, "--trajectory-buffer", 3000, steps=5))
    deadline = time.monotonic() + 120
    while not (out / ".selfnpo.lock").is_file():  # the run has started: the pre-roll is under way
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    time.sleep(3)
    sent = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    took = time.monotonic() - sent
    assert proc.returncode == 143 and took < 20, (took, stderr)
    assert "while preparing the data" in stderr
    assert state(out)["step"] == 0 and summary(out)["status"] == "cancelled"
