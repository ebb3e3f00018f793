"""TDFT hyper-parameters (docs/algorithm.md §3), the published recipes and LoRA presets sized for
consumer GPUs.

Each hyper-parameter is described once, here: its default, its meaning and its allowed values live in
the field's metadata (`hp(...)`). Validation, the CLI's flags and help, the settings parser and the
training node's tooltips all read them from there (`describe`, `choices_of`).

`TDFTConfig` is plain data: the trainer, the node and the CLI all build one with `make_config`,
checkpoints store `to_dict()`, and resuming compares the stored dict with the new one.
"""
from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, fields

from .export import EXPORTERS

LORA_TARGET_NAMES = ("attn", "attn+ff", "all_linear")


def hp(default, help: str, *, choices=None, gt=None, ge=None, lt=None, le=None, multiple_of=None):
    """A hyper-parameter field: default, meaning (CLI help, node tooltip) and allowed values."""
    rules = {"choices": choices, "gt": gt, "ge": ge, "lt": lt, "le": le, "multiple_of": multiple_of}
    return dataclasses.field(default=default, metadata={"help": help, **rules})


@dataclass
class TDFTConfig:
    # algorithm (docs/algorithm.md §3)
    grid_size: int = hp(25, "N: size of the DDIM grid over the model's timesteps", ge=2, le=1000)
    truncation_steps: int = hp(5, "K: teacher DDIM steps per sample before the truncation point", ge=1)
    corruption_guidance: float = hp(
        -1.0, "w: guidance applied to the teacher to corrupt its predictions (-1 = unconditional only: "
        "SD1.x/SD2 as published and the default for flow DiTs and video models, an extension; -5 SDXL)")
    uncond: str = hp("empty_prompt", "the teacher's unconditional input: the empty prompt's encoding, or "
                     "zeroed embeddings (SDXL recipe)", choices=("empty_prompt", "zeros"))
    loss: str = hp("huber", "regression loss in x0 space: pseudo-Huber or squared error",
                   choices=("huber", "l2"))
    huber_c: float = hp(0.001, "c of the pseudo-Huber loss sqrt(d² + c²) − c", gt=0)
    # teacher
    teacher: str = hp("ema", "ema: an EMA of the student (the paper); base: the frozen initial model "
                      "(no extra copy, cheaper)", choices=("ema", "base"))
    ema_decay: float = hp(0.999, "EMA teacher decay d: θ⁻ ← d·θ⁻ + (1 − d)·θ", ge=0, lt=1)
    # trainable parameters
    mode: str = hp("full", "train all weights (the paper) or a LoRA adapter (extension)",
                   choices=("full", "lora"))
    lora_rank: int = hp(16, "LoRA rank r", ge=1)
    lora_alpha: float = hp(16.0, "LoRA alpha (the adapter is scaled by alpha / rank)", gt=0)
    lora_targets: str = hp("attn", "layers the LoRA trains: attn | attn+ff (the model family's attention / "
                           "feed-forward layers) | all_linear | a regex over layer names")
    adapter: str = hp("lora", "what a LoRA-mode run trains (ComfyUI's own trainable adapters): lora; loha "
                      "(LyCORIS Hadamard product, rank r per factor); lokr (LyCORIS Kronecker product, "
                      "lora_rank is the factor, alpha unused)", choices=("lora", "loha", "lokr"))
    # optimisation
    learning_rate: float = hp(1e-6, "AdamW learning rate (1e-6 SD1.5 and 1e-7 SDXL full; ~1e-4 LoRA)", ge=0)
    weight_decay: float = hp(1e-3, "AdamW weight decay", ge=0)
    adam_beta1: float = hp(0.9, "AdamW beta1", ge=0, lt=1)
    adam_beta2: float = hp(0.999, "AdamW beta2", ge=0, lt=1)
    adam_eps: float = hp(1e-8, "AdamW epsilon", gt=0)
    max_grad_norm: float = hp(1.0, "gradient clipping by global norm (0 = off)", ge=0)
    optimizer: str = hp("adamw", "adamw, or adamw8bit (needs bitsandbytes; falls back to adamw with a "
                        "warning)", choices=("adamw", "adamw8bit"))
    lr_schedule: str = hp("constant", "learning-rate schedule", choices=("constant", "warmup", "cosine"))
    warmup_steps: int = hp(0, "steps of linear learning-rate warm-up", ge=0)
    batch_size: int = hp(1, "items per micro-batch and process (the global batch is batch_size × "
                         "number of processes)", ge=1)
    grad_accum: int = hp(1, "micro-batches per optimizer step", ge=1)
    steps: int = hp(1000, "optimizer steps", ge=1)
    mixed_precision: str = hp("no", "autocast dtype of the forward passes (fp16 adds a gradient scaler; "
                              "auto: fp16 for SD UNets, bf16 for DiT and video families)",
                              choices=("no", "fp16", "bf16", "auto"))
    gradient_checkpointing: bool = hp(False, "recompute block activations in the backward pass (less "
                                      "memory, same gradients)")
    seed: int = hp(0, "seed of every random draw (start levels, noise, LoRA initialisation)",
                   ge=0, lt=2 ** 63)
    resolution: int = hp(512, "image mode: training resolution in pixels (aspect-aware centre crop); "
                         "data-free mode: the size of the generated latents", ge=64, multiple_of=8)
    frames: int = hp(0, "video models: frames per training clip, c·k+1 for a VAE that compresses time c-fold "
                     "(Wan, HunyuanVideo: 1, 5, 9, ...); 0 = 17 for video models, 1 for image models", ge=0)
    fps: float = hp(16.0, "video clips in the data: the frame rate they are sampled at", gt=0)
    trajectory_buffer: int = hp(64, "data-free mode: number of buffered teacher trajectories", ge=1)
    save_every: int = hp(100, "every N steps: a resumable checkpoint and an exported step file "
                         "<name>-stepNNNNNN.safetensors (0 = only at the end or on stop)", ge=0)
    keep_last: int = hp(3, "how many exported step files to keep (0 = all)", ge=0)
    output_format: str = hp("lora", "file written: lora (LoRA runs), offset (exact weight difference) or "
                            "unet (whole trained UNet); full-mode runs default to offset",
                            choices=EXPORTERS)  # the table itself: a new exporter is a new choice

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
        for f in fields(self):
            _check_field(f, getattr(self, f.name))
        if self.truncation_steps >= self.grid_size:
            raise ValueError(f"truncation_steps={self.truncation_steps} must be smaller than "
                             f"grid_size={self.grid_size}")
        if self.lr_schedule == "warmup" and self.warmup_steps == 0:
            raise ValueError("lr_schedule='warmup' needs warmup_steps > 0")
        # output_format='lora' with mode='full' (the bare dataclass default) is accepted here;
        # make_config picks 'offset' for full mode, and the export refuses a LoRA of a full run.
        if self.lora_targets not in LORA_TARGET_NAMES:
            try:
                re.compile(self.lora_targets)
            except re.error as e:
                raise ValueError(f"lora_targets={self.lora_targets!r} is neither one of "
                                 f"{list(LORA_TARGET_NAMES)} nor a valid regex: {e}") from None


_BOUNDS = (("gt", ">", lambda v, b: v > b), ("ge", ">=", lambda v, b: v >= b),
           ("lt", "<", lambda v, b: v < b), ("le", "<=", lambda v, b: v <= b))


def _check_field(f: dataclasses.Field, value) -> None:
    rules = f.metadata
    kind = type(f.default)
    if kind is float and not (isinstance(value, (int, float)) and math.isfinite(value)):
        raise ValueError(f"{f.name} must be a finite number, got {value!r}")
    if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ValueError(f"{f.name} must be a whole number, got {value!r}")
    if rules.get("choices") and value not in rules["choices"]:
        raise ValueError(f"{f.name}={value!r} is not one of {list(rules['choices'])}")
    for rule, sign, ok in _BOUNDS:
        bound = rules.get(rule)
        if bound is not None and not ok(value, bound):
            raise ValueError(f"{f.name} must be {sign} {bound}, got {value!r}")
    if rules.get("multiple_of") and value % rules["multiple_of"]:
        raise ValueError(f"{f.name}={value} must be a multiple of {rules['multiple_of']}")


def describe(name: str) -> str:
    """The meaning of a hyper-parameter, with its allowed values (CLI help, node tooltips)."""
    f = _FIELDS[name]
    text = f.metadata["help"]
    limits = [f"{sign} {f.metadata[rule]}" for rule, sign, _ok in _BOUNDS if f.metadata.get(rule) is not None]
    if limits and type(f.default) is not bool:
        text += f" ({', '.join(limits)})"
    return text


def choices_of(name: str) -> tuple | None:
    choices = _FIELDS[name].metadata.get("choices")
    return None if choices is None else tuple(choices)


def field_types() -> dict[str, type]:
    """Field name -> the type its value must have (taken from the default: bool/int/float/str)."""
    return {f.name: type(f.default) for f in fields(TDFTConfig)}


_FIELDS = {f.name: f for f in fields(TDFTConfig)}


# The authors' released recipes (docs/algorithm.md §3; Self-NPO/train.py and train_xl.py). Their batch
# is per GPU times GPUs (20 x 4 for SD1.5); on one GPU we keep the per-step batch with gradient
# accumulation (on 4 processes: batch_size 20, grad_accum 1).
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
# a much larger learning rate than full fine-tuning because the adapter starts at zero. "attn" and
# "auto" precision mean what the model family needs (training/families.py): its attention layers,
# fp16 for SD UNets and bf16 for DiTs.
_LORA_COMMON = dict(
    grid_size=25, truncation_steps=5, loss="huber", huber_c=0.001, teacher="base", mode="lora",
    learning_rate=1e-4, weight_decay=1e-3, max_grad_norm=1.0, steps=1000,
    mixed_precision="auto", output_format="lora")
DEFAULT_PRESET = "lora-12gb"  # what the training node and comfy-selfnpo-train start from
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
for _name, _values in PRESETS.items():  # a preset names only real hyper-parameters
    assert set(_values) <= set(_FIELDS), (_name, set(_values) - set(_FIELDS))


def make_config(preset: str | None = None, **overrides) -> TDFTConfig:
    """A validated config: the preset's values (if any), then `overrides`. Overrides that are None
    are ignored, so a CLI can pass every option it has. Unknown names raise ValueError."""
    values: dict = {}
    if preset is not None:
        if preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r}; choose from {', '.join(PRESETS)}")
        values.update(PRESETS[preset])
    values.update({k: v for k, v in overrides.items() if v is not None})
    if values.get("mode", "full") == "full" and "output_format" not in values:
        values["output_format"] = "offset"  # a full-mode run cannot be saved as a LoRA
    config = TDFTConfig.from_dict(values)
    config.validate()
    return config
