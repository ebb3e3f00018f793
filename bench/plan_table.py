"""The planner's table (README "Memory and time per preset"): for the real model of every supported
family (training/real_models.py) and every memory preset, the predicted peak GPU memory, TFLOP per
optimizer step and minutes per 1,000 steps, from one training step of the pack's own code run on fake
tensors (training/planner.py) — no GPU, no weights, a few minutes per row on a laptop CPU.

Throughput assumption (stated with the table): sustained THROUGHPUT_TFLOPS, 40 % of an RTX 4090's
165 dense fp16/bf16 tensor TFLOP/s (fp32 accumulate). Minutes scale inversely with it (an H100 SXM
at the same 40 % of its 989 TFLOP/s: divide by 6).

--authors: the predicted peak of this pack's step against the authors' loop (bench/tdft_step.py's
re-implementation of Self-NPO/train.py on diffusers, run on the same fake tensors) at the authors'
own sizes: SD1.5 512 px batch 20, SDXL 1024 px batch 10 with gradient checkpointing.

  python bench/plan_table.py                       # every model x preset (~1 h on 2 busy cores)
  python bench/plan_table.py --models SDXL --presets lora-12gb
  python bench/plan_table.py --authors
Writes bench/results/plan_table.json (and prints the Markdown table); --authors plan_authors.json.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

from _boot import ROOT, boot_comfyui

RESULTS = ROOT / "bench" / "results" / "plan_table.json"
AUTHORS_RESULTS = ROOT / "bench" / "results" / "plan_authors.json"
THROUGHPUT_TFLOPS = 66.0
LORA_PRESETS = ("lora-8gb", "lora-12gb", "lora-16gb", "lora-24gb")
AS_PUBLISHED = {"SD1.5": "sd15", "SDXL": "sdxl"}  # the authors' published runs, as memory presets


def _family(real):
    """The family row (training/families.py) of a real model, from its fake-built layers."""
    import torch

    from comfy_selfnpo.training.families import family_of
    from comfy_selfnpo.training.fake_tensors import HostFakeMode
    from comfy_selfnpo.training.planner import fake_model

    with HostFakeMode():
        return family_of(fake_model(real.model_config(), torch.bfloat16).model)


def plan_row(real, preset: str, overrides: dict) -> dict:
    from comfy_selfnpo.training.config import make_config
    from comfy_selfnpo.training.planner import plan
    from comfy_selfnpo.training.recipes import resolve
    from comfy_selfnpo.training.trainer import family_settings

    family = _family(real)
    config = resolve(make_config(preset, **overrides), family)  # the family's recipe, as a run resolves it
    run_config = family_settings(config, family)
    p = plan(real.model_config(), run_config, real.text,
             dataclasses.replace(real, frames=config.frames).latent_shape(config.resolution), name=real.name)
    return {"model": real.name, "preset": preset, "resolution": config.resolution, "frames": real.frames,
            "batch": config.batch_size, "grad_accum": config.grad_accum, "checkpointing": config.gradient_checkpointing,
            "w": config.corruption_guidance, "peak_gb": p.peak / 2 ** 30, "peak_phase": p.peak_phase,
            "parts_gb": {k: v / 2 ** 30 for k, v in p.parts.items()}, "trainable_m": p.trainable_params / 1e6,
            "weight_dtype": p.weight_dtype, "tflop": p.flop / 1e12, "teacher_tflop": p.teacher_flop / 1e12,
            "minutes_per_1000": p.flop * 1000 / (THROUGHPUT_TFLOPS * 1e12) / 60,
            "smallest_card_gb": p.smallest_card(), "fits_12gb": p.fits(12), "plan_s": p.seconds,
            "streamed_peak_gb": None if p.streamed_peak is None else p.streamed_peak / 2 ** 30,
            "smallest_card_streamed_gb": p.smallest_card_streamed(), "fits_12gb_streamed": p.fits_streamed(12),
            "attention": p.attention}


def _rows(models, presets) -> list[tuple]:
    todo = []
    for name in models:
        for preset in presets:
            if preset == "as-published":
                if name not in AS_PUBLISHED:
                    continue
                preset = AS_PUBLISHED[name]
            todo.append((name, preset, {}))
    return todo


def markdown(rows: list[dict]) -> str:
    lines = ["| model | preset | px (frames) | w | batch × accum | ckpt | peak GB | fits 12 GB | smallest card | "
             "TFLOP / step | min / 1,000 steps |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        px = f"{r['resolution']}" + (f" ({r['frames']})" if r["frames"] > 1 else "")
        lines.append(f"| {r['model']} | {r['preset']} | {px} | {r['w']:g} | {r['batch']} × {r['grad_accum']} | "
                     f"{'yes' if r['checkpointing'] else 'no'} | {r['peak_gb']:.1f} | {_fits_12(r)} "
                     f"| {_card(r)} | {r['tflop']:.0f} | {r['minutes_per_1000']:.0f} |")
    return "\n".join(lines)


def _fits_12(r: dict) -> str:
    if r["fits_12gb"]:
        return "yes"
    return "streamed" if r.get("fits_12gb_streamed") else "**no**"


def _card(r: dict) -> str:
    card = f"{r['smallest_card_gb']} GB" if r["smallest_card_gb"] else "> 80 GB"
    streamed = r.get("smallest_card_streamed_gb")
    if streamed and streamed != r["smallest_card_gb"]:
        card += f" ({streamed} GB streamed)"
    return card


def _save(payload: dict, path=RESULTS) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=1))


def main(argv=None) -> None:
    from comfy_selfnpo.training.real_models import REAL_MODELS

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="*", default=list(REAL_MODELS), choices=list(REAL_MODELS))
    parser.add_argument("--presets", nargs="*", default=[*LORA_PRESETS, "as-published"])
    parser.add_argument("--authors", action="store_true", help="only the comparison with the authors' loop")
    parser.add_argument("--out", default=str(RESULTS), help=f"JSON written (default {RESULTS})")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=JSON",
                        help="config overrides of every row, e.g. gradient_checkpointing=true batch_size=4")
    args = parser.parse_args(argv)
    if args.authors:
        _save({"authors": authors_comparison()}, AUTHORS_RESULTS)
        return
    payload = {"throughput_tflops": THROUGHPUT_TFLOPS, "rows": []}
    extra = {key: json.loads(value) for key, value in (item.split("=", 1) for item in args.set)}
    for name, preset, overrides in _rows(args.models, args.presets):
        row = plan_row(REAL_MODELS[name], preset, {**overrides, **extra})
        row["overrides"] = extra
        payload["rows"].append(row)
        _save(payload, Path(args.out))
        print(f"  {name} {preset}: {row['peak_gb']:.2f} GB, {row['tflop']:.0f} TFLOP ({row['plan_s']:.0f} s)",
              file=sys.stderr, flush=True)
    print(markdown(payload["rows"]))
    print(f"\nminutes at a sustained {THROUGHPUT_TFLOPS:g} TFLOP/s; written {args.out}")


# ------------------------------------------------------------------ against the authors' loop

def _authors_peak(size: dict) -> tuple[int, float]:
    """The peak bytes of one step of bench/tdft_step.py's authors' loop at `size`, on fake tensors:
    its warm-up step makes the optimizer state, the second is measured (AdamW on its GPU path)."""
    import functools

    import torch

    import tdft_step
    from comfy_selfnpo.training.fake_tensors import HostFakeMode, MemoryTracker

    tracker = MemoryTracker()

    def measure(one_step, spec, device, params):
        one_step()
        tracker.reset_peak()
        one_step()
        return {"params": params}

    started = time.perf_counter()
    adamw, measure_before = torch.optim.AdamW, tdft_step._measure
    torch.optim.AdamW, tdft_step._measure = functools.partial(adamw, foreach=True), measure
    try:
        with HostFakeMode(tracker), torch.inference_mode(False):
            tdft_step.authors_loop(dict(size, device="cpu"))
    finally:
        torch.optim.AdamW, tdft_step._measure = adamw, measure_before
    return tracker.peak, time.perf_counter() - started


def authors_comparison() -> list[dict]:
    import tdft_step
    from comfy_selfnpo.training.real_models import REAL_MODELS

    sizes = {"SD1.5": dict(diffusers_config=tdft_step.SD15_DIFFUSERS, latent=64, batch=20, amp=True,
                           grad_ckpt=False, w=-1.0),
             "SDXL": dict(diffusers_config=tdft_step.SDXL_DIFFUSERS, latent=128, batch=10, amp=True,
                          grad_ckpt=True, w=-5.0)}
    out = []
    for name, size in sizes.items():
        # both sides with float32 AdamW, as the re-implementation traces the authors' loop (their scripts
        # use 8-bit AdamW, which takes 6 bytes per parameter off both sides alike)
        ours = plan_row(REAL_MODELS[name], AS_PUBLISHED[name], {"batch_size": size["batch"], "grad_accum": 1,
                                                               "optimizer": "adamw"})
        theirs, seconds = _authors_peak(size)
        row = {"model": name, "batch": size["batch"], "ours_gb": ours["peak_gb"], "ours_parts_gb": ours["parts_gb"],
               "authors_gb": theirs / 2 ** 30, "ratio": ours["peak_gb"] / (theirs / 2 ** 30),
               "authors_plan_s": seconds}
        out.append(row)
        print(f"{name} batch {size['batch']}: ours {row['ours_gb']:.1f} GB, authors' loop {row['authors_gb']:.1f} GB, "
              f"ratio {row['ratio']:.2f}", flush=True)
    return out


if __name__ == "__main__":
    boot_comfyui(cpu=True)
    import logging

    import torch

    logging.disable(logging.WARNING)
    torch.set_num_threads(1)
    main()
