"""What the training front ends cost on top of the bare trainer, in one run.

Routes, each training the same tiny SD1.5 LoRA (data-free, same seed, same steps) in-process:
  bare_trainer   TDFTTrainer.train() alone: the reference
  session        TrainingSession (what the CLI and the node run): loss log, checkpoint every
                 `--save-every` steps, loss plot, export, summary
  session_prev   the same with a CFG | NPO-CFG preview every `--preview-every` steps
Reported: seconds per step (after a warm-up step) and the ratio to bare_trainer; the final
weights of `session` must equal bare_trainer's (the front end does not change what is trained).

  python bench/train_frontends.py [--steps 30 --save-every 10 --preview-every 10]
Writes bench/results/train_frontends.json.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from _boot import ROOT, boot_comfyui  # noqa: E402


def _config(steps, save_every):
    from comfy_selfnpo.training.config import make_config

    return make_config("lora-8gb", steps=steps, save_every=save_every, resolution=64, batch_size=1, grad_accum=1,
                       learning_rate=1e-3, lora_rank=4, lora_alpha=4.0, trajectory_buffer=2,
                       gradient_checkpointing=False, mixed_precision="no", weight_decay=0.0, seed=1)


def run_route(route: str, steps: int, save_every: int, preview_every: int, folder: Path) -> dict:
    import torch

    from comfy_selfnpo import tiny_models
    from comfy_selfnpo.training.data import PromptList
    from comfy_selfnpo.training.previews import PreviewSettings
    from comfy_selfnpo.training.run_files import RunPaths
    from comfy_selfnpo.training.session import SessionOptions, TrainingSession
    from comfy_selfnpo.training.trainer import TDFTTrainer

    ckpt = tiny_models.build_checkpoint("sd15", seed=0)
    data = PromptList(["a red cube", "a blue sphere", "a cat"])
    times = []
    last = [time.perf_counter()]

    def tick(_):
        now = time.perf_counter()
        times.append(now - last[0])
        last[0] = now

    if route == "bare_trainer":
        trainer = TDFTTrainer(ckpt.model, ckpt.clip, ckpt.vae, data, _config(steps, 0), folder)
        last[0] = time.perf_counter()
        trainer.train(on_step=tick)
        weights = trainer.export_state_dict()
    else:
        options = SessionOptions(resume=False, preview_every=preview_every if route == "session_prev" else 0,
                                 preview_settings=PreviewSettings(steps=10, size=64), on_step=tick)
        session = TrainingSession(ckpt.model, ckpt.clip, ckpt.vae, data, _config(steps, save_every),
                                  RunPaths(folder, folder / "w.safetensors"), options)
        session.prepare()
        last[0] = time.perf_counter()
        result = session.run()
        weights = result.trainer.export_state_dict()
    per_step = sum(times[1:]) / max(len(times) - 1, 1)  # step 1 fills the trajectory buffer
    return {"route": route, "s_per_step": per_step, "weights": {k: v.clone() for k, v in weights.items()},
            "torch": torch.__version__}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--save-every", type=int, default=10)
    parser.add_argument("--preview-every", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3, help="round-robin repeats; the median is reported")
    args = parser.parse_args()
    boot_comfyui()
    import statistics

    import torch

    routes = ("bare_trainer", "session", "session_prev")
    with tempfile.TemporaryDirectory() as tmp:  # warm-up: first-use costs (allocator, kernels) land here
        run_route("bare_trainer", 3, 0, 0, Path(tmp))
    runs = {route: [] for route in routes}
    for _ in range(args.repeats):  # round robin, so machine-load drift hits every route alike
        for route in routes:
            with tempfile.TemporaryDirectory() as tmp:
                runs[route].append(run_route(route, args.steps, args.save_every, args.preview_every, Path(tmp)))
    results = []
    for route in routes:
        r = dict(runs[route][0])
        r["s_per_step"] = statistics.median(x["s_per_step"] for x in runs[route])
        results.append(r)
    ref = results[0]
    rows = []
    print(f"{'route':<14} {'s/step':>9} {'ratio':>7}  weights == bare_trainer   (median of {args.repeats})")
    for r in results:
        same = all(torch.equal(ref["weights"][k], r["weights"][k]) for k in ref["weights"])
        ratio = r["s_per_step"] / ref["s_per_step"]
        rows.append({"route": r["route"], "s_per_step": r["s_per_step"], "ratio": ratio, "same_weights": same})
        print(f"{r['route']:<14} {r['s_per_step']:>9.4f} {ratio:>7.2f}  {same}")
    out = ROOT / "bench" / "results" / "train_frontends.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
