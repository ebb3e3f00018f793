"""The method's recipe comes from the loaded model's family, never from the memory preset, and an
explicit value always wins (issue 17 §1); what the teacher actually received is checked on tiny real
models: SDXL's zeroed text embeddings and pooled output with the crop passed to both branches, SD1.5's
empty prompt. Wan 2.2 A14B: each expert trains over its own noise range only. The CLI's
--print-config round trip; the default prompt list (§3)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from cli_setup import TINY_HPARAMS, files, run, write_prompts  # noqa: F401
from comfy_selfnpo.training import PromptList, TDFTTrainer, make_config
from comfy_selfnpo.training.config import DEFAULT_PRESET, PRESETS
from comfy_selfnpo.training.data import ImageCaptionFolder, default_prompts
from comfy_selfnpo.training.families import FAMILIES, family_of
from comfy_selfnpo.training.recipes import resolve, resolve_for_model

PROMPTS = ["a red cube", "a dog on a beach", "a portrait of a sailor"]
SMALL = dict(resolution=64, batch_size=2, grad_accum=1, steps=1, lora_rank=2, lora_alpha=2.0, trajectory_buffer=2,
             grid_size=10, truncation_steps=3, mixed_precision="no", gradient_checkpointing=False, seed=4)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Captioned images taller than wide, so a random square crop has room to move (top 0 … 8)."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for i, caption in enumerate(PROMPTS):
        Image.fromarray(rng.integers(0, 255, (72, 64, 3), dtype=np.uint8)).save(root / f"{i}.png")
        (root / f"{i}.txt").write_text(caption)
    return root


def spy_teacher(trainer) -> list[dict]:
    """Every conditioning the teacher receives (after the trainer batched cond and uncond rows)."""
    seen, forward = [], trainer.trained.teacher_forward

    def teacher_forward(x, sigma, cond):
        seen.append({k: v.detach().clone() for k, v in cond.items() if torch.is_tensor(v)})
        return forward(x, sigma, cond)
    trainer.trained.teacher_forward = teacher_forward
    return seen


def test_the_memory_presets_carry_no_recipe_value_and_each_family_resolves_its_own(tiny):
    sd15, sdxl = tiny.build_model("sd15"), tiny.build_model("sdxl")
    for preset in PRESETS:
        config = make_config(preset)
        a, b = resolve_for_model(config, sd15), resolve_for_model(config, sdxl)
        lr = (1e-6, 1e-7) if config.mode == "full" else (1e-4, 1e-4)
        assert (a.corruption_guidance, a.uncond, a.resolution, a.crop, a.learning_rate, a.weight_decay) == (
            -1.0, "empty_prompt", 512, "center", lr[0], 1e-3), preset
        assert (b.corruption_guidance, b.uncond, b.resolution, b.crop, b.learning_rate, b.weight_decay) == (
            -5.0, "zeros", 1024, "random", lr[1], 0.0), preset
        assert resolve_for_model(a, sd15) == a  # resolving twice changes nothing
    # an explicit value always wins over the family's recipe, whatever the preset
    given = make_config(DEFAULT_PRESET, corruption_guidance=-2.0, uncond="empty_prompt", resolution=768,
                        learning_rate=3e-5, crop="center")
    won = resolve_for_model(given, sdxl)
    assert (won.corruption_guidance, won.uncond, won.resolution, won.learning_rate, won.crop) == (
        -2.0, "empty_prompt", 768, 3e-5, "center")
    # every registry row has a recipe, export metadata and a diffusers row
    for family in FAMILIES:
        assert family.recipe.why and family.architecture and family.diffusers_family().model_class == family.diffusers


def test_each_tiny_model_finds_its_registry_row_and_that_row_names_its_diffusers_table(tiny):
    from comfy_selfnpo.npo import diffusers_names

    for kind in tiny.KINDS:
        base = tiny.build_model(kind).model
        row = family_of(base)
        assert row.configs, kind  # matched by its config class, not by layer names
        assert row.diffusers == diffusers_names.family_of(base).model_class, kind


def test_sdxl_under_the_default_preset_trains_with_w_minus_5_zeroed_uncond_and_pooled_and_passed_crops(tiny, images,
                                                                                                       tmp_path):
    from comfy_selfnpo.tiny_models import SDXL_POOLED_DIM

    ckpt = tiny.build_checkpoint("sdxl")
    at_1024 = resolve_for_model(make_config(DEFAULT_PRESET), ckpt.model)
    assert at_1024.resolution == 1024 and family_of(ckpt.model.model).name == "SDXL"
    # the run itself at a tiny size (only the resolution is given); everything else the default preset's
    trainer = TDFTTrainer(ckpt.model, ckpt.clip, ckpt.vae, ImageCaptionFolder(images, 64),
                          make_config(DEFAULT_PRESET, **SMALL), tmp_path / "run")
    c = trainer.config
    assert (c.corruption_guidance, c.uncond, c.crop, c.learning_rate, c.weight_decay) == (-5.0, "zeros", "random",
                                                                                          1e-4, 0.0)
    seen = spy_teacher(trainer)
    trainer.train_step()
    assert seen, "the teacher ran"
    for cond in seen:  # w = −5: every teacher batch is [caption rows; unconditional rows]
        text, uncond_text = cond["c_crossattn"].chunk(2)
        y, uncond_y = cond["y"].chunk(2)
        assert uncond_text.abs().max() == 0 and text.abs().max() > 0
        assert uncond_y[:, :SDXL_POOLED_DIM].abs().max() == 0 and y[:, :SDXL_POOLED_DIM].abs().max() > 0
        # sizes and crop (the rest of y) passed to both branches alike, as the authors' add_time_ids
        assert torch.equal(y[:, SDXL_POOLED_DIM:], uncond_y[:, SDXL_POOLED_DIM:])
    crops = {tuple(cond[SDXL_POOLED_DIM:].tolist()) for cond in torch.cat([c["y"] for c in seen])}
    origins = [trainer.data.crop_origin(i, at) for i, at in enumerate(_crops(trainer))]
    assert len({o for o in origins}) > 1 and len(crops) > 1  # the images' crops differ, and so does y


def _crops(trainer):
    from comfy_selfnpo.training.encoding import random_crops

    return random_crops(trainer.data, trainer.config.seed)


def test_sd15_keeps_w_minus_1_and_the_empty_prompt(tiny, tmp_path):
    from comfy_selfnpo.training.conditioning import TextEncoder

    ckpt = tiny.build_checkpoint("sd15")
    assert resolve_for_model(make_config(DEFAULT_PRESET), ckpt.model).resolution == 512
    trainer = TDFTTrainer(ckpt.model, ckpt.clip, None, PromptList(PROMPTS), make_config(DEFAULT_PRESET, **SMALL),
                          tmp_path / "run")
    assert (trainer.config.corruption_guidance, trainer.config.uncond) == (-1.0, "empty_prompt")
    seen = spy_teacher(trainer)
    trainer.train_step()
    empty = TextEncoder(ckpt.model.model, ckpt.clip, (4, 8, 8)).prompt("", "negative").tensors["c_crossattn"]
    assert seen and all(torch.equal(cond["c_crossattn"], empty.expand_as(cond["c_crossattn"])) for cond in seen)
    assert empty.abs().max() > 0


def test_explicit_override_wins_in_the_trainer(tiny, tmp_path):
    ckpt = tiny.build_checkpoint("sdxl")
    trainer = TDFTTrainer(ckpt.model, ckpt.clip, None, PromptList(PROMPTS),
                          make_config(DEFAULT_PRESET, **{**SMALL, "corruption_guidance": -1.0,
                                                         "uncond": "empty_prompt"}), tmp_path / "run")
    seen = spy_teacher(trainer)
    trainer.train_step()
    assert (trainer.config.corruption_guidance, trainer.config.uncond) == (-1.0, "empty_prompt")
    assert all(cond["c_crossattn"].abs().max() > 0 for cond in seen)  # the empty prompt, not zeros, one branch


@pytest.mark.parametrize("expert", ["high_noise", "low_noise"])
def test_wan22_a14b_expert_trains_only_its_own_noise_range(tiny, tmp_path, expert):
    """All start levels, teacher evaluations and student re-noise levels lie in the expert's range
    (sigma >= 0.875 for the high-noise expert, below it for the low-noise one)."""
    ckpt = tiny.build_checkpoint("wan22_a14b")
    model = ckpt.experts[expert]
    clips = tmp_path / "clips"
    clips.mkdir()
    rng = np.random.default_rng(1)
    for i, caption in enumerate(PROMPTS):  # one-frame clips: images
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(clips / f"{i}.png")
        (clips / f"{i}.txt").write_text(caption)
    data = ImageCaptionFolder(clips, 64) if expert == "low_noise" else PromptList(PROMPTS)
    config = make_config("lora-8gb", **{**SMALL, "grid_size": 25, "truncation_steps": 5, "frames": 1,
                                        "expert": expert, "steps": 3, "trajectory_buffer": 4})
    trainer = TDFTTrainer(model, ckpt.clip, ckpt.vae, data, config, tmp_path / "run")
    assert trainer.config.expert_boundary == 0.875  # Wan 2.2's text-to-video switch point
    sigmas = {"teacher": [], "student": []}
    for role in sigmas:
        forward = getattr(trainer.trained, f"{role}_forward")

        def spy(x, sigma, cond, forward=forward, role=role):
            sigmas[role].append(sigma.detach().float().cpu())
            return forward(x, sigma, cond)
        setattr(trainer.trained, f"{role}_forward", spy)
    trainer.train(steps=3)
    teacher, student = torch.cat(sigmas["teacher"]), torch.cat(sigmas["student"])
    assert len(student) == 3 * SMALL["batch_size"] and len(teacher) > len(student)
    if expert == "high_noise":
        assert teacher.min() >= 0.875 and student.min() >= 0.875
    else:
        assert teacher.max() < 0.875 and student.max() < 0.875
    whole = trainer.schedule.sigmas[trainer.grid]
    assert whole.min() < 0.875 <= whole.max()  # the range is a real restriction of this model's grid


def test_wan22_low_noise_expert_refuses_prompt_only_training(tiny, tmp_path):
    from comfy_selfnpo.training import DataError

    ckpt = tiny.build_checkpoint("wan22_a14b")
    with pytest.raises(DataError, match="low-noise expert"):
        TDFTTrainer(ckpt.model, ckpt.clip, ckpt.vae, PromptList(PROMPTS),
                    make_config("lora-8gb", **{**SMALL, "frames": 1, "expert": "low_noise"}), tmp_path / "run")


def _print_config(capsys, *args) -> str:
    from comfy_selfnpo.training import cli

    code = cli.main([str(a) for a in args] + ["--print-config"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return captured.out


def test_print_config_reads_back_as_the_same_config(files, capsys, tmp_path):  # noqa: F811
    import tomllib

    first = _print_config(capsys, "--checkpoint", files / "tiny.safetensors", "--prompts", files / "prompts.txt",
                          "--steps", 7, "--corruption-guidance", -3, "--output", tmp_path / "out")
    written = tmp_path / "run.toml"
    written.write_text(first)
    assert _print_config(capsys, "--config", written) == first  # --config reads it back: the same config
    hyper = tomllib.loads(first)["hyperparameters"]
    preset = PRESETS[DEFAULT_PRESET]
    assert (hyper["steps"], hyper["corruption_guidance"], hyper["lora_rank"], hyper["batch_size"]) == (
        7, -3.0, preset["lora_rank"], preset["batch_size"])  # flags, then the default preset
    assert (hyper["resolution"], hyper["uncond"], hyper["learning_rate"]) == (512, "empty_prompt", 1e-4)  # recipe
    # a flag still beats the file
    assert 'steps = 9' in _print_config(capsys, "--config", written, "--steps", 9)


def test_help_says_what_a_run_uses(capsys):
    from comfy_selfnpo.training import cli

    assert cli.main(["--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "the model family's recipe" in text and f"(preset {DEFAULT_PRESET})" in text and "--print-config" in text


def test_prompt_only_training_without_prompts_uses_the_default_list(files, capsys, tmp_path):  # noqa: F811
    from comfy_selfnpo.nodes.train import data_source

    default = default_prompts()
    assert len(default) >= 300 and len(set(default.prompts)) == len(default)
    assert not any(p.startswith("#") for p in default.prompts)
    assert data_source("", "", "  \n", make_config()).prompts == default.prompts  # the node, prompts left empty
    code, err = run(capsys, "--checkpoint", files / "tiny.safetensors", *TINY_HPARAMS, "--steps", 1,
                    "--output", tmp_path / "out")
    assert code == 0 and f"; {len(default)} prompts (the pack's default list);" in err
