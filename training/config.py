"""TDFT hyper-parameters (docs/algorithm.md §3) and the memory presets (how a run fits a GPU: the
authors' published runs and LoRA presets sized for consumer GPUs). The method's recipe per model
family (w, unconditional input, resolution, ...) is recipes.py's: fields that default to None or
"auto" take it from the loaded model's family.

Each hyper-parameter is described once, here: its default, its meaning and its allowed values live in
the field's metadata (`hp(...)`). Validation, the CLI's flags and help, the settings parser and the
training node's tooltips all read them from there (`describe`, `choices_of`).

`TDFTConfig` is plain data: the trainer, the node and the CLI all build one with `make_config` and
resolve it with `recipes.resolve` against the model; checkpoints store the resolved `to_dict()`, and
resuming compares the stored dict with the new one.
"""
from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, fields

from .adapter_kinds import ADAPTERS
from .export import EXPORTERS
from .trained_kinds import TRAINED_KINDS

LORA_TARGET_NAMES = ("attn", "attn+ff", "all_linear")


AUTO = "auto"  # a recipe value: the loaded model's family decides (recipes.py); None for numbers


def hp(default, help: str, *, kind: type | None = None, choices=None, gt=None, ge=None, lt=None, le=None,
       multiple_of=None):
    """A hyper-parameter field: default, meaning (CLI help, node tooltip) and allowed values. A field
    whose default is None (`kind` says its type) takes its value from the model family's recipe."""
    rules = {"choices": choices, "gt": gt, "ge": ge, "lt": lt, "le": le, "multiple_of": multiple_of,
             "kind": kind or type(default)}
    return dataclasses.field(default=default, metadata={"help": help, **rules})


_RECIPE = "; default: the model family's recipe"


@dataclass
class TDFTConfig:
    # algorithm (docs/algorithm.md §3)
    grid_size: int = hp(25, "N: size of the DDIM grid over the model's timesteps", ge=2, le=1000)
    truncation_steps: int = hp(5, "K: teacher DDIM steps per sample before the truncation point", ge=1)
    corruption_guidance: float = hp(
        None, "w: guidance applied to the teacher to corrupt its predictions (-1 = unconditional only: "
        "SD1.x/SD2 as published and the pack's choice for flow DiTs and video models; -5 SDXL)" + _RECIPE,
        kind=float)
    uncond: str = hp(AUTO, "the teacher's unconditional input: the empty prompt's encoding, or zeroed text "
                     "embeddings and pooled output (SDXL recipe)" + _RECIPE, choices=(AUTO, "empty_prompt", "zeros"))
    loss: str = hp("huber", "regression loss in x0 space: pseudo-Huber or squared error",
                   choices=("huber", "l2"))
    huber_c: float = hp(0.001, "c of the pseudo-Huber loss sqrt(d² + c²) − c", gt=0)
    # teacher
    teacher: str = hp("ema", "ema: an EMA of the student (the paper); base: the frozen initial model "
                      "(no extra copy, cheaper)", choices=("ema", "base"))
    ema_decay: float = hp(0.999, "EMA teacher decay d: θ⁻ ← d·θ⁻ + (1 − d)·θ", ge=0, lt=1)
    # trainable parameters
    mode: str = hp("full", "train all weights (the paper) or a LoRA adapter (extension)",
                   choices=TRAINED_KINDS)  # the live table: a new row is a choice
    lora_rank: int = hp(16, "LoRA rank r", ge=1)
    lora_alpha: float = hp(16.0, "LoRA alpha (the adapter is scaled by alpha / rank)", gt=0)
    lora_targets: str = hp("attn", "layers the LoRA trains: attn | attn+ff (the model family's attention / "
                           "feed-forward layers) | all_linear | a regex over layer names")
    adapter: str = hp("lora", "what a LoRA-mode run trains (ComfyUI's own trainable adapters): lora; loha "
                      "(LyCORIS Hadamard product, rank r per factor); lokr (LyCORIS Kronecker product, "
                      "lora_rank is the factor, alpha unused)", choices=ADAPTERS)  # the live table
    # optimisation
    learning_rate: float = hp(None, "AdamW learning rate (full mode: 1e-6 SD1.5, 1e-7 SDXL; LoRA: 1e-4)" + _RECIPE,
                              kind=float, ge=0)
    weight_decay: float = hp(None, "AdamW weight decay (1e-3 SD1.5, 0 SDXL)" + _RECIPE, kind=float, ge=0)
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
                              "auto: the family's, fp16 for SD UNets, bf16 for DiT and video families)",
                              choices=("no", "fp16", "bf16", "auto"))
    gradient_checkpointing: bool = hp(False, "recompute block activations in the backward pass (less "
                                      "memory, same gradients)")
    seed: int = hp(0, "seed of every random draw (start levels, noise, LoRA initialisation)",
                   ge=0, lt=2 ** 63)
    resolution: int = hp(None, "image mode: training resolution in pixels (aspect-aware crop); prompt-only "
                         "mode: the size of the generated latents (512 SD1.x/SD2, 1024 SDXL)" + _RECIPE,
                         kind=int, ge=64, multiple_of=8)
    crop: str = hp(AUTO, "image mode: how an image is cut to the square after resizing: center, or random "
                   "(one crop per image, drawn from the seed; its coordinates are passed as SDXL's crop "
                   "micro-conditioning, the authors' SDXL recipe)" + _RECIPE, choices=(AUTO, "center", "random"))
    frames: int = hp(0, "video models: frames per training clip, c·k+1 for a VAE that compresses time c-fold "
                     "(Wan, HunyuanVideo: 1, 5, 9, ...); 0 = the family's recipe (17 for video models, 1 for "
                     "image models)", ge=0)
    expert: str = hp("none", "Wan 2.2 A14B: the expert this MODEL is, trained over its own noise range only "
                     "(high_noise: sigma >= expert_boundary, low_noise: below it); none: the whole range",
                     choices=("none", "high_noise", "low_noise"))
    expert_boundary: float = hp(0.0, "the sigma (timestep fraction) where Wan 2.2 A14B switches experts; 0 = "
                                "Wan 2.2's own: 0.875 text-to-video, 0.9 image-to-video", ge=0, lt=1)
    fps: float = hp(16.0, "video clips in the data: the frame rate they are sampled at", gt=0)
    trajectory_buffer: int = hp(64, "prompt-only mode (this pack's extension): number of buffered teacher "
                                "trajectories", ge=1)
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
            if getattr(self, f.name) is not None or f.default is not None:  # None: the recipe's, later
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
    kind = rules["kind"]
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
    if limits and f.metadata["kind"] is not bool:
        text += f" ({', '.join(limits)})"
    return text


def choices_of(name: str) -> tuple | None:
    choices = _FIELDS[name].metadata.get("choices")
    return None if choices is None else tuple(choices)


def field_types() -> dict[str, type]:
    """Field name -> the type its value must have (bool/int/float/str)."""
    return {f.name: f.metadata["kind"] for f in fields(TDFTConfig)}


def recipe_fields() -> tuple[str, ...]:
    """The fields whose default is the model family's recipe."""
    return tuple(f.name for f in fields(TDFTConfig) if f.default is None or f.default == AUTO)


_FIELDS = {f.name: f for f in fields(TDFTConfig)}


# Memory presets: how a run fits a GPU (mode, LoRA rank and layers, batch x accumulation, checkpointing,
# precision, optimizer). None of them sets a recipe value (recipes.py: w, unconditional input,
# resolution, crop, learning rate, weight decay): those come from the loaded model's family, and an
# explicit value always wins. "attn" and "auto" precision mean what the model family needs
# (families.py): its attention layers, fp16 for SD UNets and bf16 for DiTs.
#
# "sd15" / "sdxl": the authors' published runs (Self-NPO/train.sh, train_xl.sh): full fine-tuning, 8-bit
# AdamW, fp16, SDXL with gradient checkpointing. Their batch is per GPU: 20 x 4 GPUs for SD1.5 (the
# paper's 80); one GPU reaches the same global batch with 4 accumulated micro-batches (on 4 processes:
# batch_size 20, grad_accum 1). train_xl.sh runs batch 10 per GPU on an unstated number of GPUs; the
# preset is one GPU's 10.
_PUBLISHED = dict(mode="full", optimizer="adamw8bit", mixed_precision="fp16", output_format="offset")
_LORA = dict(mode="lora", mixed_precision="auto", output_format="lora")
DEFAULT_PRESET = "lora-12gb"  # what the training node and comfy-selfnpo-train start from
PRESETS: dict[str, dict] = {
    "sd15": dict(_PUBLISHED, batch_size=20, grad_accum=4, gradient_checkpointing=False),
    "sdxl": dict(_PUBLISHED, batch_size=10, grad_accum=1, gradient_checkpointing=True),
    "lora-8gb": dict(_LORA, lora_rank=8, lora_alpha=8.0, lora_targets="attn",
                     batch_size=1, grad_accum=8, gradient_checkpointing=True),
    "lora-12gb": dict(_LORA, lora_rank=16, lora_alpha=16.0, lora_targets="attn",
                      batch_size=2, grad_accum=4, gradient_checkpointing=True),
    "lora-16gb": dict(_LORA, lora_rank=16, lora_alpha=16.0, lora_targets="attn+ff",
                      batch_size=4, grad_accum=2, gradient_checkpointing=True),
    "lora-24gb": dict(_LORA, lora_rank=32, lora_alpha=32.0, lora_targets="attn+ff",
                      batch_size=8, grad_accum=1, gradient_checkpointing=True),  # without: 56 GB on SDXL (planner)
}
for _name, _values in PRESETS.items():  # a preset names only real hyper-parameters, never a recipe value
    assert set(_values) <= set(_FIELDS), (_name, set(_values) - set(_FIELDS))
    assert not set(_values) & set(recipe_fields()), (_name, set(_values) & set(recipe_fields()))


def make_config(preset: str | None = None, **overrides) -> TDFTConfig:
    """A validated config: the preset's values (if any), then `overrides`. Overrides that are None
    are ignored, so a CLI can pass every option it has. Unknown names raise ValueError. Recipe values
    not given stay "auto" until `recipes.resolve` fills them in from the loaded model's family."""
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
