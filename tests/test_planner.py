"""The planner (training/planner.py): its predicted peak against a measured one, its FLOP against the
formulas, and a plan of the full-size SDXL UNet on this CPU without allocating it."""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import torch

from comfy_selfnpo.training import planner
from comfy_selfnpo.training.config import make_config
from comfy_selfnpo.training.fake_tensors import FlopTally, HostFakeMode
from comfy_selfnpo.training.real_models import REAL_MODELS

from cli_setup import run_cli
from planner_measure import measured_peaks, run_config, sd15_config

# reduced SD1.5 UNets (SD1.5's layout, 2 levels), full weights and LoRA, with and without checkpointing
MEASURED = [
    {"mode": "full", "teacher": "ema", "batch": 2, "checkpointing": False, "width": 64, "latent": 32},
    {"mode": "lora", "teacher": "base", "batch": 2, "checkpointing": True, "width": 64, "latent": 32},
    {"mode": "full", "teacher": "base", "batch": 1, "checkpointing": True, "width": 96, "latent": 24},
    {"mode": "lora", "teacher": "ema", "batch": 2, "checkpointing": False, "width": 64, "latent": 40},
]


def _plan(spec: dict) -> planner.Plan:
    latent = (4, spec["latent"], spec["latent"])
    return planner.plan(sd15_config(spec["width"]), run_config(spec), planner.TextShape(77, 256), latent, torch.float32)


def test_predicted_peak_is_within_15_percent_of_the_measured_one():
    predicted = [_plan(spec).peak for spec in MEASURED]
    measured = measured_peaks(MEASURED)  # one real step each, in a fresh process (planner_measure.py)
    ratios = [p / m for p, m in zip(predicted, measured)]
    print("planner check", [(round(p / 2 ** 20, 1), round(m / 2 ** 20, 1), round(r, 3)) for p, m, r in zip(predicted, measured, ratios)])
    assert all(abs(r - 1) <= 0.15 for r in ratios), list(zip(MEASURED, predicted, measured, ratios))


def test_checkpointing_and_the_split_of_the_peak_add_up():
    spec = {**MEASURED[0], "checkpointing": True}
    with_ckpt, without = _plan(spec), _plan(MEASURED[0])
    assert with_ckpt.parts["activations and temporaries"] < 0.6 * without.parts["activations and temporaries"]
    parts = without.parts
    assert sum(parts.values()) == without.peak
    # full weights, EMA teacher, AdamW: a float32 student, teacher and two moments, as big as the base
    assert parts["trainable parameters"] == parts["teacher copy (EMA)"] == parts["optimizer state"] // 2
    assert parts["trainable parameters"] == 4 * without.trainable_params


def test_flop_tally_counts_matmuls_and_the_cpu_attention_kernel_by_the_formulas():
    tally = FlopTally()
    with HostFakeMode(flops=tally):
        x, w = torch.empty(8, 64), torch.empty(32, 64)
        torch.nn.functional.linear(x, w)
        assert tally.total == 2 * 8 * 64 * 32
        q = torch.empty(2, 4, 128, 16)
        before = tally.total
        torch.nn.functional.scaled_dot_product_attention(q, q, q)
        assert tally.total - before == 2 * (2 * 2 * 4 * 128 * 128 * 16)  # q·kᵀ and the weighted sum of v


def test_plan_of_the_full_size_sdxl_unet_allocates_nothing():
    """The whole SDXL UNet (2.6 B parameters, 5.1 GB in fp16), one LoRA step at 1024 px: the process
    grows by far less than the model (no weight exists), and the figures are the model's."""
    sdxl = REAL_MODELS["SDXL"]
    config = make_config("lora-12gb", truncation_steps=1, corruption_guidance=-1.0, batch_size=1,
                         lora_targets=r"(^|\.)attn[12]\.(to_q|to_k|to_v|to_out\.0)$", mixed_precision="fp16")
    Path("/proc/self/clear_refs").write_text("5")  # process peak (VmHWM) from here
    before = _status_kb("VmRSS")
    started = time.perf_counter()
    plan = planner.plan(sdxl.model_config(), config, sdxl.text, sdxl.latent_shape(1024))
    grown = (_status_kb("VmHWM") - before) * 1024
    base = plan.parts["base weights"]
    assert 2 * 2.5e9 < base < 2 * 2.7e9, base  # fp16 weights of 2.57 B parameters
    assert plan.peak > base and grown < 0.15 * base, (grown, base, time.perf_counter() - started)
    # the student's forward, backward and checkpointing's recomputation cost more than 2 teacher passes
    assert plan.weight_dtype == "float16" and plan.student_flop > plan.teacher_flop > 0


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(field)


def test_cli_plan_prints_the_table_and_trains_nothing(tmp_path):
    from comfy_selfnpo import tiny_models

    ckpt = tmp_path / "tiny_sd15.safetensors"
    tiny_models.save_checkpoint(str(ckpt), "sd15", seed=0)
    out = tmp_path / "run"
    proc = run_cli(["--checkpoint", ckpt, "--plan", "--preset", "lora-8gb", "--resolution", "64", "--output", out])
    assert proc.returncode == 0, proc.stderr
    assert "peak accelerator memory" in proc.stdout and "fits" in proc.stdout, proc.stdout
    assert "attention_pytorch" in proc.stdout and not out.exists()


def test_train_node_plan_report_gives_the_plan_of_its_model(tiny):
    """The node's hook (nodes/train.py plan_report): the plan of the MODEL it was given, as stored on a
    GPU (fp16 for an SD UNet), before training starts."""
    from comfy_selfnpo.nodes.train import plan_report

    ckpt = tiny.build_checkpoint("sd15", seed=0)
    config = make_config("lora-8gb", resolution=64, batch_size=1, grad_accum=1)
    text = plan_report(ckpt.model, ckpt.clip, ckpt.vae, config)
    assert "peak accelerator memory" in text and "float16" in text, text
    assert "attention_pytorch" in text and "fits" in text and "TFLOP" in text, text


def test_a_family_with_in_place_blocks_is_planned_with_the_trainers_saved_copies(tiny):
    """Chroma's blocks update tensors in place; the trainer then lets autograd keep copies of what it
    saves (trainer._probe_in_place_updates), and so does the planner's step; SD1.5's do not."""
    config = make_config("lora-8gb", resolution=64, batch_size=1, grad_accum=1, truncation_steps=1,
                         gradient_checkpointing=False)
    notes = {}
    for kind in ("chroma", "sd15"):
        ckpt = tiny.build_checkpoint(kind, seed=0)
        notes[kind] = planner.plan_for_model(ckpt.model, ckpt.clip, ckpt.vae, config, both_checkpointing=False).notes
    assert notes == {"chroma": [planner.SAVED_COPIES_NOTE], "sd15": []}


def test_eight_bit_adamw_is_planned_at_two_bytes_per_parameter():
    spec = {**MEASURED[0], "width": 32, "latent": 16}
    latent = (4, 16, 16)
    plans = {name: planner.plan(sd15_config(32), dataclasses.replace(run_config(spec), optimizer=name),
                                planner.TextShape(77, 256), latent, torch.float32) for name in ("adamw", "adamw8bit")}
    fp32, eight_bit = plans["adamw"].parts["optimizer state"], plans["adamw8bit"].parts["optimizer state"]
    assert fp32 == 8 * plans["adamw"].trainable_params and eight_bit == fp32 // 4
    assert plans["adamw"].peak - plans["adamw8bit"].peak == fp32 - eight_bit


def test_a_lora_run_streaming_its_base_needs_the_peak_without_the_base_plus_its_largest_layers(tiny):
    """Plan.streamed_peak (ComfyUI's partial loading of the frozen base, LoRA only): the peak less the
    base weights, plus the largest base layer twice; full fine-tuning keeps every weight resident."""
    ckpt = tiny.build_checkpoint("sd15", seed=0)
    small = dict(resolution=64, batch_size=1, grad_accum=1, truncation_steps=1)
    lora = planner.plan_for_model(ckpt.model, ckpt.clip, ckpt.vae, make_config("lora-8gb", **small),
                                  both_checkpointing=False)
    largest = max(m.weight.numel() * m.weight.element_size() + (m.bias.numel() * m.bias.element_size()
                                                                if getattr(m, "bias", None) is not None else 0)
                  for m in ckpt.model.model.diffusion_model.modules()
                  if getattr(m, "weight", None) is not None and not list(m.children()))
    largest = largest * 2 // ckpt.model.model.diffusion_model.input_blocks[0][0].weight.element_size()  # fp16
    assert lora.parts["base weights"] > 0
    assert lora.streamed_peak == lora.peak - lora.parts["base weights"] + 2 * largest
    assert lora.streamed_peak < lora.peak
    full = planner.plan_for_model(ckpt.model, ckpt.clip, ckpt.vae, make_config("sd15", **small, optimizer="adamw"),
                                  both_checkpointing=False)
    assert full.streamed_peak is None and not full.fits_streamed(80)
