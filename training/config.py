"""TDFT hyper-parameters (SPEC §3), the published recipes and LoRA presets sized for consumer GPUs.

`TDFTConfig` is plain data: the trainer, the node and the CLI all build one with `make_config`,
checkpoints store `to_dict()`, and resuming compares the stored dict with the new one.
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, fields

LOSSES = ("huber", "l2")
TEACHERS = ("ema", "base")
MODES = ("full", "lora")
UNCONDS = ("empty_prompt", "zeros")
OPTIMIZERS = ("adamw", "adamw8bit")
SCHEDULES = ("constant", "warmup", "cosine")
PRECISIONS = ("no", "fp16", "bf16")
OUTPUT_FORMATS = ("lora", "offset", "unet")
LORA_TARGET_NAMES = ("attn", "attn+ff", "all_linear")


@dataclass
class TDFTConfig:
    # algorithm (SPEC §3)
    grid_size: int = 25                 # N (DDIM grid over T)
    truncation_steps: int = 5           # K
    corruption_guidance: float = -1.0   # w (-1 SD1.x/SD2, -5 SDXL)
    uncond: str = "empty_prompt"        # "empty_prompt" | "zeros" (SDXL: zeroed embeddings)
    loss: str = "huber"                 # "huber" | "l2"
    huber_c: float = 0.001
    # teacher
    teacher: str = "ema"                # "ema" | "base"  (base = frozen initial weights)
    ema_decay: float = 0.999
    # trainable parameters
    mode: str = "full"                  # "full" | "lora"
    lora_rank: int = 16
    lora_alpha: float = 16.0
    lora_targets: str = "attn"          # "attn" | "attn+ff" | "all_linear" | regex
    # optimisation
    learning_rate: float = 1e-6
    weight_decay: float = 1e-3
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    max_grad_norm: float = 1.0
    optimizer: str = "adamw"            # "adamw" | "adamw8bit" (bitsandbytes; warn+fallback)
    lr_schedule: str = "constant"       # "constant" | "warmup" | "cosine"
    warmup_steps: int = 0
    batch_size: int = 1
    grad_accum: int = 1
    steps: int = 1000
    mixed_precision: str = "no"         # "no" | "fp16" | "bf16" (fp16 uses a GradScaler)
    gradient_checkpointing: bool = False
    seed: int = 0
    resolution: int = 512               # image mode: training resolution (aspect-aware crop)
    trajectory_buffer: int = 64         # data-free mode: buffered trajectories
    save_every: int = 0                 # resumable checkpoint every N steps (0 = only at end/cancel)
    output_format: str = "lora"         # "lora" | "offset" | "unet" (lora needs mode="lora";
                                        #  a full-mode run can be saved as offset or unet;
                                        #  make_config picks "offset" for full mode)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TDFTConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown TDFT config key(s) {unknown}; known keys: {sorted(known)}")
        return cls(**d)

    def validate(self) -> None:
        """Raise ValueError naming the first bad value and what is allowed."""
        def choice(name, allowed):
            value = getattr(self, name)
            if value not in allowed:
                raise ValueError(f"{name}={value!r} is not one of {list(allowed)}")

        def positive(name, allow_zero=False):
            value = getattr(self, name)
            if not (value >= 0 if allow_zero else value > 0):
                raise ValueError(f"{name} must be {'>= 0' if allow_zero else '> 0'}, got {value!r}")

        for name, allowed in (("loss", LOSSES), ("teacher", TEACHERS), ("mode", MODES),
                              ("uncond", UNCONDS), ("optimizer", OPTIMIZERS),
                              ("lr_schedule", SCHEDULES), ("mixed_precision", PRECISIONS),
                              ("output_format", OUTPUT_FORMATS)):
            choice(name, allowed)
        for name in ("grid_size", "truncation_steps", "batch_size", "grad_accum", "steps",
                     "resolution", "trajectory_buffer", "lora_rank", "huber_c", "lora_alpha",
                     "adam_eps"):
            positive(name)
        for name in ("learning_rate", "weight_decay", "warmup_steps", "save_every", "max_grad_norm"):
            positive(name, allow_zero=True)
        if self.grid_size > 1000:
            raise ValueError(f"grid_size={self.grid_size} is larger than the 1000 training timesteps")
        if self.truncation_steps >= self.grid_size:
            raise ValueError(f"truncation_steps={self.truncation_steps} must be smaller than "
                             f"grid_size={self.grid_size}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        for name in ("adam_beta1", "adam_beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if self.resolution % 8:
            raise ValueError(f"resolution={self.resolution} must be a multiple of 8 (VAE downscale)")
        if self.lr_schedule == "warmup" and self.warmup_steps == 0:
            raise ValueError("lr_schedule='warmup' needs warmup_steps > 0")
        # output_format='lora' with mode='full' (the bare dataclass default) is accepted here;
        # make_config picks 'offset' for full mode, and export() refuses a LoRA of a full run.
        if self.lora_targets not in LORA_TARGET_NAMES:
            try:
                re.compile(self.lora_targets)
            except re.error as e:
                raise ValueError(f"lora_targets={self.lora_targets!r} is neither one of "
                                 f"{list(LORA_TARGET_NAMES)} nor a valid regex: {e}") from None


# The authors' released recipes (SPEC §3; Self-NPO/train.py and train_xl.py). Their batch is per GPU
# times GPUs (20 x 4 for SD1.5); on one GPU we keep the per-step batch with gradient accumulation.
_RECIPE_SD15 = dict(
    grid_size=25, truncation_steps=5, corruption_guidance=-1.0, uncond="empty_prompt",
    loss="huber", huber_c=0.001, teacher="ema", ema_decay=0.999, mode="full",
    learning_rate=1e-6, weight_decay=1e-3, adam_beta1=0.9, adam_beta2=0.999, adam_eps=1e-8,
    max_grad_norm=1.0, batch_size=20, grad_accum=4, steps=1000, resolution=512,
    mixed_precision="fp16", gradient_checkpointing=False, output_format="offset")
_RECIPE_SDXL = dict(
    _RECIPE_SD15, corruption_guidance=-5.0, uncond="zeros", learning_rate=1e-7, weight_decay=0.0,
    batch_size=10, grad_accum=1, resolution=1024, gradient_checkpointing=True)

# LoRA presets for one consumer GPU (SD1.5 at 512 or SDXL at 1024 with the lower ones needing
# gradient checkpointing). The frozen base as teacher costs no extra copy of the weights. LoRA needs
# a much larger learning rate than full fine-tuning because the adapter starts at zero.
_LORA_COMMON = dict(
    grid_size=25, truncation_steps=5, loss="huber", huber_c=0.001, teacher="base", mode="lora",
    lora_alpha=None, learning_rate=1e-4, weight_decay=1e-3, max_grad_norm=1.0, steps=1000,
    mixed_precision="fp16", output_format="lora")
PRESETS: dict[str, dict] = {
    "sd15": _RECIPE_SD15,
    "sdxl": _RECIPE_SDXL,
    "lora-8gb": dict(_LORA_COMMON, lora_rank=8, lora_alpha=8.0, lora_targets="attn",
                     batch_size=1, grad_accum=8, gradient_checkpointing=True),
    "lora-12gb": dict(_LORA_COMMON, lora_rank=16, lora_alpha=16.0, lora_targets="attn",
                      batch_size=2, grad_accum=4, gradient_checkpointing=True),
    "lora-16gb": dict(_LORA_COMMON, lora_rank=16, lora_alpha=16.0, lora_targets="attn+ff",
                      batch_size=4, grad_accum=2, gradient_checkpointing=True),
    "lora-24gb": dict(_LORA_COMMON, lora_rank=32, lora_alpha=32.0, lora_targets="attn+ff",
                      batch_size=8, grad_accum=1, gradient_checkpointing=False),
}


def make_config(preset: str | None = None, **overrides) -> TDFTConfig:
    """A validated config: the preset's values (if any), then `overrides`. Overrides that are None
    are ignored, so a CLI can pass every option it has. Unknown names raise ValueError."""
    values: dict = {}
    if preset is not None:
        if preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r}; choose from {sorted(PRESETS)}")
        values.update({k: v for k, v in PRESETS[preset].items() if v is not None})
    values.update({k: v for k, v in overrides.items() if v is not None})
    if values.get("mode", "full") == "full" and "output_format" not in values:
        values["output_format"] = "offset"  # a full-mode run cannot be saved as a LoRA
    config = TDFTConfig.from_dict(values)
    config.validate()
    return config
