"""Preview images: the same prompt and seed sampled with plain CFG and with Self-NPO CFG.

Used by the training node (progress-bar previews) and the CLI (`previews/step_*.png`; the `--demo`
grid is digits/demo.py's). Sampling goes through ComfyUI's own CFGGuider / SelfNPOGuider and samplers,
so what the preview shows is what the guider nodes will produce.
"""
from __future__ import annotations

import dataclasses
import shlex
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import DataError


@dataclass
class PreviewSettings:
    steps: int = 20
    cfg: float = 7.0
    sampler: str = "euler"
    scheduler: str = "normal"
    size: int = 512          # image side in pixels (latent side = size / 8)
    negative_prompt: str = ""


def encode(clip, text: str):
    """CONDITIONING for `text`, as CLIPTextEncode makes it."""
    tokens = clip.tokenize(text)
    return clip.encode_from_tokens_scheduled(tokens)


def latent_to_image(model, vae, samples):
    """PIL image of the first latent: decoded with the VAE when there is one, else ComfyUI's
    cheap latent->RGB projection of the model's latent format (what its live previews use)."""
    from PIL import Image
    import numpy as np

    if vae is not None:
        pixels = vae.decode(samples[:1])
        while pixels.ndim > 4:  # video VAEs add a time axis
            pixels = pixels[:, 0]
        array = (pixels[0].clamp(0, 1).float().cpu().numpy() * 255).round().astype(np.uint8)
        return Image.fromarray(array)
    import latent_preview

    latent_format = model.get_model_object("latent_format")
    if latent_format.latent_rgb_factors is not None:
        previewer = latent_preview.Latent2RGBPreviewer(latent_format.latent_rgb_factors,
                                                       latent_format.latent_rgb_factors_bias)
        return previewer.decode_latent_to_preview(samples[:1].to(torch.float32))
    return latent_preview.preview_to_image(samples[0, :3].movedim(0, -1).float())


def sample(guider, model, latent_shape, seed: int, settings: PreviewSettings):
    import comfy.sample
    import comfy.samplers

    latent = torch.zeros(latent_shape)
    latent = comfy.sample.fix_empty_latent_channels(model, latent)
    noise = comfy.sample.prepare_noise(latent, seed)
    sampler = comfy.samplers.sampler_object(settings.sampler)
    sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"),
                                             settings.scheduler, settings.steps).cpu()
    return guider.sample(noise, latent, sampler, sigmas, disable_pbar=True, seed=seed)


def sample_cfg_and_npo(model, negative_model, clip, vae, prompt: str, seed: int,
                       settings: PreviewSettings | None = None):
    """(plain CFG image, Self-NPO CFG image) for one prompt and seed, as PIL images.

    Sampling re-seeds torch's global RNG (ComfyUI's prepare_noise); the caller's RNG state is
    restored afterwards so previews never change what training draws."""
    import comfy.samplers
    from ..npo.guidance import SelfNPOGuider

    settings = settings or PreviewSettings()
    rng = torch.get_rng_state()
    try:
        positive, negative = encode(clip, prompt), encode(clip, settings.negative_prompt)
        side = max(settings.size // 8, 1)
        channels = model.get_model_object("latent_format").latent_channels
        shape = (1, channels, side, side)
        with torch.no_grad():
            plain = comfy.samplers.CFGGuider(model)
            plain.set_conds(positive, negative)
            plain.set_cfg(settings.cfg)
            cfg_latent = sample(plain, model, shape, seed, settings)
            npo = SelfNPOGuider(model, negative_model)
            npo.set_conds(positive, negative)
            npo.set_cfg(settings.cfg)
            npo_latent = sample(npo, model, shape, seed, settings)
            return latent_to_image(model, vae, cfg_latent), latent_to_image(model, vae, npo_latent)
    finally:
        torch.set_rng_state(rng)


def side_by_side(cfg_image, npo_image, caption: str = ""):
    from ..images import labelled_grid

    scale = max(1, 256 // max(cfg_image.width, 1))
    return labelled_grid([[cfg_image, npo_image]], ["CFG", "NPO-CFG"], scale=scale)


@dataclass(frozen=True)
class SamplePrompt:
    """One row of the previews: a prompt, its seed, and optionally its own negative prompt, CFG scale
    and sampling steps (kohya's sample-prompt options --n, --d, --l, --s)."""
    prompt: str
    seed: int = 0
    negative: str | None = None
    cfg: float | None = None
    steps: int | None = None

    def settings(self, base: PreviewSettings) -> PreviewSettings:
        changes = {k: v for k, v in (("negative_prompt", self.negative), ("cfg", self.cfg), ("steps", self.steps))
                   if v is not None}
        return dataclasses.replace(base, **changes)


_OPTIONS = {"--n": ("negative", str), "--d": ("seed", int), "--l": ("cfg", float), "--s": ("steps", int)}


def parse_sample_prompts(path, default_seed: int = 0) -> list[SamplePrompt]:
    """kohya's sample-prompt file: one prompt per line, each optionally followed by `--n <negative>`,
    `--d <seed>`, `--l <cfg>`, `--s <steps>` (other kohya options, `--w`/`--h`, are ignored: previews
    use the training resolution). Blank lines and `#` comments are skipped."""
    from .data import read_text_file

    prompts = []
    for number, line in enumerate(read_text_file(Path(path).expanduser(), "sample prompts file").splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        prompts.append(_parse_line(line, number, path, default_seed))
    if not prompts:
        raise DataError(f"the sample prompts file {str(path)!r} has no prompt")
    return prompts


def _parse_line(line: str, number: int, path, default_seed: int) -> SamplePrompt:
    parts = (" " + line).split(" --")
    values = {"prompt": parts[0].strip(), "seed": default_seed}
    for part in parts[1:]:
        flag, _, value = part.partition(" ")
        if f"--{flag}" not in _OPTIONS:
            continue
        name, kind = _OPTIONS[f"--{flag}"]
        try:
            values[name] = kind(value.strip())
        except ValueError:
            raise DataError(f"{str(path)!r} line {number}: --{flag} {value.strip()!r} is not a valid "
                            f"{kind.__name__}") from None
    return SamplePrompt(**values)


def preview_grid(model, negative_model, clip, vae, prompts: list[SamplePrompt], settings: PreviewSettings):
    """CFG | NPO-CFG side by side, one row per sample prompt, each with its own seed."""
    from ..images import labelled_grid

    rows = [list(sample_cfg_and_npo(model, negative_model, clip, vae, p.prompt, p.seed, p.settings(settings)))
            for p in prompts]
    scale = max(1, 256 // max(rows[0][0].width, 1))
    labels = [p.prompt[:18] for p in prompts] if len(prompts) > 1 else None
    return labelled_grid(rows, ["CFG", "NPO-CFG"], labels, scale=scale)
