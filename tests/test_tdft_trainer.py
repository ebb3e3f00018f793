"""TDFTTrainer behaviour: what is trained, EMA, resume, NaN, cancel, inference mode, gradient
checkpointing, mixed precision, optimizer fallback, config and data errors."""
from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest
import torch

from comfy_selfnpo.training import (DataError, ImageCaptionFolder, NonFiniteLoss, PromptList,
                                    ResumeMismatch, TDFTTrainer, TrainingCancelled, make_config)
from comfy_selfnpo.training.config import PRESETS, TDFTConfig
from comfy_selfnpo.training.data import read_prompts_file
from comfy_selfnpo.training.errors import UnusableCheckpoint
from tdft_helpers import base_prediction, make_image_folder, snapshot


SMALL = dict(resolution=64, batch_size=2, grid_size=10, truncation_steps=3, seed=7)


@pytest.fixture
def images(tmp_path):
    return ImageCaptionFolder(make_image_folder(tmp_path / "images"), 64)


def _trainer(ckpt, data, tmp_path, name="work", **overrides):
    cfg = make_config(**{**SMALL, **overrides})
    return TDFTTrainer(ckpt.model, ckpt.clip, ckpt.vae, data, cfg, tmp_path / name)


def _probe(trainer, ckpt):
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    cond = trainer.to_model_cond("a red cube")
    return x, cond, base_prediction(ckpt.model, x, 2.0, cond)


def test_lora_mode_changes_only_adapter_tensors(tiny, images, tmp_path):
    ckpt = tiny.build_checkpoint("sd15", seed=1)
    base_before = snapshot(ckpt.model.model.diffusion_model)
    trainer = _trainer(ckpt, images, tmp_path, mode="lora", teacher="base", lora_rank=4,
                       lora_alpha=4.0, learning_rate=1e-2)
    adapters_before = snapshot(trainer.trained.module)
    x, cond, user_before = _probe(trainer, ckpt)
    result = trainer.train(steps=3)
    assert len(result.losses) == 3 and all(torch.isfinite(torch.tensor(result.losses)))
    # the UNet (shared by every clone of the user's MODEL) is bit-identical, hooks are gone
    assert all(torch.equal(v, ckpt.model.model.diffusion_model.state_dict()[k]) for k, v in base_before.items())
    torch.testing.assert_close(base_prediction(ckpt.model, x, 2.0, cond), user_before, rtol=0, atol=0)
    after = snapshot(trainer.trained.module)
    changed = [k for k in after if not torch.equal(after[k], adapters_before[k])]
    assert changed and all(k.endswith(("down", "up")) for k in changed)
    assert all(after[k].abs().max() > 0 for k in after if k.endswith("up"))  # up left zero init
    # the trained model differs from the base, and the node's negative MODEL carries exactly it
    trained = trainer.predict_x0(x, 2.0, cond)
    assert (trained - user_before).abs().max() > 1e-4
    # ComfyUI's patched weights against the trainer's hooked adapters: rounding differs. Measured with
    # 1, 2 and 4 threads: 7.7e-7 of the largest output value; allowed: 1e-5 of it (also in the tests below)
    torch.testing.assert_close(base_prediction(trainer.negative_model(), x, 2.0, cond), trained,
                               rtol=0, atol=1e-5 * float(trained.abs().max()))


def test_full_mode_updates_the_unet_on_a_copy(tiny, images, tmp_path):
    ckpt = tiny.build_checkpoint("sd15", seed=1)
    base_before = snapshot(ckpt.model.model.diffusion_model)
    trainer = _trainer(ckpt, images, tmp_path, mode="full", teacher="ema", learning_rate=1e-3)
    x, cond, user_before = _probe(trainer, ckpt)
    trainer.train(steps=2)
    student = snapshot(trainer.trained.module)
    changed = [k for k in student if not torch.equal(student[k], base_before[k])]
    assert len(changed) > 0.9 * len(student)  # essentially every tensor of the UNet moved
    assert all(torch.equal(v, ckpt.model.model.diffusion_model.state_dict()[k]) for k, v in base_before.items())
    torch.testing.assert_close(base_prediction(ckpt.model, x, 2.0, cond), user_before, rtol=0, atol=0)
    trained = trainer.predict_x0(x, 2.0, cond)
    assert (trained - user_before).abs().max() > 1e-3
    # base + offset against the trained copy (measured 7.5e-7 of the largest output value): see above
    torch.testing.assert_close(base_prediction(trainer.negative_model(), x, 2.0, cond), trained,
                               rtol=0, atol=1e-5 * float(trained.abs().max()))


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_ema_teacher_update_matches_its_formula(tiny, images, tmp_path, mode):
    ckpt = tiny.build_checkpoint("sd15", seed=1)
    trainer = _trainer(ckpt, images, tmp_path, mode=mode, teacher="ema", ema_decay=0.9,
                       learning_rate=1e-2, lora_rank=4)
    trainer.train(steps=1)
    teacher_before = (snapshot(trainer.trained.teacher.module) if mode == "lora"
                      else snapshot(trainer.trained.teacher.module))
    student_before = (snapshot(trainer.trained.module) if mode == "lora"
                      else snapshot(trainer.trained.module))
    trainer.train(steps=1)
    teacher = snapshot(trainer.trained.teacher.module) if mode == "lora" else snapshot(trainer.trained.teacher.module)
    student = snapshot(trainer.trained.module) if mode == "lora" else snapshot(trainer.trained.module)
    moved = 0
    for k in teacher:
        expected = 0.9 * teacher_before[k] + 0.1 * student[k]
        torch.testing.assert_close(teacher[k], expected, rtol=1e-6, atol=1e-7)
        moved += int(not torch.equal(student[k], student_before[k]))
    assert moved > 0


@pytest.mark.parametrize("mode,data_kind", [("full", "images"), ("lora", "prompts")])
def test_resume_after_interruption_equals_an_uninterrupted_run(tiny, images, tmp_path, mode, data_kind):
    ckpt = tiny.build_checkpoint("sd15", seed=2)
    data = images if data_kind == "images" else PromptList(["a red cube", "a dog", "a tree"])
    opts = dict(mode=mode, teacher="ema", learning_rate=1e-3, lr_schedule="cosine", warmup_steps=1,
                steps=4, trajectory_buffer=4, lora_rank=4, grad_accum=2)
    straight = _trainer(ckpt, data, tmp_path, "straight", **opts)
    full_run = straight.train().losses

    first = _trainer(ckpt, data, tmp_path, "resumed", **opts)
    first.train(steps=2)
    path = first.save_checkpoint()
    del first
    second = _trainer(ckpt, data, tmp_path, "resumed", **opts)
    second.load_checkpoint(path)
    assert second.step == 2
    rest = second.train().losses
    assert second.losses == straight.losses
    assert full_run[2:] == rest
    a = snapshot(straight.trained.module)
    b = snapshot(second.trained.module)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tiny, images, tmp_path):
    ckpt = tiny.build_checkpoint("sd15", seed=1)
    # an absurd learning rate blows the weights up after the first update
    trainer = _trainer(ckpt, images, tmp_path, mode="lora", teacher="base", learning_rate=1e30,
                       save_every=1, steps=5, lora_rank=4)
    with pytest.raises(NonFiniteLoss, match="learning rate") as info:
        trainer.train()
    assert "nothing was saved" in str(info.value)
    state_file = tmp_path / "work" / "checkpoint" / "state.pt"
    saved = torch.load(state_file, weights_only=True)
    assert saved["step"] == trainer.step == 1  # the step-1 checkpoint is what is left
    assert all(torch.isfinite(torch.tensor(v)) for v in saved["losses"])
    assert not list(state_file.parent.glob(".*.tmp"))  # no half-written temp files


def test_cancel_saves_a_resumable_checkpoint(tiny, images, tmp_path):
    ckpt = tiny.build_checkpoint("sd15", seed=1)
    trainer = _trainer(ckpt, images, tmp_path, mode="lora", learning_rate=1e-3, steps=10, lora_rank=4)
    seen = []
    with pytest.raises(TrainingCancelled) as info:
        trainer.train(on_step=seen.append, should_stop=lambda: len(seen) >= 2)
    assert info.value.step == 2 and [r.step for r in seen] == [1, 2]
    resumed = _trainer(ckpt, images, tmp_path, "other", mode="lora", learning_rate=1e-3, steps=10, lora_rank=4)
    resumed.load_checkpoint(info.value.checkpoint_path)
    assert resumed.step == 2
    assert all(torch.equal(a, b) for a, b in zip(resumed.trained.module.state_dict().values(),
                                                 trainer.trained.module.state_dict().values()))


def test_resume_mismatch_says_what_differs(tiny, images, tmp_path):
    ckpt = tiny.build_checkpoint("sd15", seed=1)
    trainer = _trainer(ckpt, images, tmp_path, mode="lora", learning_rate=1e-3, lora_rank=4)
    trainer.train(steps=1)
    path = trainer.save_checkpoint()
    other_rank = _trainer(ckpt, images, tmp_path, "b", mode="lora", learning_rate=1e-3, lora_rank=8)
    with pytest.raises(ResumeMismatch, match="lora_rank: checkpoint 4, now 8"):
        other_rank.load_checkpoint(path)
    other_model = tiny.build_checkpoint("sd15", seed=9)
    with pytest.raises(ResumeMismatch, match="base model: checkpoint"):
        _trainer(other_model, images, tmp_path, "c", mode="lora", learning_rate=1e-3, lora_rank=4).load_checkpoint(path)
    with pytest.raises(UnusableCheckpoint, match="no TDFT checkpoint"):
        other_rank.load_checkpoint(tmp_path / "missing")


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_training_works_inside_comfyuis_inference_mode(tiny, tmp_path, mode):
    with torch.inference_mode():  # as ComfyUI runs nodes, models loaded inside it too
        ckpt = tiny.build_checkpoint("sd15", seed=1)
        data = ImageCaptionFolder(make_image_folder(tmp_path / "imgs"), 64)
        trainer = _trainer(ckpt, data, tmp_path, mode=mode, learning_rate=1e-3, lora_rank=4)
        result = trainer.train(steps=2)
        x = torch.randn(1, 4, 8, 8)
        trained = trainer.predict_x0(x, 2.0, "a dog")
        base = base_prediction(ckpt.model, x, 2.0, trainer.to_model_cond("a dog"))
    assert all(torch.isfinite(torch.tensor(result.losses)))
    assert (trained - base).abs().max() > 1e-5


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_gradient_checkpointing_gives_the_same_gradients(tiny, images, tmp_path, monkeypatch, mode):
    from comfy_selfnpo.training import grad_checkpointing as gc

    calls = []
    original = gc._Recomputation._recompute
    monkeypatch.setattr(gc._Recomputation, "_recompute", lambda self: calls.append(1) or original(self))
    ckpt = tiny.build_checkpoint("sd15", seed=1)
    grads = {}
    for flag in (False, True):
        trainer = _trainer(ckpt, images, tmp_path, f"w{flag}", mode=mode, gradient_checkpointing=flag,
                           lora_rank=4, corruption_guidance=-5.0)

        def keep_gradients(optimizer, args, kwargs, flag=flag, trainer=trainer):
            # the gradients the optimizer is about to apply, after one step's forward + backward
            grads[flag] = [p.grad.clone() for p in trainer.trained.parameters()]

        trainer.optim.optimizer.register_step_pre_hook(keep_gradients)
        trainer.train_step()
        assert (len(calls) > 0) == flag
    assert sum(float(g.abs().sum()) for g in grads[False]) > 0
    # Equal in exact arithmetic; the recomputation sums gradient contributions in another order.
    # Measured with 1, 2 and 4 threads: the largest difference is 3.4e-7 (full) and 8.5e-7 (LoRA) of
    # the largest gradient; allowed: 1e-5 of it.
    scale = max(float(g.abs().max()) for g in grads[False])
    for g0, g1 in zip(grads[False], grads[True]):
        torch.testing.assert_close(g1, g0, rtol=0, atol=1e-5 * scale)


def test_mixed_precision_steps_track_float32(tiny, images, tmp_path):
    ckpt = tiny.build_checkpoint("sd15", seed=1)
    losses = {}
    for precision in ("no", "bf16", "fp16"):
        trainer = _trainer(ckpt, images, tmp_path, precision, mode="lora", lora_rank=4,
                           learning_rate=1e-3, mixed_precision=precision)
        losses[precision] = trainer.train(steps=2).losses
        assert (trainer.optim.scaler is not None) == (precision == "fp16")
        assert any(float(p.detach().abs().max()) > 0 for n, p in trainer.trained.module.named_parameters() if n.endswith("up"))
    for precision in ("bf16", "fp16"):
        assert losses[precision] != losses["no"]  # autocast really ran in low precision
        for a, b in zip(losses[precision], losses["no"]):
            assert a == pytest.approx(b, rel=0.05)


def test_adamw8bit_falls_back_to_adamw_with_a_warning(tiny, images, tmp_path, monkeypatch):
    import sys
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # not importable, as on this machine
    ckpt = tiny.build_checkpoint("sd15", seed=1)
    with pytest.warns(UserWarning, match="bitsandbytes"):  # when the trainer is built
        trainer = _trainer(ckpt, images, tmp_path, mode="lora", optimizer="adamw8bit", lora_rank=4)
    trainer.train_step()
    assert type(trainer.optim.optimizer) is torch.optim.AdamW
    group = trainer.optim.optimizer.param_groups[0]
    assert group["betas"] == (0.9, 0.999) and group["eps"] == 1e-8 and group["weight_decay"] == 1e-3


def test_lr_schedules(tiny, images, tmp_path):
    ckpt = tiny.build_checkpoint("sd15", seed=1)
    warm = _trainer(ckpt, images, tmp_path, "a", mode="lora", lr_schedule="warmup", warmup_steps=2,
                    learning_rate=1e-3, steps=4, lora_rank=2, lora_targets="attn1\\.to_q")
    lrs = []
    warm.train(on_step=lambda r: lrs.append(r.lr))
    assert lrs == pytest.approx([5e-4, 1e-3, 1e-3, 1e-3])
    cos = _trainer(ckpt, images, tmp_path, "b", mode="lora", lr_schedule="cosine", learning_rate=1e-3,
                   steps=4, lora_rank=2, lora_targets="attn1\\.to_q")
    lrs = []
    cos.train(on_step=lambda r: lrs.append(r.lr))
    import math
    assert lrs == pytest.approx([1e-3 * 0.5 * (1 + math.cos(math.pi * s / 4)) for s in range(4)])


def test_config_presets_and_validation():
    for name in PRESETS:
        cfg = make_config(name)
        assert cfg.to_dict() == TDFTConfig.from_dict(cfg.to_dict()).to_dict()
    sd15, sdxl = make_config("sd15"), make_config("sdxl")  # the published runs: memory and optimizer only
    assert (sd15.mode, sd15.optimizer, sd15.batch_size * sd15.grad_accum) == ("full", "adamw8bit", 80)
    assert (sdxl.mode, sdxl.optimizer, sdxl.batch_size, sdxl.gradient_checkpointing) == ("full", "adamw8bit", 10, True)
    assert (sd15.corruption_guidance, sd15.learning_rate, sd15.uncond, sd15.resolution) == (None, None, "auto", None)
    assert make_config("lora-8gb").mode == "lora" and make_config().output_format == "offset"
    assert make_config("sd15", learning_rate=2e-6, steps=None).learning_rate == 2e-6
    with pytest.raises(ValueError, match="unknown preset"):
        make_config("sd99")
    with pytest.raises(ValueError, match="unknown TDFT config key"):
        make_config(lerning_rate=1.0)
    with pytest.raises(ValueError, match="truncation_steps"):
        make_config(grid_size=5, truncation_steps=5)
    with pytest.raises(ValueError, match="loss"):
        make_config(loss="l3")
    with pytest.raises(ValueError, match="regex"):
        make_config(mode="lora", lora_targets="attn[")


def _png_with_garbled_pixels(png: bytes) -> bytes:
    import struct
    import zlib

    out, pos = bytearray(png[:8]), 8
    while pos < len(png):
        length, kind = struct.unpack(">I4s", png[pos:pos + 8])
        data = png[pos + 8:pos + 8 + length]
        if kind == b"IDAT":
            data = data[:2] + bytes(b ^ 0x5A for b in data[2:])
        out += struct.pack(">I4s", length, kind) + data + struct.pack(">I", zlib.crc32(kind + data))
        pos += 12 + length
    return bytes(out)


def test_data_errors_are_clear(tmp_path, caplog):
    with pytest.raises(DataError, match="does not exist"):
        ImageCaptionFolder(tmp_path / "nope", 64)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no usable training image"):
        ImageCaptionFolder(tmp_path / "empty", 64)
    folder = make_image_folder(tmp_path / "mixed", count=2)
    (folder / "img1.txt").unlink()
    (folder / "broken.png").write_bytes(b"not a png")
    # a PNG whose chunks and checksums are intact but whose compressed pixels are garbage passes
    # PIL's verify(); it fails only when decoded
    (folder / "garbled.png").write_bytes(_png_with_garbled_pixels((folder / "img0.png").read_bytes()))
    with caplog.at_level(logging.WARNING):
        data = ImageCaptionFolder(folder, 32)
    assert len(data) == 2 and data.captions == ["a red cube", ""]
    assert "broken.png" in caplog.text and "garbled.png" in caplog.text and "img1.png" in caplog.text
    image = data.load_image(0)  # 64x72 source: shorter side to 32, centre crop
    assert image.shape == (32, 32, 3) and 0 <= float(image.min()) and float(image.max()) <= 1
    with pytest.raises(DataError, match="empty"):
        PromptList(["", "  "])
    (tmp_path / "p.txt").write_text("a cat\n\n  a dog  \n")
    assert read_prompts_file(tmp_path / "p.txt") == ["a cat", "a dog"]
    with pytest.raises(DataError, match="does not exist"):
        read_prompts_file(tmp_path / "missing.txt")


def test_center_crop_keeps_the_aspect_ratio():
    from PIL import Image

    from comfy_selfnpo.training.data import center_crop_resize
    # a wide image: left third red, middle green, right third blue -> the crop keeps only green-ish
    wide = Image.new("RGB", (96, 32))
    for x in range(96):
        for y in range(32):
            wide.putpixel((x, y), (255, 0, 0) if x < 32 else (0, 255, 0) if x < 64 else (0, 0, 255))
    out = center_crop_resize(wide, 16)
    assert out.shape == (16, 16, 3)
    assert float(out[..., 1].mean()) > 0.9 and float(out[..., 0].mean()) < 0.1


def test_image_latents_are_cached_once(tiny, images, tmp_path, monkeypatch):
    ckpt = tiny.build_checkpoint("sd15", seed=1)
    first = _trainer(ckpt, images, tmp_path, mode="lora", lora_rank=2)  # encodes and caches the images
    calls = []
    original = ckpt.vae.encode
    monkeypatch.setattr(ckpt.vae, "encode", lambda *a, **k: calls.append(1) or original(*a, **k))
    again = _trainer(ckpt, images, tmp_path, mode="lora", lora_rank=2)
    assert calls == [] and torch.equal(first.encoded.latents, again.encoded.latents)
    assert first.encoded.latents.shape == (3, 4, 8, 8)
    # the cached latent is the VAE encoding of the cropped image in the model's latent space
    direct = ckpt.model.model.process_latent_in(original(images.load_image(1)[None]).float())
    torch.testing.assert_close(first.encoded.latents[1:2], direct)


def test_out_of_memory_saves_a_resumable_checkpoint_of_the_state_before_the_step(tiny, images, tmp_path):
    from comfy_selfnpo.training import OutOfMemory

    ckpt = tiny.build_checkpoint("sd15", seed=1)
    opts = dict(mode="lora", learning_rate=1e-3, lora_rank=4, steps=3)
    straight = _trainer(ckpt, images, tmp_path, "straight", **opts).train().losses
    trainer = _trainer(ckpt, images, tmp_path, **opts)
    trainer.train(steps=1)

    def student_out_of_memory(*args):  # what torch raises when the device memory is exhausted
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    trainer.trained.student_forward = student_out_of_memory
    with pytest.raises(OutOfMemory, match="smaller batch_size") as info:
        trainer.train()
    assert info.value.checkpoint_path is not None and trainer.step == 1
    assert "state before step 2" in str(info.value) and "2.00 GiB" in str(info.value)
    del trainer.trained.student_forward  # the same trainer can go on after freeing memory ...
    assert trainer.train().losses == straight[1:]
    resumed = _trainer(ckpt, images, tmp_path, "other", **opts)  # ... and so can a resumed one
    resumed.load_checkpoint(info.value.checkpoint_path)
    assert resumed.step == 1 and resumed.train().losses == straight[1:]


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path):
    from comfy_selfnpo.training.atomic_files import atomic_write, save_torch

    target = tmp_path / "ckpt" / "state.pt"
    save_torch(target, {"step": 1})

    def broken(tmp):
        with open(tmp, "wb") as f:
            f.write(b"half a checkpoint")
        raise OSError("No space left on device")

    with pytest.raises(OSError, match="No space"):
        atomic_write(target, broken)
    assert torch.load(target, weights_only=True) == {"step": 1}
    assert [p.name for p in target.parent.iterdir()] == ["state.pt"]


def test_atomically_written_files_get_the_usual_permissions(tmp_path):
    import os
    import stat

    from comfy_selfnpo.training.atomic_files import save_torch

    mask = os.umask(0o022)
    try:
        target = save_torch(tmp_path / "weights.pt", {"step": 1})
    finally:
        os.umask(mask)
    # mkstemp alone would leave 0600: unreadable to a ComfyUI server running as another user
    assert stat.S_IMODE(os.stat(target).st_mode) == 0o644


def test_resume_may_switch_gradient_checkpointing_on(tiny, images, tmp_path):
    ckpt = tiny.build_checkpoint("sd15", seed=1)
    opts = dict(mode="lora", learning_rate=1e-3, lora_rank=4, steps=3)
    straight = _trainer(ckpt, images, tmp_path, "straight", **opts)
    straight.train()
    first = _trainer(ckpt, images, tmp_path, "a", **opts)
    first.train(steps=1)
    path = first.save_checkpoint()
    # e.g. after running out of memory: same run, now with checkpointing
    resumed = _trainer(ckpt, images, tmp_path, "b", gradient_checkpointing=True, **opts)
    resumed.load_checkpoint(path)
    resumed.train()
    assert resumed.losses == pytest.approx(straight.losses, rel=1e-5)
    with pytest.raises(ResumeMismatch, match="batch_size"):
        _trainer(ckpt, images, tmp_path, "c", **{**opts, "batch_size": 1}).load_checkpoint(path)


def test_lora_targets_that_match_nothing_are_reported(tiny, images, tmp_path):
    from comfy_selfnpo.training import TrainingError

    ckpt = tiny.build_checkpoint("sd15", seed=1)
    with pytest.raises(TrainingError, match="matches no Linear/Conv2d layer"):
        _trainer(ckpt, images, tmp_path, mode="lora", lora_targets="no_such_layer")
    # a regex may also pick convolutions; they train and export as kohya conv LoRA
    trainer = _trainer(ckpt, images, tmp_path, mode="lora", lora_targets=r"proj_in|attn2\.to_k",
                       lora_rank=2, learning_rate=1e-2)
    assert any(trainer.trained.module[k].is_conv for k in trainer.trained.module)
    trainer.train(steps=2)
    x, cond, base = _probe(trainer, ckpt)
    trained = trainer.predict_x0(x, 2.0, cond)
    assert (trained - base).abs().max() > 1e-5
    # measured 6.9e-7 of the largest output value (1, 2, 4 threads), as in the LoRA-mode test above
    torch.testing.assert_close(base_prediction(trainer.negative_model(), x, 2.0, cond), trained,
                               rtol=0, atol=1e-5 * float(trained.abs().max()))


def test_latent_dataset_trains_like_the_image_folder_it_came_from(tiny, images, tmp_path):
    from comfy_selfnpo.training import LatentDataset

    ckpt = tiny.build_checkpoint("sd15", seed=1)
    opts = dict(mode="lora", learning_rate=1e-3, lora_rank=4, steps=2)
    from_images = _trainer(ckpt, images, tmp_path, "images", **opts)
    losses_images = from_images.train().losses
    latents = from_images.encoded.latents.clone()
    from_latents = _trainer(ckpt, LatentDataset(latents, images.captions), tmp_path, "latents", **opts)
    assert from_latents.train().losses == losses_images
    with pytest.raises(DataError, match="one caption per latent"):
        LatentDataset(latents, images.captions[:1])
    with pytest.raises(DataError, match="NaN"):
        LatentDataset(latents * float("nan"), images.captions)


class _CastTimePatcher(__import__("comfy.model_patcher").model_patcher.ModelPatcher):
    """The state newer ComfyUI's dynamic VRAM leaves: patches stay out of the stored weights (applied
    at cast time), and `clone(disable_dynamic=True)` may or may not exist."""
    rebuild = None  # newer core: a non-dynamic clone is a fresh model from the loader (cached_patcher_init)

    def is_dynamic(self):
        return True

    def patch_weight_to_device(self, key, device_to=None, inplace_update=False):
        pass  # never merged into the module

    def clone(self, *args, disable_dynamic=False, **kwargs):
        if disable_dynamic and self.rebuild == "no loader init":  # v0.38, a custom loader that registered none
            raise RuntimeError("Cannot create non-dynamic delegate: cached_patcher_init is not initialized.")
        if disable_dynamic and self.rebuild is None:
            raise TypeError("clone() got an unexpected keyword argument 'disable_dynamic'")
        n = super().clone(*args, **kwargs)
        if disable_dynamic:
            plain = self.rebuild()
            plain.add_patches({k: v[0][1] for k, v in n.patches.items()}, 1.0)
            plain.non_dynamic_clone_of = self
            return plain
        n.__class__ = type(self)
        return n


@pytest.mark.parametrize("offers_clone", [False, "no loader init", True])
def test_full_training_starts_from_the_models_loras_when_they_stay_out_of_the_weights(tiny, images, tmp_path,
                                                                                     offers_clone):
    import comfy.lora

    from comfy_selfnpo.npo.weights import effective_weight

    ckpt = tiny.build_checkpoint("sd15", seed=1)
    key = "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
    shape = ckpt.model.model.state_dict()[key].shape
    lora = {"x.lora_up.weight": torch.full((shape[0], 2), 0.3), "x.lora_down.weight": torch.full((2, shape[1]), 0.2)}
    user = _CastTimePatcher(ckpt.model.model, ckpt.model.load_device, ckpt.model.offload_device)
    if offers_clone == "no loader init":
        user.rebuild = offers_clone
    elif offers_clone:
        user.rebuild = lambda: tiny.build_model("sd15", seed=1)
    user.add_patches(comfy.lora.load_lora(lora, {"x": key}), 1.0)  # the user's LoRA on the MODEL
    trainer = _trainer(SimpleNamespace(model=user, clip=ckpt.clip, vae=ckpt.vae), images, tmp_path,
                       mode="full", teacher="ema", learning_rate=0.0)
    assert getattr(trainer.base_patcher, "non_dynamic_clone_of", None) is (user if offers_clone is True else None)
    expected = effective_weight(user, key)
    assert (expected - ckpt.model.model.state_dict()[key]).abs().max() > 0.1  # the LoRA is not in the module
    inner = key[len("diffusion_model."):]
    for module in (trainer.trained.module, trainer.trained.teacher.module):
        torch.testing.assert_close(module.state_dict()[inner], expected)
    trainer.train(steps=1)  # learning rate 0: the export is the LoRA'd model itself, no change on top
    assert all(float(d.abs().max()) < 1e-6 for d in trainer.trained.weight_deltas().values())
    torch.testing.assert_close(trainer.export_state_dict("unet")[inner], expected)


def test_image_folder_repeats_orientation_and_16_bit_images(tmp_path):
    """kohya "<N>_name" folders repeat their images N times an epoch (the nearest such folder counts);
    a phone photo stored sideways with an EXIF orientation trains upright; a 16-bit PNG is scaled, not
    clipped to white."""
    import numpy as np
    from PIL import Image

    from comfy_selfnpo.training.data import EpochSampler

    root = tmp_path / "data"
    for rel, colour in (("3_cats/a.png", (200, 0, 0)), ("plain/b.png", (0, 200, 0)),
                        ("2_outer/5_inner/c.png", (0, 0, 200))):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (24, 24), colour).save(root / rel)
    data = ImageCaptionFolder(root, 16)
    by_name = dict(zip((item.path.name for item in data.items), data.repeats))
    assert by_name == {"a.png": 3, "b.png": 1, "c.png": 5}
    epoch = EpochSampler(data.repeats, seed=1).next_indices(9)
    names = [data.items[i].path.name for i in epoch]
    assert sorted(names) == ["a.png"] * 3 + ["b.png"] + ["c.png"] * 5
    before = data.fingerprint()
    (root / "3_cats").rename(root / "2_cats")
    assert ImageCaptionFolder(root, 16).fingerprint() != before  # a resumed run notices the new count

    # stored 40 wide x 20 high, left half red, right half blue; EXIF orientation 6 = "rotate 90°
    # clockwise to display": upright it is 20 wide x 40 high, red on top, blue below
    photos = tmp_path / "photos"
    photos.mkdir()
    stored = np.zeros((20, 40, 3), np.uint8)
    stored[:, :20, 0] = 255
    stored[:, 20:, 2] = 255
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(stored).save(photos / "sideways.jpg", exif=exif.tobytes(), quality=95)
    grey = (np.arange(32 * 32, dtype=np.uint32).reshape(32, 32) * 40).astype(np.uint16)  # 0 .. 40920
    Image.fromarray(grey).save(photos / "deep.png")
    loaded = ImageCaptionFolder(photos, 16)
    upright = loaded.load_image([p.name for p in (i.path for i in loaded.items)].index("sideways.jpg"))
    assert upright.shape == (16, 16, 3)
    top, bottom = upright[:3].mean(dim=(0, 1)), upright[-3:].mean(dim=(0, 1))
    assert top[0] > 0.8 and top[2] < 0.2 and bottom[2] > 0.8 and bottom[0] < 0.2
    deep = loaded.load_image([i.path.name for i in loaded.items].index("deep.png"))
    assert 0.25 < float(deep.mean()) < 0.4  # mean of 0 .. 40920 over 65535 is about 0.31; clipping gives 1.0
    assert float(deep.max()) < 0.7


@pytest.mark.parametrize("family", ["sd15", "sd3"])
def test_lora_training_on_a_partly_loaded_model_equals_training_on_a_fully_loaded_one(tiny, tmp_path, monkeypatch,
                                                                                      family):
    """A model larger than the GPU: ComfyUI loads part of it and streams the other layers' weights in at
    every call. Simulated with ComfyUI's own partial loading at a budget of a third of the model; the
    streamed layers keep no weight for the backward pass, and the run is the fully loaded run."""
    import comfy.model_management as mm

    from comfy_selfnpo.training.streaming import streamed_layers

    prompts = PromptList(["a red cube", "a blue sphere"])
    settings = dict(mode="lora", lora_rank=2, steps=2, resolution=64, batch_size=1, trajectory_buffer=2,
                    grid_size=10, truncation_steps=3, seed=7)

    def run(name):
        ckpt = tiny.build_checkpoint(family, seed=1)
        trainer = TDFTTrainer(ckpt.model, ckpt.clip, None, prompts, make_config(**settings), tmp_path / name)
        losses = [trainer.train_step().loss for _ in range(2)]
        return trainer, losses

    reference, reference_losses = run("full")
    mm.unload_all_models()
    model_load = mm.LoadedModel.model_load

    def small_gpu(self, lowvram_model_memory=0, force_patch_weights=False):  # room for a third of the weights
        room = self.model.model_size() // 3 - self.model.loaded_size()
        return model_load(self, max(room, 1), force_patch_weights)

    monkeypatch.setattr(mm.LoadedModel, "model_load", small_gpu)
    saved = []  # what forward passes keep for the backward pass (recomputations inside it excluded)

    def keep(tensor):
        if torch._C._current_graph_task_id() == -1:
            saved.append(tensor.data_ptr())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        streamed, streamed_losses = run("streamed")
    layers = streamed_layers(streamed.base_model.diffusion_model, streamed.device)
    assert len(layers) >= 3 and streamed.base_patcher.model.model_lowvram
    assert not {layer.weight.data_ptr() for layer in layers} & set(saved)
    # the same operations in the same order on the same weight values: bit-identical (measured so with
    # 1, 2 and 4 threads)
    assert streamed_losses == reference_losses
    for key, value in reference.trained.module.state_dict().items():
        assert torch.equal(streamed.trained.module.state_dict()[key], value), key
