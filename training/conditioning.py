"""Prompts to the inputs `BaseModel.apply_model` takes, through ComfyUI's own path: the CLIP's scheduled
encoding (what CLIPTextEncode outputs), then the sampler's `encode_model_conds` -> the model's
`extra_conds`. So everything a model reads arrives as in sampling: SDXL's pooled/size vector,
LTXV's attention mask and frame rate, the Flux family's guidance value, HunyuanVideo 1.5's concat
channels, ...

The result is split in two: `tensors` (batch 1; concatenated along the batch for several items) and
`constants` (plain values such as a frame rate or Lumina 2's token count). A batch carries the
constants row by row (`ROW_CONSTANTS`); `forward_by_constants` runs rows whose constants differ in
separate forward passes, as ComfyUI's sampler batches only conditionings it can concatenate."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


ROW_CONSTANTS = "row_constants"  # conditioning key: a list with one dict of plain values per row


@dataclass
class ModelInputs:
    tensors: dict
    constants: dict = field(default_factory=dict)

    def as_cond(self) -> dict:
        """The batch-1 conditioning dict the trainer concatenates: tensors plus this row's constants."""
        return {**self.tensors, ROW_CONSTANTS: [self.constants]}


def _signature(constants: dict) -> tuple:
    return tuple(sorted((k, repr(v)) for k, v in constants.items()))


def forward_by_constants(forward, x, sigma, cond: dict):
    """forward(x, σ, inputs) for a batch whose rows may differ in their plain inputs: one call per
    group of equal constants, results back in row order."""
    rows = cond.get(ROW_CONSTANTS) or [{}] * x.shape[0]
    tensors = {k: v for k, v in cond.items() if k != ROW_CONSTANTS}
    groups: dict[tuple, list[int]] = {}
    for i, constants in enumerate(rows):
        groups.setdefault(_signature(constants), []).append(i)
    if len(groups) == 1:
        return forward(x, sigma, {**rows[0], **tensors})
    outs, order = [], []
    for idx in groups.values():
        sel = torch.tensor(idx, device=x.device)
        outs.append(forward(x[sel], sigma[sel], {**rows[idx[0]], **{k: v[sel] for k, v in tensors.items()}}))
        order += idx
    return torch.cat(outs)[torch.argsort(torch.tensor(order, device=x.device))]


class TextEncoder:
    def __init__(self, base_model, clip, latent_shape):
        self.base_model, self.clip, self.latent_shape = base_model, clip, tuple(latent_shape)

    def conditioning(self, text: str, extras: dict | None = None) -> list:
        """CONDITIONING for `text`, as CLIPTextEncode makes it (plus `extras`, e.g. SDXL's crop_w/crop_h)."""
        encoded = self.clip.encode_from_tokens_scheduled(self.clip.tokenize(text))
        return [[c, {**options, **(extras or {})}] for c, options in encoded]

    def model_inputs(self, conditioning: list, prompt_type: str = "positive") -> ModelInputs:
        """A CONDITIONING's first entry (a prompt schedule's start) as apply_model inputs."""
        import comfy.sampler_helpers
        import comfy.samplers

        conds = comfy.sampler_helpers.convert_cond(conditioning[:1])
        noise = torch.zeros((1,) + self.latent_shape)
        conds = comfy.samplers.encode_model_conds(self.base_model.extra_conds, conds, noise, torch.device("cpu"),
                                                  prompt_type, latent_image=noise)
        out = ModelInputs({})
        for name, value in conds[0]["model_conds"].items():
            value = getattr(value, "cond", value)
            if torch.is_tensor(value):
                value = value.detach().cpu().clone()
                out.tensors[name] = value.float() if value.is_floating_point() else value
            elif value is not None:
                out.constants[name] = value
        return out

    def prompt(self, text: str, prompt_type: str = "positive", extras: dict | None = None) -> ModelInputs:
        return self.model_inputs(self.conditioning(text, extras), prompt_type)

    def zeros(self, extras: dict | None = None) -> ModelInputs:
        """The SDXL recipe's unconditional input: the empty prompt's encoding with its text embeddings
        (and pooled vector) zeroed; its micro-conditioning (sizes, crop) kept, as the authors keep it."""
        conditioning = [[torch.zeros_like(c), {k: torch.zeros_like(v) if k == "pooled_output" and torch.is_tensor(v)
                                                else v for k, v in options.items()}]
                        for c, options in self.conditioning("", extras)]
        return self.model_inputs(conditioning, "negative")
