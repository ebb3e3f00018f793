"""The demo's model and judge: the quality benchmark's digits model, shipped as one small file.

`comfy-selfnpo-train --demo` trains a data-free Self-NPO negative model of it with the pack's real
trainer, then samples every class with plain CFG and with NPO-CFG (same seeds) and scores both with
the benchmark's classifier, so the grid shows recognisable digits labelled with measured numbers.

`demo_model.safetensors` is made by `scripts/make_digits_demo_model.py` (the benchmark's base-model
and classifier training, same seeds). Its layout:

  unet.<key>            the digits UNet (the tiny SD1.5 UNet of tiny_models), float16
  classifier.<key>      the digit classifier of metrics.py, float32
  reference_features    its features of the held-out real digits [N, FEATURE_DIM]
  prompt_embeddings     the ten class prompts and the empty prompt through the tiny CLIP: the demo
                        checks that the CLIP it builds still encodes them so (the UNet learned them)
  metadata              seed (of the model and CLIP initialisation), base_model (its training budget), made_by
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from . import metrics
from .model import DIGIT_NAMES, PromptConds, build_digits_checkpoint, image_grid, sample_digits

DEMO_MODEL = Path(__file__).with_name("demo_model.safetensors")
DEMO_PER_CLASS = 25      # samples per class and column that the metrics score (the benchmark's)
DEMO_SAMPLING_STEPS = 10  # euler steps (the benchmark's)
DEMO_CFG = 1.5           # where plain CFG and NPO-CFG both reach their best FD in the benchmark
SHOWN_PER_CLASS = 4      # samples per class drawn in the grid


class DemoModelError(RuntimeError):
    """The shipped demo model is missing or no longer matches this version's tiny CLIP."""


@dataclass
class DigitsDemo:
    model: object            # ModelPatcher of the digits model
    clip: object             # the tiny CLIP it was trained with
    conds: PromptConds
    judge: metrics.Reference
    description: str


def save_demo_model(path: Path, unet_state: dict, classifier, reference_features: torch.Tensor,
                    conds: PromptConds, metadata: dict) -> None:
    import safetensors.torch

    tensors = {f"unet.{k}": v.detach().half().contiguous() for k, v in unet_state.items()}
    tensors.update({f"classifier.{k}": v.detach().float().contiguous() for k, v in classifier.state_dict().items()})
    tensors["reference_features"] = reference_features.float().contiguous()
    tensors["prompt_embeddings"] = torch.cat([conds.classes, conds.uncond]).float().contiguous()
    safetensors.torch.save_file(tensors, str(path), metadata={k: json.dumps(v) for k, v in metadata.items()})


def load_demo_model(path: Path = DEMO_MODEL) -> DigitsDemo:
    import safetensors

    if not path.is_file():
        raise DemoModelError(f"the demo model {path} is missing: reinstall the pack, or make it with "
                             "`python scripts/make_digits_demo_model.py`")
    with safetensors.safe_open(str(path), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        meta = {k: json.loads(v) for k, v in (f.metadata() or {}).items()}
    model, clip = build_digits_checkpoint(int(meta["seed"]))
    model.model.diffusion_model.load_state_dict(_section(tensors, "unet.", torch.float32))
    conds = PromptConds.encode(clip)
    if not torch.allclose(torch.cat([conds.classes, conds.uncond]), tensors["prompt_embeddings"], atol=1e-4):
        raise DemoModelError(f"{path} was made with another version of the tiny CLIP (its prompts encode "
                             "differently now): remake it with `python scripts/make_digits_demo_model.py`")
    classifier = metrics.DigitClassifier()
    classifier.load_state_dict(_section(tensors, "classifier.", torch.float32))
    judge = metrics.Reference(classifier.eval().requires_grad_(False), tensors["reference_features"].double())
    return DigitsDemo(model, clip, conds, judge, "the built-in handwritten-digits model (demo)")


def _section(tensors: dict, prefix: str, dtype) -> dict:
    return {k[len(prefix):]: v.to(dtype) for k, v in tensors.items() if k.startswith(prefix)}


def demo_labels(per_class: int = DEMO_PER_CLASS) -> torch.Tensor:
    """`per_class` of each digit, grouped: 0 0 ... 1 1 ... 9."""
    return torch.arange(len(DIGIT_NAMES)).repeat_interleave(per_class)


def compare_cfg_and_npo(demo: DigitsDemo, npo_model, cfg: float = DEMO_CFG, seed: int = 0,
                        steps: int = DEMO_SAMPLING_STEPS):
    """Sample every class with plain CFG (the digits model) and with `npo_model` (Apply Self-NPO of
    it) from the same noise. Returns {column: (images [N, 8, 8], scores)}, scores as metrics.Reference
    gives them (FD, precision, recall, accuracy of the requested digit)."""
    labels = demo_labels()
    out = {}
    for column, model in (("CFG", demo.model), ("NPO-CFG", npo_model)):
        images = sample_digits(model, demo.conds, labels, cfg, seed, steps)
        out[column] = (images, demo.judge.score(images, labels))
    return out


def column_label(column: str, scores: dict) -> str:
    return f"{column}: FD {scores['fd']:.1f}, {100 * scores['accuracy']:.0f}% right digit"


def comparison_grid(compared: dict, shown: int = SHOWN_PER_CLASS):
    """A PIL grid: a row per digit, a column per entry of `compared`, `shown` samples per cell, the
    column headers carrying the metrics."""
    from ..images import labelled_grid

    per_class = next(iter(compared.values()))[0].shape[0] // len(DIGIT_NAMES)
    rows = []
    for digit in range(len(DIGIT_NAMES)):
        first = digit * per_class
        rows.append([image_grid(images[first:first + shown], shown) for images, _ in compared.values()])
    labels = [column_label(column, scores) for column, (_, scores) in compared.items()]
    return labelled_grid(rows, labels, list(DIGIT_NAMES), scale=2)
