"""A small text-to-image diffusion model of handwritten digits, trained from scratch on the CPU.

The quality benchmark (`bench/quality.py`) measures what Self-NPO guidance does on it, and the demo
can use it so its CFG | NPO-CFG grid shows recognisable digits. The model is the tiny SD1.5 UNet of
`tiny_models` (ComfyUI's own classes, EPS prediction, SD1.5's noise schedule) with the tiny CLIP as
its text encoder; prompts are class names ("a handwritten digit seven").

Latent representation. The data are scikit-learn's 8x8 digits (values 0..16). A digit image *is*
the latent: scaled to [-1, 1] (the unit scale SD's schedule is built for; ComfyUI's SD1.5 latent
scale factor is undone by `process_latent_in`) and copied into all four latent channels. Decoding is
the mean over the channels, the least-squares inverse of the copy, so the "VAE" is an exact linear
map that adds and hides nothing: every difference between two samplers is the diffusion model's own.
No real VAE would fit 8x8 images (TAESD downscales 8x); an 8x8 latent suits the tiny UNet (one
downsampling level, 4x4 at the bottom).

    images, labels = load_digits_images()                 # bench/quality_pipeline.py (scikit-learn)
    digits = train_digits_model(images, labels, DenoiserTraining(steps=3000))
    digits.model, digits.clip                             # MODEL and CLIP, as a loader node gives them
    digits.conds.positive(labels), digits.conds.negative()  # CONDITIONING for KSampler

Call `comfyui_env.ensure_comfyui()` before importing this module.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .. import tiny_models

DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
LATENT_CHANNELS = 4
IMAGE_SIZE = 8


def prompt_for(label: int) -> str:
    return f"a handwritten digit {DIGIT_NAMES[int(label)]}"


PROMPTS = tuple(prompt_for(i) for i in range(len(DIGIT_NAMES)))
UNCOND_PROMPT = ""  # the negative prompt of CFG, and what condition dropout trains


# ------------------------------------------------------------------------------------------------
# latents <-> images

def images_to_latents(images: torch.Tensor) -> torch.Tensor:
    """[N, 8, 8] grey images in [0, 1] -> model-space latents [N, 4, 8, 8] in [-1, 1]."""
    x = images.float() * 2.0 - 1.0
    return x[:, None].expand(-1, LATENT_CHANNELS, -1, -1).contiguous()


def latents_to_images(latents: torch.Tensor) -> torch.Tensor:
    """Model-space latents [N, 4, 8, 8] -> [N, 8, 8] grey images in [0, 1] (mean over channels)."""
    return ((latents.float().mean(dim=1) + 1.0) / 2.0).clamp(0.0, 1.0)


# ------------------------------------------------------------------------------------------------
# model and prompts

# Layers whose output joins a residual stream. The original LDM code creates them zeroed
# (`zero_module`) so that every block starts as the identity; ComfyUI drops that because it always
# loads weights, and tiny_models fills everything randomly. Training from scratch wants it back.
_ZERO_INIT_SUFFIXES = ("out_layers.3.weight", "out_layers.3.bias", "proj_out.weight", "proj_out.bias",
                       "out.2.weight", "out.2.bias")


def build_digits_checkpoint(seed: int = 0):
    """(MODEL, CLIP): the tiny SD1.5 UNet initialised for training from scratch, and the tiny CLIP
    (random, frozen: it only has to tell the ten prompts apart)."""
    model = tiny_models.build_model("sd15", seed)
    with torch.no_grad():
        for name, p in model.model.diffusion_model.named_parameters():
            if name.endswith(_ZERO_INIT_SUFFIXES):
                p.zero_()
    return model, tiny_models.build_clip("sd15", seed + 1)


def encode_prompt(clip, text: str) -> torch.Tensor:
    tokens = clip.tokenize(text)
    return clip.encode_from_tokens(tokens).detach().float().cpu().clone()


@dataclass
class PromptConds:
    """The ten class prompts and the empty prompt, encoded once ([10, 77, C] and [1, 77, C])."""
    classes: torch.Tensor
    uncond: torch.Tensor

    @classmethod
    def encode(cls, clip) -> "PromptConds":
        with torch.no_grad():
            classes = torch.cat([encode_prompt(clip, p) for p in PROMPTS])
            return cls(classes, encode_prompt(clip, UNCOND_PROMPT))

    def for_labels(self, labels: torch.Tensor) -> torch.Tensor:
        return self.classes[labels]

    def positive(self, labels: torch.Tensor) -> list:
        """ComfyUI CONDITIONING with one prompt per row of a batch of len(labels) latents."""
        return [[self.for_labels(labels), {}]]

    def negative(self) -> list:
        return [[self.uncond, {}]]


# ------------------------------------------------------------------------------------------------
# ordinary diffusion training (the base model, and the benchmark's fine-tuning control)

def diffusion_loss(base_model, x0: torch.Tensor, cond: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """SD's training loss: noise x0 to a uniformly drawn timestep and regress the noise. ComfyUI's
    apply_model returns the denoised x0 estimate D, and for an EPS model the noise error equals
    (D - x0) / sigma, so the loss is written in those terms."""
    sigmas = base_model.model_sampling.sigmas
    t = torch.randint(0, sigmas.shape[0], (x0.shape[0],), generator=gen)
    sigma = sigmas[t].to(x0.device)
    noise = torch.randn(x0.shape, generator=gen).to(x0.device)
    x = base_model.model_sampling.noise_scaling(sigma, noise, x0)
    denoised = base_model.apply_model(x, sigma, c_crossattn=cond)
    return (((denoised - x0) / sigma.view(-1, 1, 1, 1)) ** 2).mean()


@dataclass
class DenoiserTraining:
    """Hyper-parameters of `train_denoiser` (AdamW as the TDFT recipe uses it)."""
    steps: int = 3000
    batch_size: int = 64
    learning_rate: float = 1e-3
    weight_decay: float = 1e-3
    max_grad_norm: float = 1.0
    uncond_probability: float = 0.1  # condition dropout: makes the empty prompt a usable CFG negative
    warmup_steps: int = 100
    ema_decay: float = 0.999         # 0: keep the last weights
    seed: int = 0


def train_denoiser(model, latents: torch.Tensor, conds: torch.Tensor, uncond: torch.Tensor,
                   settings: DenoiserTraining, on_step=None) -> list[float]:
    """Train `model` (a ModelPatcher; its UNet is changed in place) with the ordinary diffusion loss
    on model-space `latents` [N, 4, 8, 8] with per-item text conditioning `conds` [N, 77, C].
    Returns the loss per step. Deterministic for a given seed."""
    unet = model.model.diffusion_model
    params = [p for p in unet.parameters()]
    gen = torch.Generator().manual_seed(settings.seed)
    optimizer = torch.optim.AdamW(params, lr=settings.learning_rate, weight_decay=settings.weight_decay)
    warmup = max(1, settings.warmup_steps)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup))
    ema = [p.detach().clone() for p in params] if settings.ema_decay > 0 else None
    losses = []
    with torch.inference_mode(False):
        unet.train().requires_grad_(True)
        for step in range(settings.steps):
            idx = torch.randint(0, latents.shape[0], (settings.batch_size,), generator=gen)
            drop = torch.rand(settings.batch_size, generator=gen) < settings.uncond_probability
            cond = torch.where(drop.view(-1, 1, 1), uncond, conds[idx])
            loss = diffusion_loss(model.model, latents[idx], cond, gen)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, settings.max_grad_norm)
            optimizer.step()
            schedule.step()
            if ema is not None:
                decay = min(settings.ema_decay, (1 + step) / (10 + step))  # short memory early on
                with torch.no_grad():
                    torch._foreach_lerp_(ema, [p.detach() for p in params], 1.0 - decay)
            losses.append(float(loss.detach()))
            if on_step is not None:
                on_step(step + 1, losses[-1])
        unet.eval().requires_grad_(False)
        if ema is not None:
            with torch.no_grad():
                for p, e in zip(params, ema):
                    p.copy_(e)
    return losses


@dataclass
class DigitsModel:
    model: object          # ModelPatcher
    clip: object           # comfy.sd.CLIP
    conds: PromptConds
    losses: list


def train_digits_model(images: torch.Tensor, labels: torch.Tensor, settings: DenoiserTraining | None = None,
                       on_step=None) -> DigitsModel:
    """Build the digits model from `settings.seed` and train it from scratch on `images` [N, 8, 8]
    in [0, 1] with the prompts of `labels`."""
    settings = settings or DenoiserTraining()
    model, clip = build_digits_checkpoint(settings.seed)
    conds = PromptConds.encode(clip)
    losses = train_denoiser(model, images_to_latents(images), conds.for_labels(labels), conds.uncond,
                            settings, on_step=on_step)
    return DigitsModel(model, clip, conds, losses)


def model_sampling():
    """The digits model's noise schedule (SD1.5's, EPS), without building the model."""
    import comfy.model_base

    return comfy.model_base.model_sampling(tiny_models.tiny_model_config("sd15"), comfy.model_base.ModelType.EPS)


def sigma_to_percent(sigma: float, sampling=None) -> float:
    """ComfyUI's start/end percent of the step at noise level `sigma` (the inverse of
    model_sampling.percent_to_sigma for discrete-time models)."""
    ms = sampling if sampling is not None else model_sampling()
    t = float(ms.timestep(torch.tensor(sigma)))
    return 1.0 - t / (ms.sigmas.shape[0] - 1)


def image_grid(images: torch.Tensor, columns: int, scale: int = 4, pad: int = 1):
    """[N, 8, 8] grey images in [0, 1] -> a PIL image, `columns` per row, white on black, each pixel
    drawn as a `scale` x `scale` block with `pad` grey pixels between the images."""
    from PIL import Image

    n, h, w = images.shape
    rows = math.ceil(n / columns)
    cell_h, cell_w = h * scale + pad, w * scale + pad
    canvas = torch.full((rows * cell_h + pad, columns * cell_w + pad), 0.35)
    big = images.float().clamp(0, 1).repeat_interleave(scale, 1).repeat_interleave(scale, 2)
    for i in range(n):
        r, c = divmod(i, columns)
        canvas[pad + r * cell_h: pad + r * cell_h + h * scale, pad + c * cell_w: pad + c * cell_w + w * scale] = big[i]
    return Image.fromarray((canvas * 255).round().byte().numpy(), mode="L")


def sample_digits(model, conds: PromptConds, labels: torch.Tensor, cfg: float, seed: int, steps: int,
                  sampler: str = "euler", scheduler: str = "normal") -> torch.Tensor:
    """One digit per label through KSampler's code path (comfy.sample.sample), the empty prompt as
    CFG's negative: [N, 8, 8] images in [0, 1]. `model` is the digits MODEL or a patch of it (such
    as Apply Self-NPO's)."""
    import comfy.sample

    noise = torch.randn((labels.shape[0], LATENT_CHANNELS, IMAGE_SIZE, IMAGE_SIZE),
                        generator=torch.Generator().manual_seed(seed))
    raw = comfy.sample.sample(model, noise, steps, cfg, sampler, scheduler, conds.positive(labels), conds.negative(),
                              torch.zeros_like(noise), disable_pbar=True, seed=seed)
    return latents_to_images(model.model.process_latent_in(raw))
