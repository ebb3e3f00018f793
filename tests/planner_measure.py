"""The planner's check against measurement: one real training step on the CPU, measured as the process's
peak resident memory above its memory before any model was built.

Why peak RSS and how it is kept honest: torch's CPU allocator keeps no peak counter (no
max_memory_allocated), but every tensor byte it holds is resident once written (the model is
initialised, so no untouched pages), and the step runs in a fresh process, so nothing else grows.
glibc would keep freed large blocks in its heap (its mmap threshold grows after each free), which
makes RSS lag behind freed tensors; `MALLOC_MMAP_THRESHOLD_` pins the threshold, so every block above
64 KiB is its own mapping, returned at free, and `malloc_trim` returns the free pages of the heap
before each measurement, so smaller tensors that reuse them count too. The first step in a process also pays one-off costs that
are no tensors (lazy imports while ComfyUI builds a model, the kernel libraries' buffers: measured
~165 MB): a warm-up step of a tiny size runs first. Then the peak counter (VmHWM) is reset
(`/proc/self/clear_refs`) and the baseline is the RSS at that point.

  python tests/planner_measure.py '<json list of specs>'   -> prints {"measured": [bytes, ...]}
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}


def sd15_config(width: int):
    """A reduced SD1.5 UNet (ComfyUI's own class): SD1.5's layout at `width` base channels, two levels."""
    import comfy.supported_models

    from comfy_selfnpo.tiny_models import unets

    unet = {**unets.UNET_COMMON, **comfy.supported_models.SD15.unet_config, "model_channels": width,
            "context_dim": 256, "num_heads": 4, "num_head_channels": -1, "channel_mult": [1, 2],
            "num_res_blocks": [1, 1]}
    return comfy.supported_models.SD15(unet)


def run_config(spec: dict):
    """The run's config; planner.build_run fills in the SD1.5 recipe and layer names as the trainer does.
    float32 AdamW: the CPU cannot run 8-bit AdamW (the sd15 preset's), so the measured step could not
    either (the planner's 8-bit correction has a test of its own)."""
    from comfy_selfnpo.training import config as config_module

    preset = "lora-12gb" if spec["mode"] == "lora" else "sd15"
    return config_module.make_config(preset, mode=spec["mode"], teacher=spec["teacher"], batch_size=spec["batch"],
                                     grad_accum=1, truncation_steps=2, mixed_precision="no", optimizer="adamw",
                                     gradient_checkpointing=spec["checkpointing"])


def _rss(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def _real_step(spec: dict) -> None:
    """One real step of the planner's own step code (planner.build_run / steady_state / micro_batch)."""
    import torch

    from comfy_selfnpo.tiny_models import seeded_init_
    from comfy_selfnpo.training import planner
    from comfy_selfnpo.training.fake_tensors import target_attention

    latent = (4, spec["latent"], spec["latent"])
    with target_attention(), torch.inference_mode(False):
        patcher = planner.fake_model(sd15_config(spec["width"]), torch.float32)  # no fake mode: real weights
        seeded_init_(patcher.model.diffusion_model, 0)
        run = planner.build_run(patcher, run_config(spec))
        cond = planner._model_inputs(patcher.model, planner.TextShape(77, 256), latent)
        planner.steady_state(run)
        planner.micro_batch(run, cond, latent)
        run.optim.step()
        run.trained.update_teacher()


def measure(specs: list[dict]) -> list[int]:
    """Peak bytes above the baseline of each spec's step, one after the other in this process."""
    import ctypes
    import gc

    import torch

    torch.set_num_threads(1)
    _real_step({**specs[0], "width": 32, "latent": 8})  # warm-up (see the module docstring)
    peaks = []
    libc = ctypes.CDLL("libc.so.6")
    for spec in specs:
        gc.collect()
        libc.malloc_trim(0)  # free heap pages back to the system: reusing them counts as growth
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
        baseline = _rss("VmRSS")
        _real_step(spec)
        peaks.append(_rss("VmHWM") - baseline)
    return peaks


def measured_peaks(specs: list[dict]) -> list[int]:
    """measure(specs) in a fresh process (see the module docstring)."""
    env = {**os.environ, **MALLOC_ENV}
    out = subprocess.run([sys.executable, __file__, json.dumps(specs)], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])["measured"]


if __name__ == "__main__":
    import logging

    import conftest  # noqa: F401  boots the pack and ComfyUI (CPU mode) as for the tests

    logging.disable(logging.WARNING)
    print(json.dumps({"measured": measure(json.loads(sys.argv[1]))}))
