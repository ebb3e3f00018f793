"""Shared helpers of the CLI / training-node tests: tiny-run arguments, running the real
`comfy-selfnpo-train` in a subprocess or in-process, and reading what a run wrote."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch
from PIL import Image

from conftest import PACK_ROOT

# A TDFT run that costs well under a second per step on the tiny SD1.5 model: LoRA on the attention
# layers, 8x8 latents, one item per step, a 2-trajectory buffer for data-free mode.
TINY_HPARAMS = ["--preset", "lora-8gb", "--resolution", "64", "--batch-size", "1", "--grad-accum", "1",
                "--learning-rate", "1e-3", "--lora-rank", "4", "--lora-alpha", "4", "--trajectory-buffer", "2",
                "--no-gradient-checkpointing", "--mixed-precision", "no", "--weight-decay", "0", "--no-progress"]
TINY_OVERRIDES_TEXT = ("resolution = 64\nbatch_size = 1\ngrad_accum = 1\nlora_alpha = 4\ntrajectory_buffer = 2\n"
                       "gradient_checkpointing = false\nmixed_precision = no\nweight_decay = 0\n")
PROMPTS = ["a red cube", "a blue sphere on grass", "a portrait of a cat"]


def write_prompts(folder: Path) -> Path:
    path = folder / "prompts.txt"
    path.write_text("\n".join(PROMPTS) + "\n\n")
    return path


def cli_executable() -> str:
    """The console script pip installed next to this interpreter (tests the entry point too)."""
    script = Path(sys.executable).with_name("comfy-selfnpo-train")
    assert script.is_file(), f"comfy-selfnpo-train is not installed next to {sys.executable}"
    return str(script)


def cli_env() -> dict:
    env = dict(os.environ)
    env["COMFY_SELFNPO_TINY_MODELS"] = "1"  # test/demo only: lets ComfyUI detect the tiny checkpoints
    env["PYTHONUNBUFFERED"] = "1"
    return env


def run_cli(args: list[str], timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([cli_executable(), *map(str, args)], env=cli_env(), cwd=str(PACK_ROOT),
                          capture_output=True, text=True, timeout=timeout)


def start_cli(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen([cli_executable(), *map(str, args)], env=cli_env(), cwd=str(PACK_ROOT),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def weights(path: Path) -> dict[str, torch.Tensor]:
    return safetensors.torch.load_file(str(path))


def digest(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def snapshot(folder: Path) -> dict[str, str]:
    """relative path -> sha256 of every file under `folder` (to prove nothing was damaged), but for the
    run-folder lock, which records who held it last."""
    return {str(p.relative_to(folder)): digest(p) for p in sorted(Path(folder).rglob("*"))
            if p.is_file() and p.name != ".selfnpo.lock"}


def uncond_prediction(model, clip, seed: int = 0, sigma: float = 2.0, size: int = 8) -> torch.Tensor:
    """The MODEL's x0-prediction for the empty prompt (what CFG's unconditional branch evaluates) on a
    fixed noisy latent. ComfyUI applies a MODEL's patches to the shared weights when it loads it, so
    it is loaded right before predicting."""
    import comfy.model_management

    gen = torch.Generator().manual_seed(seed)
    x = torch.randn((1, 4, size, size), generator=gen) * sigma
    cond, _ = clip.encode_from_tokens(clip.tokenize(""), return_pooled=True)
    comfy.model_management.load_models_gpu([model], force_full_load=True)
    with torch.no_grad():
        return model.model.apply_model(x, torch.tensor([sigma]), c_crossattn=cond).float().cpu()


# ------------------------------------------------------------------ the CLI in-process

@pytest.fixture
def files(tmp_path, tiny):
    """A tiny on-disk checkpoint and a prompts file."""
    tiny.save_checkpoint(str(tmp_path / "tiny.safetensors"), "sd15", seed=0)
    write_prompts(tmp_path)
    return tmp_path


def run(capsys, *args) -> tuple[int, str]:
    """`comfy-selfnpo-train` in-process (the console script's code, without ~4 s of imports per call)."""
    from comfy_selfnpo.training import cli

    code = cli.main([str(a) for a in args])
    err = capsys.readouterr().err
    print(err)  # shown by pytest when an assertion fails
    return code, err


def base_args(files: Path, out: Path, *extra, steps=2, data=None):
    data_args = ["--data", data] if data is not None else ["--prompts", files / "prompts.txt"]
    return ["--checkpoint", files / "tiny.safetensors", *data_args, *TINY_HPARAMS, "--steps", steps,
            "--save-every", 1, "--seed", 1, "--output", out, *extra]


def write_image(path: Path, seed: int, caption: str | None = None):
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (72, 80, 3), dtype=np.uint8)).save(path)
    if caption is not None:
        path.with_suffix(".txt").write_text(caption)
