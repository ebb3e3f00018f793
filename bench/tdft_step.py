"""Benchmark: one TDFT training step of this pack's trainer against a plain re-implementation of the
authors' loop (Self-NPO/train.py: diffusers UNet2DConditionModel + DDIMScheduler, both teacher
branches always evaluated, an EMA teacher copy), same UNet architecture and batch.

Reports time per step split into teacher rollout and student forward/backward(+optimizer), and peak
memory, for full and LoRA modes at w = −1 and w = −5; ratios are ours / authors'. The authors' loop
trains the full UNet, so the LoRA rows are compared with it too (what a LoRA run saves). Neither
side's timing includes data encoding (the authors re-encode images with the VAE every step; the
trainer caches latents once).

Each configuration runs in its own subprocess, so peak memory is per configuration (GPU: torch's
max_memory_allocated; CPU: the process's peak RSS above its RSS after all imports — for the trainer,
after the ComfyUI checkpoint (UNet, CLIP, VAE) is loaded, as a user has it before training; the
authors' side counts its two UNets, as their script loads them).

DiT rows (Wan 2.1 T2V, SD3.5) time this pack's trainer alone (the authors' loop is UNet-only): tiny
models on the CPU; with --full-size, the Wan 2.1 1.3B and SD3.5-medium transformer bodies (random
weights, bf16, gradient checkpointing) at 480 px × 17 frames and 1024 px.

  python bench/tdft_step.py               # tiny models on the CPU (default)
  python bench/tdft_step.py --full-size   # SD1.5 (512 px) and SDXL (1024 px) sizes, random weights, GPU
  python bench/tdft_step.py --full-width  # the full SD1.5 UNet (859.5 M parameters, random weights) at a
                                          # small latent (default 16 = 128 px), batch 1, fp32, on the CPU
Writes bench/results/tdft_step.json (--full-width: tdft_step_full_width.json).

--full-width is the real-size row a CPU can run: tiny timings are dominated by per-call overhead, the
full-width UNet's by its matrix products and its 859.5 M-parameter optimizer step, as on a GPU. Its
full-mode runs hold about 17-19 GB (two fp32 UNets, the gradient and AdamW's two moments); each run
first checks that the machine has that much memory available and stops with a message otherwise.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

from _boot import ROOT, boot_comfyui  # noqa: E402
RESULTS = ROOT / "bench" / "results" / "tdft_step.json"

# diffusers configs of the same architectures as the ComfyUI models
TINY_SD15_DIFFUSERS = dict(
    sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=64,
    attention_head_dim=2, norm_num_groups=32)
SD15_DIFFUSERS = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768, attention_head_dim=8)
SDXL_DIFFUSERS = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
    use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816)


# ------------------------------------------------------------------ the authors' loop


def authors_loop(spec: dict) -> dict:
    """Self-NPO/train.py's step, restated with diffusers (no accelerate): DDIMSolver over the
    DDIMScheduler's alphas_cumprod, K+1 teacher iterations evaluating cond and uncond separately
    every time, nsr re-noising, student forward/backward, clip, AdamW, EMA teacher update."""
    import torch
    from diffusers import DDIMScheduler, UNet2DConditionModel

    device = torch.device(spec["device"])
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**spec["diffusers_config"]).to(device)
    if spec["grad_ckpt"]:
        unet.enable_gradient_checkpointing()
    target_unet = UNet2DConditionModel(**spec["diffusers_config"]).to(device)
    target_unet.load_state_dict(unet.state_dict())
    target_unet.requires_grad_(False)
    sched = DDIMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                          beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False)
    ac = sched.alphas_cumprod.to(device)
    alpha_s, sigma_s = ac.sqrt(), (1 - ac).sqrt()
    N, K, w, B = 25, 5, spec["w"], spec["batch"]
    k = 1000 // N
    ddim_t = (torch.arange(1, N + 1) * k - 1).to(device)
    ac_prev = torch.cat([ac[:1], ac[ddim_t[:-1]]])
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-6, betas=(0.9, 0.999), weight_decay=1e-3, eps=1e-8)
    hw = spec["latent"]
    latents = torch.randn(B, 4, hw, hw, device=device)
    cfg = spec["diffusers_config"]
    ctx = torch.randn(B, 77, cfg["cross_attention_dim"], device=device)
    uctx = torch.randn(B, 77, cfg["cross_attention_dim"], device=device)
    added = {}
    if cfg.get("addition_embed_type") == "text_time":
        added = {"text_embeds": torch.randn(B, 1280, device=device),
                 "time_ids": torch.tensor([[hw * 8, hw * 8, 0, 0, hw * 8, hw * 8]] * B, device=device).float()}
    amp = torch.autocast(device.type, dtype=torch.float16, enabled=spec["amp"])

    def col(v, t):
        return v[t].view(-1, 1, 1, 1)

    def x0_of(out, x, t):
        return (x - col(sigma_s, t) * out) / col(alpha_s, t)

    def one_step():
        t0 = time.perf_counter()
        noise = torch.randn_like(latents)
        index = torch.randint(0, N, (B,), device=device)
        start_t = ddim_t[index]
        x = sched.add_noise(latents, noise, start_t)
        t_cur, mask = start_t, torch.ones(B, device=device)
        with torch.no_grad(), amp:
            for i in range(K + 1):
                c_out = target_unet(x.float(), t_cur, encoder_hidden_states=ctx, added_cond_kwargs=added).sample
                u_out = target_unet(x.float(), t_cur, encoder_hidden_states=uctx, added_cond_kwargs=added).sample
                c_x0, u_x0 = x0_of(c_out, x, t_cur), x0_of(u_out, x, t_cur)
                pred_x0 = c_x0 + w * (c_x0 - u_x0)
                if i >= K:
                    break
                pred_eps = c_out + w * (c_out - u_out)
                a_prev = col(ac_prev, index)
                x_new = a_prev.sqrt() * pred_x0 + (1 - a_prev).sqrt() * pred_eps
                m = mask.view(-1, 1, 1, 1)
                x = (x_new * m + x * (1 - m)).float()
                index = index - 1
                mask = torch.where(index < 0, 0.0, mask)
                index = index.clamp_min(0)
                t_cur = (t_cur - k).clamp_min(0)
        _sync(device)
        t1 = time.perf_counter()
        t = t_cur + 1 + (torch.rand(B, device=device) * (999 - t_cur)).long().clamp_max(998 - t_cur)
        nsr_e, nsr_t = col(sigma_s, t_cur) / col(alpha_s, t_cur), col(sigma_s, t) / col(alpha_s, t)
        x_t = (x / col(alpha_s, t_cur) + (nsr_t ** 2 - nsr_e ** 2).sqrt() * torch.randn_like(x)) * col(alpha_s, t)
        with amp:
            out = unet(x_t.float(), t, encoder_hidden_states=ctx, added_cond_kwargs=added).sample
        pred = (x_t - col(sigma_s, t) * out.float()) / col(alpha_s, t)
        loss = torch.mean(torch.sqrt((pred.float() - pred_x0.float()) ** 2 + 1e-6) - 1e-3)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            for tp, sp in zip(target_unet.parameters(), unet.parameters()):
                tp.mul_(0.999).add_(sp, alpha=0.001)
        _sync(device)
        return t1 - t0, time.perf_counter() - t1

    return _measure(one_step, spec, device, params=sum(p.numel() for p in unet.parameters()))


# ------------------------------------------------------------------ this pack's trainer

# DiT families, measured with this pack's trainer alone (the authors' loop is a UNet loop). Full size:
# the transformer body of Wan 2.1 T2V 1.3B and SD3.5 medium, random weights; their text inputs are as
# wide as the tiny text encoders (only the input projections shrink), latents at 480 px / 17 frames
# and 1024 px. The tiny rows are the test suite's tiny models.
DIT_FAMILIES = ("wan21", "sd3")


def _dit_unet_config(kind: str) -> dict:
    from comfy_selfnpo.tiny_models import dits

    if kind == "wan21":
        return dict(dits._WAN_COMMON, dim=1536, ffn_dim=8960, num_heads=12, num_layers=30, in_dim=16, out_dim=16)
    return dict(dits.TinySD3.tiny_unet_config, depth=24, pos_embed_max_size=384, num_patches=147456,
                x_block_self_attn_layers=list(range(13)), qk_norm="rms",
                context_embedder_config={"target": "torch.nn.Linear",
                                         "params": {"in_features": 4096, "out_features": 1536}})


def _dit_model(kind: str, full_size: bool, device):
    import torch

    import comfy.model_management
    import comfy.model_patcher
    from comfy_selfnpo import tiny_models

    ckpt = tiny_models.build_checkpoint(kind, seed=0)
    if not full_size:
        return ckpt.model, ckpt.clip
    config = tiny_models.family(kind).config(_dit_unet_config(kind))
    config.set_inference_dtype(torch.bfloat16 if device.type == "cuda" else torch.float32, None)
    model = config.get_model({})
    tiny_models.seeded_init_(model.diffusion_model, 0)
    patcher = comfy.model_patcher.ModelPatcher(model, load_device=comfy.model_management.get_torch_device(),
                                               offload_device=comfy.model_management.unet_offload_device())
    return patcher, ckpt.clip


def ours_dit(spec: dict) -> dict:
    """One TDFT step of a DiT family, data-free (video: 17-frame clips), LoRA or full weights."""
    import tempfile

    import torch

    from comfy_selfnpo.training import PromptList, TDFTTrainer, make_config

    device = torch.device(spec["device"])
    model, clip = _dit_model(spec["family"], spec["size"].endswith("-full"), device)
    global _RSS_BASELINE
    _RSS_BASELINE = _current_rss()
    cfg = make_config("lora-24gb" if spec["mode"] == "lora" else None, mode=spec["mode"], teacher="base",
                      batch_size=spec["batch"], grad_accum=1, resolution=spec["latent"] * 8, frames=0,
                      trajectory_buffer=spec["batch"], mixed_precision="bf16" if spec["amp"] else "no",
                      gradient_checkpointing=spec["grad_ckpt"], learning_rate=1e-4, steps=10 ** 6)
    trainer = TDFTTrainer(model, clip, None, PromptList(["a red cube", "a dog running"]), cfg,
                          Path(tempfile.mkdtemp(prefix="tdft_bench_")) / "run", device=device)

    def one_step():
        r = trainer.train_step()
        return r.teacher_s, r.student_s

    return _measure(one_step, spec, device, params=sum(p.numel() for p in trainer.trained.parameters()))


def ours(spec: dict) -> dict:
    import tempfile

    import torch

    import comfy.model_management
    import comfy.sd
    from comfy_selfnpo import tiny_models
    from comfy_selfnpo.training import ImageCaptionFolder, TDFTTrainer, make_config

    device = torch.device(spec["device"])
    torch.manual_seed(0)
    from diffusers import UNet2DConditionModel
    if spec["size"] == "tiny":
        tiny_models.register_tiny_model_configs()
        ckpt = tiny_models.build_checkpoint("sd15", seed=0)
        model, clip, vae = ckpt.model, ckpt.clip, ckpt.vae
    else:
        # the same architecture as the authors' side: ComfyUI converts the diffusers UNet itself
        ref = UNet2DConditionModel(**spec["diffusers_config"])
        # the base in fp16 where the run trains float32 copies of it (full mode on the CPU): it is
        # outside the measured peak either way, and the shared machine keeps 1.7 GB
        base_dtype = torch.float16 if spec.get("fp16_base") and spec["mode"] == "full" else None
        model = comfy.sd.load_diffusion_model_state_dict(ref.state_dict(), model_options={"dtype": base_dtype}
                                                         if base_dtype else {})
        del ref
        kind = "SDXL" if spec["size"] == "sdxl" else "SD15"
        import comfy.supported_models as sm
        config = getattr(sm, kind)(dict(model.model.model_config.unet_config))
        clip = comfy.sd.CLIP(config.clip_target(), model_options={"dtype": torch.float16})
        tiny_models.seeded_init_(clip.cond_stage_model, 1)
        vae = tiny_models.build_vae(2)
    # CPU memory baseline: the loaded checkpoint (the user already has it in memory); what the
    # trainer adds from here (copies, optimizer, encoding, activations) is what is compared
    _reset_peak_rss()  # building the checkpoint (a diffusers UNet converted by ComfyUI) is no part of training
    global _RSS_BASELINE
    _RSS_BASELINE = _current_rss()
    work = Path(tempfile.mkdtemp(prefix="tdft_bench_"))
    folder = work / "images"
    folder.mkdir()
    from PIL import Image
    res = spec["latent"] * 8
    for i in range(spec["batch"]):
        Image.fromarray((torch.rand(res, res, 3) * 255).byte().numpy()).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(f"a photo of object {i}")
    cfg = make_config(mode=spec["mode"], teacher="ema" if spec["mode"] == "full" else "base",
                      corruption_guidance=spec["w"], uncond="zeros" if spec["size"] == "sdxl" else "empty_prompt",
                      batch_size=spec["batch"], resolution=res, learning_rate=1e-6 if spec["mode"] == "full" else 1e-4,
                      mixed_precision="fp16" if spec["amp"] else "no", gradient_checkpointing=spec["grad_ckpt"],
                      lora_rank=16, lora_alpha=16.0, lora_targets="attn", steps=10 ** 6)
    # the trainer encodes the data when it is built: outside the timing
    trainer = TDFTTrainer(model, clip, vae, ImageCaptionFolder(folder, res), cfg, work / "run", device=device)
    comfy.model_management.soft_empty_cache()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    def one_step():
        r = trainer.train_step()
        return r.teacher_s, r.student_s

    n_params = sum(p.numel() for p in trainer.trained.parameters())
    return _measure(one_step, spec, device, params=n_params)


# ------------------------------------------------------------------ measurement & table


_RSS_BASELINE = 0


def _current_rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _reset_peak_rss() -> None:
    """Start the process's peak RSS (ru_maxrss) afresh from its current RSS (Linux: clear_refs 5)."""
    import gc
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _sync(device):
    import torch
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _measure(one_step, spec, device, params):
    import torch
    for _ in range(spec["warmup"]):
        one_step()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    teacher, student, cpu = [], [], []
    for _ in range(spec["steps"]):
        c0 = time.process_time()  # CPU seconds of the process: what a busy shared machine disturbs least
        a, b = one_step()
        cpu.append(time.process_time() - c0)
        teacher.append(a)
        student.append(b)
    peak = (torch.cuda.max_memory_allocated(device) if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - _RSS_BASELINE)
    med = lambda v: sorted(v)[len(v) // 2]  # noqa: E731
    return {"teacher_s": med(teacher), "student_s": med(student),
            "step_s": med([a + b for a, b in zip(teacher, student)]), "step_cpu_s": med(cpu), "peak_bytes": int(peak),
            "trainable_params": int(params)}


# fp32 copies of the SD1.5 UNet a full-width run holds at its peak, by (impl, mode): the authors' loop
# keeps two UNets, the gradient and AdamW's two moments; the trainer a student and an EMA teacher, the
# gradient, the two moments, and the fp16 base (half a copy); LoRA the base and a little more
FULL_WIDTH_COPIES = {("authors", "full"): 5.0, ("ours", "full"): 5.5, ("ours", "lora"): 1.3}
SD15_PARAMS = 859_520_964


def _full_width_specs(latent: int, batch: int, ws: list[float]) -> list[dict]:
    size = dict(size=f"sd15@{latent}", diffusers_config=SD15_DIFFUSERS, latent=latent, batch=batch, amp=False,
                grad_ckpt=False, warmup=1, steps=1, fp16_base=True, device="cpu")
    # the authors' loop evaluates both teacher branches whatever w is: it runs once, at w = -1
    return [dict(size, impl="authors", mode="full", w=-1.0)] + [
        dict(size, impl="ours", mode=mode, w=w) for w in ws for mode in ("full", "lora")]


def _check_memory(spec: dict) -> None:
    """Stop before a full-width run that would not fit the memory this machine has available now."""
    need = FULL_WIDTH_COPIES[(spec["impl"], spec["mode"])] * SD15_PARAMS * 4 + 2 * 2 ** 30  # + 2 GB slack
    with open("/proc/meminfo") as f:
        available = next(int(ln.split()[1]) * 1024 for ln in f if ln.startswith("MemAvailable:"))
    if available < need:
        raise SystemExit(f"not enough memory for the full-width {spec['impl']} {spec['mode']} run: it needs about "
                         f"{need / 2 ** 30:.1f} GB, {available / 2 ** 30:.1f} GB is available now; retry when "
                         "other processes have finished")


def _specs(full_size: bool, device: str):
    if not full_size:
        sizes = [dict(size="tiny", diffusers_config=TINY_SD15_DIFFUSERS, latent=16, batch=4, amp=False,
                      grad_ckpt=False, warmup=2, steps=5)]
    else:
        sizes = [dict(size="sd15", diffusers_config=SD15_DIFFUSERS, latent=64, batch=4, amp=True,
                      grad_ckpt=False, warmup=2, steps=5),
                 dict(size="sdxl", diffusers_config=SDXL_DIFFUSERS, latent=128, batch=1, amp=True,
                      grad_ckpt=True, warmup=2, steps=4)]
    out = []
    for size in sizes:
        for w in (-1.0, -5.0):
            out.append(dict(size, impl="authors", mode="full", w=w, device=device))
            out.append(dict(size, impl="ours", mode="full", w=w, device=device))
            out.append(dict(size, impl="ours", mode="lora", w=w, device=device))
    for family in DIT_FAMILIES:  # full size: 480 px (Wan, 17 frames) / 1024 px (SD3.5), bf16, checkpointing
        dit = dict(size="full" if full_size else "tiny", family=family, latent=(60 if family == "wan21" else 128)
                   if full_size else 8, batch=1, amp=full_size, grad_ckpt=full_size, warmup=2,
                   steps=4 if full_size else 5)
        for mode in ("full", "lora"):
            out.append(dict(dit, size=f"{family}-{dit['size']}", impl="ours", mode=mode, w=-1.0, device=device))
    return out


def run_one(spec: dict) -> dict:
    boot_comfyui()
    import torch
    if spec["device"] == "cpu":
        torch.set_num_threads(spec.get("threads", 1))
    # both sides import the same modules before the baseline, so CPU peaks compare like with like
    import comfy.sd  # noqa: F401
    from diffusers import DDIMScheduler, UNet2DConditionModel  # noqa: F401
    from comfy_selfnpo import tiny_models  # noqa: F401
    from comfy_selfnpo.training import trainer  # noqa: F401
    global _RSS_BASELINE
    _RSS_BASELINE = _current_rss()
    if "family" in spec:
        return ours_dit(spec)
    return authors_loop(spec) if spec["impl"] == "authors" else ours(spec)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--full-size", action="store_true", help="SD1.5/SDXL sizes with random weights (GPU)")
    p.add_argument("--full-width", action="store_true",
                   help="the full SD1.5 UNet at a small latent on the CPU (three runs of about 90 CPU seconds each, "
                        "up to 19 GB)")
    p.add_argument("--latent", type=int, default=16, help="--full-width latent size (default 16: 128 px)")
    p.add_argument("--batch", type=int, default=1, help="--full-width batch (default 1)")
    p.add_argument("--w", type=float, nargs="+", default=[-1.0],
                   help="--full-width corruption guidance of the trainer's rows (default -1, the SD1.5 recipe)")
    p.add_argument("--threads", type=int, default=1, help="CPU threads per run (default 1: shared 2-core machines)")
    p.add_argument("--one", help=argparse.SUPPRESS)
    p.add_argument("--smoke", help="comma-separated impl:mode:size runs at latent 8, batch 1, one step "
                                    "(checks the full-size code path on a CPU)")
    args = p.parse_args(argv)
    if args.one:
        print("RESULT " + json.dumps(run_one(json.loads(args.one))))
        return 0
    import torch
    device = "cuda" if args.full_size and torch.cuda.is_available() else "cpu"
    if args.full_size and device == "cpu" and not args.smoke:
        p.error("--full-size needs a CUDA GPU (or --smoke to check the code path on the CPU)")
    specs = _full_width_specs(args.latent, args.batch, args.w) if args.full_width else _specs(args.full_size, device)
    if args.smoke:
        wanted = {tuple(x.split(":")) for x in args.smoke.split(",")}
        specs = [dict(s, latent=8, batch=1, warmup=0, steps=1, amp=False) for s in specs
                 if (s["impl"], s["mode"], s["size"]) in wanted and (s["w"] == -5.0 or "family" in s)]
    rows = []
    for spec in specs:
        spec["threads"] = args.threads
        if args.full_width:
            _check_memory(spec)
        proc = subprocess.run([sys.executable, __file__, "--one", json.dumps(spec)], capture_output=True,
                              text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode or not lines:
            print(proc.stdout[-3000:], proc.stderr[-3000:], file=sys.stderr)
            raise SystemExit(f"benchmark run failed: {spec['impl']} {spec['mode']} w={spec['w']}")
        result = json.loads(lines[-1][len("RESULT "):])
        rows.append({k: spec[k] for k in ("size", "impl", "mode", "w", "batch", "latent", "amp", "grad_ckpt")} | result)
        print(f"  done: {spec['size']} {spec['impl']} {spec['mode']} w={spec['w']}: {result['step_s']:.3f} s/step",
              file=sys.stderr)
    if args.smoke:
        print(json.dumps(rows, indent=1))
        return 0
    # ratios against the authors' loop of the same size and w (full width: its one run; the DiT rows have none)
    for r in rows:
        refs = [x for x in rows if x["size"] == r["size"] and x["impl"] == "authors"]
        ref = next((x for x in refs if x["w"] == r["w"]), refs[0] if refs and r["size"].startswith("sd15@") else None)
        for key in ("teacher_s", "student_s", "step_s", "step_cpu_s", "peak_bytes"):
            r[f"{key}_ratio"] = r[key] / ref[key] if ref and ref[key] else None
    header = (f"{'size':11} {'impl':8} {'mode':5} {'w':>5} {'teacher s':>10} {'student s':>10} {'step s':>9} "
              f"{'cpu s':>9} {'peak MiB':>9} | {'teacher×':>8} {'student×':>8} {'step×':>6} {'cpu×':>6} {'mem×':>6}")
    print(f"TDFT step, device={device}, batch/latent per size; × = ours / authors' loop (lower is better); "
          "cpu s: the process's CPU seconds per step (on a shared CPU the steadier measure)")
    print(header)
    print("-" * len(header))
    ratio = lambda value, width: f"{value:{width}.2f}" if value is not None else f"{'-':>{width}}"  # noqa: E731
    for r in rows:
        print(f"{r['size']:11} {r['impl']:8} {r['mode']:5} {r['w']:5.0f} {r['teacher_s']:10.4f} {r['student_s']:10.4f} "
              f"{r['step_s']:9.4f} {r['step_cpu_s']:9.4f} {r['peak_bytes'] / 2 ** 20:9.0f} | "
              f"{ratio(r['teacher_s_ratio'], 8)} {ratio(r['student_s_ratio'], 8)} {ratio(r['step_s_ratio'], 6)} "
              f"{ratio(r['step_cpu_s_ratio'], 6)} {ratio(r['peak_bytes_ratio'], 6)}")
    out = RESULTS.with_name("tdft_step_full_width.json") if args.full_width else RESULTS
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"device": device, "torch": torch.__version__, "threads": args.threads, "full_width": args.full_width,
            "gpu": torch.cuda.get_device_name() if device == "cuda" else None}
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
