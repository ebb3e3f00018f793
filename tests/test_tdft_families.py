"""TDFT on the model families ComfyUI users run today (flow DiTs, video), on tiny real models of each:
LoRA and full runs, data-free and on real data (clips for the video families), whose exports load
through ComfyUI's LoRA loader and the pack's loader with no unmatched key and reproduce the trained
model; the family's own LoRA layers; gradient checkpointing exact on every family; refusals."""
from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from PIL import Image

import comfy.lora
import comfy.utils
from comfy_selfnpo.training import PromptList, TDFTTrainer, UnsupportedModel, make_config
from comfy_selfnpo.training.data import ImageCaptionFolder

MUST = ("sd3", "wan21", "wan22_5b", "qwen_image", "chroma", "ltxv")
SHOULD = ("hunyuan_video15", "lumina2")
PROMPTS = ["a red cube", "a dog running on a beach", "a portrait of an old sailor"]
FPS = 8.0


VIDEO = ("wan21", "wan22_5b", "ltxv", "hunyuan_video15")  # Qwen-Image: an image model on Wan's 3-D latents


def frames_for(kind: str) -> int:
    """Video: two latent frames, c + 1 pixel frames for a VAE that compresses time c-fold (LTXV: 8)."""
    from comfy_selfnpo import tiny_models

    return tiny_models.family(kind).pixel_frames(2) if kind in VIDEO else 0


def write_clip(path, frames: int = 24, fps: int = 16, size: int = 64, seed: int = 0):
    import av

    rng = np.random.default_rng(seed)
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=fps)
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        for i in range(frames):
            image = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
            image[:, : size // 2] = (i * 10) % 255  # a moving edge of brightness
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    """A folder of captioned images and one of captioned clips."""
    root = tmp_path_factory.mktemp("media")
    (root / "images").mkdir()
    (root / "clips").mkdir()
    rng = np.random.default_rng(0)
    for i, caption in enumerate(PROMPTS):
        Image.fromarray(rng.integers(0, 255, (72, 64, 3), dtype=np.uint8)).save(root / "images" / f"{i}.png")
        (root / "images" / f"{i}.txt").write_text(caption)
        write_clip(root / "clips" / f"{i}.mp4", seed=i)
        (root / "clips" / f"{i}.txt").write_text(caption)
    return root


def _data(kind, data_kind, media, resolution=64):
    if data_kind == "prompts":
        return PromptList(PROMPTS)
    return ImageCaptionFolder(media / ("clips" if kind in VIDEO else "images"), resolution)


def _train(kind, mode, data_kind, media, tmp_path, **overrides):
    from comfy_selfnpo import tiny_models

    ckpt = tiny_models.build_checkpoint(kind, seed=0)
    config = make_config(mode=mode, teacher="ema" if mode == "full" else "base", resolution=64, batch_size=2,
                         grid_size=10, truncation_steps=3, trajectory_buffer=4, steps=3, learning_rate=1e-3,
                         lora_rank=4, lora_alpha=4.0, mixed_precision="no", frames=frames_for(kind), fps=FPS,
                         seed=2, **overrides)
    trainer = TDFTTrainer(ckpt.model, ckpt.clip, ckpt.vae, _data(kind, data_kind, media), config, tmp_path / "run")
    result = trainer.train()
    return ckpt, trainer, result


def _probe(trainer, ckpt):
    shape = trainer.encoded.latent_shape
    x = torch.randn((2,) + tuple(shape), generator=torch.Generator().manual_seed(5))
    return x, trainer.to_model_cond("a dog running on a beach")


def _prediction(model, x, sigma, cond):
    from tdft_helpers import base_prediction

    return base_prediction(model, x, sigma, cond)


CASES = [(kind, mode, data) for kind in MUST for mode, data in
         (("lora", "prompts"), ("full", "media"), ("lora", "media"), ("full", "prompts"))]
CASES += [(kind, mode, data) for kind in SHOULD for mode, data in (("lora", "prompts"), ("full", "media"))]


@pytest.mark.parametrize("kind, mode, data_kind", CASES)
def test_exports_reload_with_no_unmatched_key_and_reproduce_the_trained_model(kind, mode, data_kind, media,
                                                                             tmp_path):
    from comfy_selfnpo.npo.weights import load_npo_file, make_negative_model

    ckpt, trainer, result = _train(kind, mode, data_kind, media, tmp_path)
    assert len(result.losses) == 3 and all(np.isfinite(result.losses))
    if data_kind == "media":
        assert trainer.encoded.latents.shape[1:] == tuple(trainer.encoded.latent_shape)
    path = trainer.export(tmp_path / "npo.safetensors")  # LoRA runs: a LoRA; full runs: an offset
    tensors = comfy.utils.load_torch_file(str(path))
    # ComfyUI's own LoRA loader applies every tensor of the file
    key_map = comfy.lora.model_lora_keys_unet(ckpt.model.model, {})
    patches = comfy.lora.load_lora(tensors, key_map, log_missing=False)
    expected = sum(1 for k in tensors if k.endswith((".lora_down.weight", ".diff", ".diff_b")))
    assert len(patches) == expected > 0
    # the pack's loader, with no unmatched key, gives the trained model
    negative, report = make_negative_model(ckpt.model, load_npo_file(str(path)))
    assert report.unmatched == [] and report.patched == expected
    x, cond = _probe(trainer, ckpt)
    trained = trainer.predict_x0(x, 0.7, cond)
    base = _prediction(ckpt.model, x, 0.7, cond)
    change = float((trained - base).abs().max())
    assert change > 1e-5, "training changed nothing"
    # patched weights against the trainer's forward: measured (1, 2, 4 threads) at most 5.5e-7 of the largest
    # output value, under 4 % of the tolerance (here and for core's loader below)
    torch.testing.assert_close(_prediction(negative, x, 0.7, cond), trained, rtol=1e-4, atol=1e-5 + 1e-3 * change)
    # ComfyUI's loader patches the weights of leaf layers only: a parameter of a block itself (Wan's
    # `modulation`, LTXV's `scale_shift_table`) keeps its stored value there (core behaviour)
    skipped = _parameters_core_never_patches(ckpt.model.model, patches)
    if not skipped:
        comfy_lora = ckpt.model.clone()
        comfy_lora.add_patches(patches, 1.0)
        torch.testing.assert_close(_prediction(comfy_lora, x, 0.7, cond), trained, rtol=1e-4,
                                   atol=1e-5 + 1e-3 * change)
    else:
        assert mode == "full" and all(k.rsplit(".", 1)[-1] in ("modulation", "scale_shift_table") for k in skipped)


def _parameters_core_never_patches(base_model, patches) -> list[str]:
    modules = dict(base_model.named_modules())
    return [k for k in patches if any(True for _ in modules[k.rsplit(".", 1)[0]].children())]


@pytest.mark.parametrize("kind", MUST + SHOULD)
def test_the_attn_preset_trains_the_familys_attention_layers(kind, media, tmp_path):
    from comfy_selfnpo import tiny_models

    ckpt = tiny_models.build_checkpoint(kind, seed=0)
    config = make_config("lora-8gb", resolution=64, frames=frames_for(kind), trajectory_buffer=2, steps=1)
    trainer = TDFTTrainer(ckpt.model, ckpt.clip, ckpt.vae, PromptList(PROMPTS[:1]), config, tmp_path / "run")
    names = trainer.trained.adapters.names
    pattern = re.compile(trainer.family.attn)
    assert names and all(pattern.search(n) for n in names)
    assert all(("attn" in n or "attention" in n or "linear" in n or ".q" in n or ".k" in n or ".v" in n or ".o" in n)
               for n in names)
    assert trainer.optim.config.mixed_precision == ("fp16" if trainer.family.name.startswith("UNet") else "bf16")


@pytest.mark.parametrize("kind", ["chroma", "ltxv", "hunyuan_video15", "wan21", "sd3"])
def test_gradient_checkpointing_gives_exactly_the_gradients_of_training_without_it(kind, media, tmp_path):
    """Chroma, LTXV and HunyuanVideo 1.5 update tensors in place inside their blocks."""
    from comfy_selfnpo import tiny_models

    grads = {}
    for checkpointing in (False, True):
        ckpt = tiny_models.build_checkpoint(kind, seed=0)
        config = make_config(mode="full", teacher="base", resolution=64, batch_size=2, grid_size=10,
                             truncation_steps=3, trajectory_buffer=4, learning_rate=1e-3, mixed_precision="no",
                             corruption_guidance=-5.0, gradient_checkpointing=checkpointing, frames=frames_for(kind))
        trainer = TDFTTrainer(ckpt.model, ckpt.clip, ckpt.vae, PromptList(PROMPTS), config, tmp_path / f"r{checkpointing}")

        def keep(optimizer, args, kwargs, checkpointing=checkpointing, trainer=trainer):
            grads[checkpointing] = [p.grad.clone() for p in trainer.trained.parameters() if p.grad is not None]

        trainer.optim.optimizer.register_step_pre_hook(keep)
        trainer.train_step()
        if kind in ("chroma", "ltxv", "hunyuan_video15"):
            assert trainer.saved_copies == (not checkpointing)  # found by the probe without checkpointing
    assert sum(float(g.abs().sum()) for g in grads[False]) > 0
    # Equal in exact arithmetic, not bit for bit: the recomputation inside the backward pass sums a
    # parameter's gradient contributions in another order. Measured with 1, 2 and 4 threads: the largest
    # difference is 1.7e-7 of the run's largest gradient (wan21; ltxv 1.3e-7, hunyuan_video15 1.7e-7,
    # sd3 1.7e-7, chroma bit-identical), about one float32 rounding step; allowed: 2e-6 of it.
    scale = max(float(g.abs().max()) for g in grads[False])
    for without, with_ in zip(grads[False], grads[True]):
        torch.testing.assert_close(with_, without, rtol=0, atol=2e-6 * scale)


@pytest.mark.parametrize("kind", ["flux_dev", "hunyuan_video"])
def test_a_guidance_distilled_model_is_refused_saying_why(kind, tmp_path):
    from comfy_selfnpo import tiny_models

    ckpt = tiny_models.build_checkpoint(kind, seed=0)
    with pytest.raises(UnsupportedModel, match="guidance-distilled.*no real unconditional branch"):
        TDFTTrainer(ckpt.model, ckpt.clip, ckpt.vae, PromptList(PROMPTS), make_config("lora-8gb", resolution=64),
                    tmp_path / "run")


def test_frames_must_fit_the_vaes_time_compression(tmp_path):
    from comfy_selfnpo import tiny_models
    from comfy_selfnpo.training import DataError

    ckpt = tiny_models.build_checkpoint("wan21", seed=0)
    with pytest.raises(DataError, match=r"takes 4·k\+1 frames \(1, 5, 9"):
        TDFTTrainer(ckpt.model, ckpt.clip, ckpt.vae, PromptList(PROMPTS), make_config("lora-8gb", resolution=64, frames=8),
                    tmp_path / "run")
    image = tiny_models.build_checkpoint("sd3", seed=0)
    with pytest.raises(DataError, match="image model"):
        TDFTTrainer(image.model, image.clip, image.vae, PromptList(PROMPTS), make_config("lora-8gb", resolution=64, frames=5),
                    tmp_path / "run2")


def test_data_free_video_latents_follow_the_frames_and_the_vae(tmp_path):
    from comfy_selfnpo import tiny_models

    ckpt = tiny_models.build_checkpoint("wan22_5b", seed=0)  # 16x space, 4x time, 48 channels
    trainer = TDFTTrainer(ckpt.model, ckpt.clip, ckpt.vae, PromptList(PROMPTS),
                          make_config("lora-8gb", resolution=128, frames=9, trajectory_buffer=2), tmp_path / "run")
    assert trainer.encoded.latent_shape == (48, 3, 8, 8)
    default = TDFTTrainer(ckpt.model, ckpt.clip, ckpt.vae, PromptList(PROMPTS),
                          make_config("lora-8gb", resolution=64, trajectory_buffer=2), tmp_path / "run2")
    assert default.geometry.frames == 17 and default.encoded.latent_shape == (48, 5, 4, 4)


def test_ltxv_conditioning_arrives_as_in_sampling(tmp_path):
    """Its attention mask and frame rate come from ComfyUI's own conditioning path."""
    from comfy_selfnpo import tiny_models
    from comfy_selfnpo.training.conditioning import ROW_CONSTANTS

    ckpt = tiny_models.build_checkpoint("ltxv", seed=0)
    trainer = TDFTTrainer(ckpt.model, ckpt.clip, ckpt.vae, PromptList(PROMPTS), make_config(
        "lora-8gb", resolution=64, frames=9, trajectory_buffer=2), tmp_path / "run")
    cond = trainer.encoded.item_conds[0]
    assert "attention_mask" in cond and "frame_rate" in cond[ROW_CONSTANTS][0]
    batch = trainer.encoded.conds([0, 1], "cpu")
    assert batch["attention_mask"].shape[0] == 2 and len(batch[ROW_CONSTANTS]) == 2


def test_shift_changes_the_schedule_trained_and_the_run_identity(tmp_path):
    from comfy_selfnpo import tiny_models
    from comfy_selfnpo.training.identity import model_identity
    from comfy_selfnpo.training.model_loading import with_shift

    ckpt = tiny_models.build_checkpoint("sd3", seed=0)
    shifted = with_shift(ckpt.model, 6.0)
    sigmas = ckpt.model.get_model_object("model_sampling").sigmas
    assert float(shifted.get_model_object("model_sampling").sigmas[500]) > float(sigmas[500])
    assert model_identity(shifted) != model_identity(ckpt.model)
    trainer = TDFTTrainer(shifted, ckpt.clip, ckpt.vae, PromptList(PROMPTS), make_config("lora-8gb", resolution=64,
                          trajectory_buffer=2), tmp_path / "run")
    torch.testing.assert_close(trainer.schedule.sigmas.float(), shifted.get_model_object("model_sampling").sigmas.float())
    sd = tiny_models.build_checkpoint("sd15", seed=0)
    with pytest.raises(UnsupportedModel, match="flow models"):
        with_shift(sd.model, 3.0)


EXPECTED_ARCHITECTURE = {"sd15": "sd_v1", "sd2": "sd_v2_768_v", "sdxl": "sdxl_base_v1-0", "sd3": "sd3", "wan21": "wan",
                         "wan22_5b": "wan", "qwen_image": "qwen_image", "chroma": "chroma", "ltxv": "ltxv",
                         "lumina2": "lumina2", "hunyuan_video15": "hunyuan_video"}


@pytest.mark.parametrize("kind", list(EXPECTED_ARCHITECTURE))
def test_exported_files_say_which_model_they_belong_to(kind, tmp_path):
    """kohya's ss_* and the modelspec keys A1111/Forge and LoRA managers read (today every file read as SD1)."""
    import safetensors

    from comfy_selfnpo import tiny_models

    ckpt = tiny_models.build_checkpoint(kind, seed=0)
    trainer = TDFTTrainer(ckpt.model, ckpt.clip, ckpt.vae, PromptList(PROMPTS), make_config(
        "lora-8gb", resolution=64, frames=frames_for(kind), trajectory_buffer=2, steps=5), tmp_path / "run")
    trainer.model_name = f"{kind}.safetensors"
    for fmt in ("lora", "offset"):
        path = trainer.export(tmp_path / f"my_npo_{fmt}.safetensors", format=fmt)
        with safetensors.safe_open(str(path), "pt") as f:
            meta = f.metadata()
        assert meta["ss_base_model_version"] == EXPECTED_ARCHITECTURE[kind]
        assert meta["ss_output_name"] == f"my_npo_{fmt}" and meta["ss_sd_model_name"] == f"{kind}.safetensors"
        assert meta["ss_steps"] == "0" and meta["ss_max_train_steps"] == "5"
        assert meta["modelspec.architecture"].endswith("/lora" if fmt == "lora" else "/offset")
        assert meta["modelspec.title"] == f"my_npo_{fmt}" and "Self-NPO" in meta["modelspec.description"]
        assert meta["modelspec.date"].count("-") == 2 and meta["modelspec.resolution"] == "64x64"
        assert ("ss_network_dim" in meta) == (fmt == "lora")
        if fmt == "lora":
            assert meta["ss_network_dim"] == "8" and meta["ss_network_alpha"] == "8.0"
