"""Cost of Self-NPO guidance next to plain CFG, in one run.

Routes, each sampled with KSampler's code path (nodes.common_ksampler) on the same model, noise and
conditioning:
  plain_cfg            plain CFG (no negative model): the reference for time and memory
  <mode>_separate      Apply Self-NPO in that mode, residency separate (the negative holds its own weights)
  <mode>_batched       the same, residency batched_lowrank (one copy of the weights)
                       modes: npo, autoguidance (ag), cfg+autoguidance (cfg+ag)
  npo_*_0-0.5          mode npo only for start_percent 0 to end_percent 0.5, plain CFG after
  comfy_hooks          ComfyUI's own route: the NPO LoRA as a weight hook on the negative conditioning
                       (exact for mode npo, but not supported by the dynamic-VRAM memory manager)
Each route runs in a fresh process (clean memory statistics). Reported: diffusion-model forwards and
batch rows per step (exact), time per sampling step (best of --repeats runs: the least disturbed by
other processes on a shared CPU) in wall and in CPU seconds (the process's own work, steadier still), peak
memory (CUDA peak allocation on GPU, peak RSS growth on CPU), the weights held after setup, all as
ratios to plain CFG, and each route's final latent against the separate residency of the same mode
and interval (the residencies must agree; comfy_hooks is compared with npo_separate).

  python bench/guidance.py                 # tiny SD1.5 and SDXL models on the CPU
  python bench/guidance.py --full-size     # SD1.5 and SDXL architectures, random fp16 weights, GPU
  python bench/guidance.py --full-width    # the full SD1.5 UNet, random fp32 weights, at latent 16
                                           # (128 px) on one CPU thread: plain CFG, NPO separate, batched
Writes bench/results/guidance.json.
"""
from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import resource
import sys
import time

from dataclasses import dataclass  # noqa: E402

from _boot import ROOT, boot_comfyui  # noqa: E402


@dataclass(frozen=True)
class Route:
    name: str
    residency: str | None = None  # None: no Self-NPO
    mode: str = "npo"
    interval: tuple = (0.0, 1.0)
    comfy_hooks: bool = False     # ComfyUI's weight hooks on the negative conditioning instead
    reference: str = "npo_separate"  # the route whose final latent this one must reproduce


HALF = (0.0, 0.5)
ROUTES = {r.name: r for r in (
    Route("plain_cfg"),
    Route("npo_separate", "separate"),
    Route("npo_batched", "batched_lowrank"),
    Route("ag_separate", "separate", "autoguidance", reference="ag_separate"),
    Route("ag_batched", "batched_lowrank", "autoguidance", reference="ag_separate"),
    Route("cfg+ag_separate", "separate", "cfg+autoguidance", reference="cfg+ag_separate"),
    Route("cfg+ag_batched", "batched_lowrank", "cfg+autoguidance", reference="cfg+ag_separate"),
    Route("npo_sep_0-0.5", "separate", interval=HALF, reference="npo_sep_0-0.5"),
    Route("npo_bat_0-0.5", "batched_lowrank", interval=HALF, reference="npo_sep_0-0.5"),
    Route("comfy_hooks", comfy_hooks=True),
)}

# SD1.5 and SDXL UNet configurations as ComfyUI detects them (comfy/model_detection.py)
FULL_UNETS = {
    "sd15": {"use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True,
             "legacy": False, "adm_in_channels": None, "in_channels": 4, "model_channels": 320,
             "num_res_blocks": [2, 2, 2, 2], "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0],
             "channel_mult": [1, 2, 4, 4], "transformer_depth_middle": 1, "use_linear_in_transformer": False,
             "context_dim": 768, "num_heads": 8, "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
             "use_temporal_attention": False, "use_temporal_resblock": False},
    "sdxl": {"use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True,
             "legacy": False, "num_classes": "sequential", "adm_in_channels": 2816, "in_channels": 4,
             "model_channels": 320, "num_res_blocks": [2, 2, 2], "transformer_depth": [0, 0, 2, 2, 10, 10],
             "channel_mult": [1, 2, 4], "transformer_depth_middle": 10, "use_linear_in_transformer": True,
             "context_dim": 2048, "num_head_channels": 64, "transformer_depth_output": [0, 0, 0, 2, 2, 2, 10, 10, 10],
             "use_temporal_attention": False, "use_temporal_resblock": False},
}


def _build(kind: str, full_size: bool, seed: int = 0, latent: int | None = None):
    """(positive ModelPatcher, positive cond, negative cond, latent) for one architecture; `latent`:
    the full-size architecture in float32 on the CPU at that latent size (--full-width)."""
    import torch
    import comfy.model_management
    import comfy.model_patcher
    import comfy.supported_models

    gen = torch.Generator().manual_seed(seed)
    if full_size or latent:
        config_cls = comfy.supported_models.SD15 if kind == "sd15" else comfy.supported_models.SDXL
        config = config_cls(dict(FULL_UNETS[kind]))
        config.set_inference_dtype(torch.float32 if latent else torch.float16, None)
        device = comfy.model_management.get_torch_device()
        model = config.get_model({}, device=device)
        # seeded: every route runs in its own process and must sample the same random model
        weight_gen = torch.Generator(device=device).manual_seed(seed)
        with torch.no_grad():
            for p in model.diffusion_model.parameters():
                if p.ndim >= 2:
                    p.normal_(0, 1 / math.sqrt(p[0].numel()), generator=weight_gen)
                else:
                    p.normal_(0, 0.02, generator=weight_gen) if p.ndim == 1 else None
        patcher = comfy.model_patcher.ModelPatcher(model, load_device=device,
                                                   offload_device=comfy.model_management.unet_offload_device())
        context, pooled, size = FULL_UNETS[kind]["context_dim"], 1280, latent or (128 if kind == "sdxl" else 64)
    else:
        from comfy_selfnpo import tiny_models

        patcher = tiny_models.build_model(kind, seed)
        context = tiny_models.TINY_CONFIGS[kind].unet_config["context_dim"]
        pooled, size = tiny_models.SDXL_POOLED_DIM, 16

    def cond():
        extra = {"pooled_output": torch.randn(1, pooled, generator=gen)} if kind == "sdxl" else {}
        return [[torch.randn(1, 77, context, generator=gen), extra]]

    return patcher, cond(), cond(), size


def _npo_lora(patcher, rank: int, seed: int = 1):
    """A random rank-`rank` LoRA on every attention projection, like the authors' NPO releases."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    out = {}
    for key, w in patcher.model.state_dict().items():
        if not key.startswith("diffusion_model.") or w.ndim != 2:
            continue
        if not any(key.endswith(f"{p}.weight") for p in ("to_q", "to_k", "to_v", "to_out.0")):
            continue
        stem = key[: -len(".weight")]
        out[f"{stem}.lora_down.weight"] = torch.randn(rank, w.shape[1], generator=gen) / math.sqrt(w.shape[1])
        out[f"{stem}.lora_up.weight"] = torch.randn(w.shape[0], rank, generator=gen) * 0.1 / math.sqrt(rank)
        out[f"{stem}.alpha"] = torch.tensor(float(rank))
    return out


def _weights_held(models) -> int:
    seen, total = set(), 0
    for m in models:
        for t in list(m.parameters()) + list(m.buffers()):
            key = (t.untyped_storage().data_ptr(), t.device)
            if key not in seen:
                seen.add(key)
                total += t.untyped_storage().nbytes()
    return total


def _count_forwards(models):
    """Forward passes of the diffusion models and the batch rows they compute (a cost measure that
    CPU load cannot disturb)."""
    counts = {"calls": 0, "rows": 0}

    def count(module, args):
        counts["calls"] += 1
        counts["rows"] += args[0].shape[0]

    return counts, [m.diffusion_model.register_forward_pre_hook(count) for m in models]


def run_route(route: Route, kind: str, full_size: bool, steps: int, repeats: int, rank: int, queue,
              latent: int | None = None) -> None:
    boot_comfyui(cpu=not full_size)
    import torch
    import comfy.hooks
    import comfy.model_management
    import nodes
    from comfy_selfnpo.npo import guidance, weights

    if not full_size:
        # one thread: on a shared CPU, OpenMP threads spin-waiting for busy cores make timings swing 10x
        torch.set_num_threads(1)
    positive_model, pos_cond, neg_cond, size = _build(kind, full_size, latent=latent)
    lora = _npo_lora(positive_model, rank)
    cuda = full_size and torch.cuda.is_available()
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    if cuda:
        comfy.model_management.load_models_gpu([positive_model])
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        alloc0 = torch.cuda.memory_allocated()

    t0 = time.perf_counter()
    model, negative = positive_model, neg_cond
    held = [positive_model.model]
    if route.residency is not None:
        npo = weights.npo_weights_from_state_dict(lora, "bench-npo")
        negative_model, _ = weights.make_negative_model(positive_model, npo)
        model = guidance.apply_self_npo(positive_model, negative_model, residency=route.residency, mode=route.mode,
                                        start_percent=route.interval[0], end_percent=route.interval[1])
        plan = guidance.get_plan(model)
        if plan.negative is not None:
            held.append(plan.negative.model)
    elif route.comfy_hooks:
        hooks = comfy.hooks.create_hook_lora(lora, strength_model=1.0, strength_clip=0.0)
        negative = comfy.hooks.set_hooks_for_conditioning(neg_cond, hooks)
    setup_s = time.perf_counter() - t0
    extra_weights = sum(d.numel() * 4 for d in guidance.get_plan(model).deltas.values()) \
        if route.residency == "batched_lowrank" else 0

    latent = {"samples": torch.zeros(1, 4, size, size)}

    def sample():
        (out,) = nodes.common_ksampler(model, 7, steps, 5.0, "euler", "normal", pos_cond, negative, latent,
                                       disable_noise=False)
        if cuda:
            torch.cuda.synchronize()
        return out["samples"]

    forwards, handles = _count_forwards(held)
    with torch.inference_mode():
        result = sample()  # warm-up: loads the models, builds caches; forwards counted here
        for handle in handles:
            handle.remove()
        times, cpu_times = [], []
        for _ in range(repeats):
            t, c = time.perf_counter(), time.process_time()
            sample()
            times.append((time.perf_counter() - t) / steps)
            cpu_times.append((time.process_time() - c) / steps)  # CPU seconds: steadier on a shared CPU
    peak = (torch.cuda.max_memory_allocated() - alloc0) if cuda else \
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - rss0
    # best of the repeats: the run least disturbed by other processes
    queue.put({"route": route.name, "kind": kind, "step_s": min(times), "step_cpu_s": min(cpu_times),
               "peak_bytes": int(peak),
               "weights_bytes": _weights_held(held) + extra_weights, "setup_s": setup_s,
               "forwards_per_step": forwards["calls"] / steps, "rows_per_step": forwards["rows"] / steps,
               "latent": result.float().cpu().tolist()})  # plain data: no shared-memory handles


def _measure_kind(kind: str, routes: list[Route], args, steps: int) -> list[dict]:
    """Every route on one architecture, each in a fresh process; rows with ratios to plain CFG."""
    import torch

    ctx = mp.get_context("spawn")
    results = {}
    for route in routes:
        queue = ctx.Queue()
        proc = ctx.Process(target=run_route, args=(route, kind, args.full_size, steps, args.repeats, args.rank, queue,
                                                   args.latent if args.full_width else None))
        proc.start()
        results[route.name] = queue.get()
        proc.join()
    for r in results.values():
        r["latent"] = torch.tensor(r["latent"])
    base = results["plain_cfg"]
    rows = []
    for route in routes:
        r = results[route.name]
        ref = results[route.reference]["latent"]
        rows.append({k: v for k, v in r.items() if k != "latent"} | {
            "mode": route.mode if route.residency else None, "residency": route.residency,
            "interval": list(route.interval), "reference": route.reference,
            "step_ratio": r["step_s"] / base["step_s"], "cpu_ratio": r["step_cpu_s"] / base["step_cpu_s"],
            "peak_ratio": r["peak_bytes"] / base["peak_bytes"] if base["peak_bytes"] > 0 else None,
            "weights_ratio": r["weights_bytes"] / base["weights_bytes"],
            "rel_diff_vs_separate": float((r["latent"] - ref).abs().max() / ref.abs().max())})
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--full-size", action="store_true", help="SD1.5/SDXL architectures on the GPU")
    parser.add_argument("--full-width", action="store_true",
                        help="the full-size UNet in float32 on one CPU thread at a small latent (default kind sd15, "
                             "routes plain_cfg npo_separate npo_batched, 3 steps, 2 repeats)")
    parser.add_argument("--latent", type=int, default=16, help="--full-width latent size (default 16: 128 px)")
    parser.add_argument("--kinds", nargs="+", default=None, choices=["sd15", "sdxl"],
                        help="architectures (default sd15 and sdxl; sd15 with --full-width)")
    parser.add_argument("--steps", type=int, default=None, help="sampling steps per run (default 10 tiny, 20 full-size, 3 full-width)")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per route (default 3; 2 with --full-width)")
    parser.add_argument("--routes", nargs="+", default=None, choices=list(ROUTES),
                        help="routes to run (plain_cfg and the references of the chosen routes always run)")
    parser.add_argument("--rank", type=int, default=None,
                        help="rank of the NPO LoRA (default 4 for the tiny models, whose layers are 32-64 wide; "
                             "32 full-size, within the 8-64 of the authors' releases)")
    parser.add_argument("--out", default=None, help="default bench/results/guidance.json "
                                                     "(--full-width: guidance_full_width.json)")
    args = parser.parse_args(argv)
    if args.full_width and args.full_size:
        parser.error("--full-width runs on the CPU, --full-size on a GPU: choose one")
    full = args.full_size or args.full_width
    steps = args.steps or (3 if args.full_width else 20 if args.full_size else 10)
    args.rank = args.rank or (32 if full else 4)
    args.kinds = args.kinds or (["sd15"] if args.full_width else ["sd15", "sdxl"])
    args.routes = args.routes or (["npo_separate", "npo_batched"] if args.full_width else list(ROUTES))
    args.repeats = args.repeats or (2 if args.full_width else 3)
    args.out = args.out or str(ROOT / "bench" / "results" / f"guidance{'_full_width' if args.full_width else ''}.json")

    names = ["plain_cfg"] + [n for n in ROUTES if n != "plain_cfg" and (
        n in args.routes or any(ROUTES[r].reference == n for r in args.routes))]
    rows = [row for kind in args.kinds for row in _measure_kind(kind, [ROUTES[n] for n in names], args, steps)]
    device = "cuda" if args.full_size else "cpu"
    header = f"{'model':5} {'route':15} {'fwd/step':>8} {'rows':>5} {'ms/step':>9} {'x plain':>8} {'cpu ms':>9} " \
             f"{'x plain':>8} {'peak MiB':>9} {'x plain':>8} " \
             f"{'weights MiB':>11} {'x plain':>8} {'setup s':>8} {'rel.diff vs separate':>21}"
    scale = f"full-width, latent {args.latent}" if args.full_width else "full-size" if args.full_size else "tiny"
    print(f"Self-NPO guidance cost ({scale} models, {device}, "
          f"{steps} steps, NPO LoRA rank {args.rank})")
    print(header)
    for r in rows:
        peak_ratio = f"{r['peak_ratio']:.2f}" if r["peak_ratio"] is not None else "n/a"
        print(f"{r['kind']:5} {r['route']:15} {r['forwards_per_step']:8.1f} {r['rows_per_step']:5.1f} {r['step_s'] * 1e3:9.2f} {r['step_ratio']:8.2f} "
              f"{r['step_cpu_s'] * 1e3:9.2f} {r['cpu_ratio']:8.2f} "
              f"{r['peak_bytes'] / 2**20:9.1f} {peak_ratio:>8} {r['weights_bytes'] / 2**20:11.1f} "
              f"{r['weights_ratio']:8.2f} {r['setup_s']:8.2f} {r['rel_diff_vs_separate']:21.2e}")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    tmp = args.out + ".tmp"
    with open(tmp, "w") as f:
        json.dump({"full_size": args.full_size, "full_width": args.full_width,
                   "latent": args.latent if args.full_width else None, "device": device, "steps": steps, "rank": args.rank,
                   "repeats": args.repeats, "rows": rows}, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
