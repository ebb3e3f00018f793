"""Benchmark: what splitting a TDFT step over several processes (torchrun, DDP) gains.

Trains the same run — same seed, same global batch — as one process with the whole batch and as
P processes with a P-th of it each, through the real `comfy-selfnpo-train` under `torchrun`, and
reports seconds per step (from the run's loss.csv, without start-up) and the speed-up. The weights
of the two runs must agree (world-size invariance), which the table also shows.

  python bench/distributed.py                   # tiny SD1.5 LoRA on the CPU, 2 processes x 1 thread
  python bench/distributed.py --full-size CKPT  # a real-size checkpoint, one process per GPU
Writes bench/results/distributed.json.

On a CPU the processes share the machine's cores (each process gets one thread; the single process
gets one thread too, so the comparison is "P cores instead of 1"); on GPUs each process has its own.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

from _boot import ROOT, boot_comfyui  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "distributed.json"


def _inputs(folder: Path, checkpoint: str | None) -> list[str]:
    """Prompts, and the model: the given checkpoint (GPU), or the tiny SD1.5 one written here (CPU)."""
    (folder / "prompts.txt").write_text("a red cube\na blue sphere on grass\na portrait of a cat\na tree\n")
    common = ["--prompts", str(folder / "prompts.txt")]
    if checkpoint:
        return common + ["--checkpoint", checkpoint, "--resolution", "512", "--mixed-precision", "bf16"]
    boot_comfyui(cpu=True)
    from comfy_selfnpo import tiny_models

    tiny_models.register_tiny_model_configs()
    tiny_models.save_checkpoint(str(folder / "model.safetensors"), "sd15", seed=0)
    return common + ["--checkpoint", str(folder / "model.safetensors"), "--resolution", "64", "--lora-rank", "4",
                     "--lora-alpha", "4", "--learning-rate", "1e-3", "--mixed-precision", "no"]


def _seconds_per_step(run_dir: Path) -> float:
    with open(run_dir / "loss.csv") as f:
        elapsed = [float(row["elapsed_s"]) for row in csv.DictReader(f)]
    return (elapsed[-1] - elapsed[1]) / (len(elapsed) - 2)  # without the first (warm-up) step


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(processes: int, global_batch: int, common: list[str], out: Path) -> float:
    cli = str(Path(sys.executable).with_name("comfy-selfnpo-train"))
    args = [*common, "--batch-size", str(global_batch // processes), "--output", str(out)]
    if processes > 1:
        torchrun = str(Path(sys.executable).with_name("torchrun"))
        cmd = [torchrun, "--nproc-per-node", str(processes), "--master-addr", "127.0.0.1",
               "--master-port", str(_free_port()), cli, *args]
    else:
        cmd = [cli, *args]
    env = dict(os.environ, OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo", COMFY_SELFNPO_TINY_MODELS="1")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    return _seconds_per_step(out)


def _max_weight_difference(a: Path, b: Path) -> float:
    import safetensors.torch

    wa = safetensors.torch.load_file(str(a / "self_npo.safetensors"))
    wb = safetensors.torch.load_file(str(b / "self_npo.safetensors"))
    return max(float((wa[k] - wb[k]).abs().max()) for k in wa)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--processes", type=int, default=2)
    p.add_argument("--global-batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--full-size", metavar="CHECKPOINT",
                   help="GPU machine: train this (SD1.5-size) checkpoint, one process per GPU")
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="dist_bench_"))
    common = _inputs(work, args.full_size)
    common += ["--preset", "lora-8gb", "--grad-accum", "1",
               "--no-gradient-checkpointing", "--adam-eps", "1e-3", "--trajectory-buffer", str(max(8, args.global_batch)),
               "--steps", str(args.steps), "--no-progress"]
    single = _run(1, args.global_batch, common, work / "single")
    split = _run(args.processes, args.global_batch, common, work / "split")
    row = {"processes": args.processes, "global_batch": args.global_batch, "seconds_per_step_1": single,
           f"seconds_per_step_{args.processes}": split, "speed_up": single / split,
           "max_weight_difference": _max_weight_difference(work / "single", work / "split")}
    print(f"TDFT step, global batch {args.global_batch}, {args.steps} steps (device: "
          f"{'GPU' if args.full_size else 'CPU, 1 thread per process'})")
    print(f"{'processes':>9}  {'s/step':>8}  {'speed-up':>8}")
    print(f"{1:>9}  {single:8.3f}  {1.0:8.2f}")
    print(f"{args.processes:>9}  {split:8.3f}  {single / split:8.2f}")
    print(f"max |weight difference| between the two runs: {row['max_weight_difference']:.2e}")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(row, indent=1))
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
