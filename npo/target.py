"""`Target`: the model parameter (or rows of one) that an entry of an NPO file means."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch


@dataclass(frozen=True)
class Target:
    """A model parameter, or the rows of one that a file entry means (a fused qkv's q part)."""
    key: str                              # the model's state-dict key, "diffusion_model.…"
    offset: tuple | None = None           # (dim, start, length): ComfyUI's slice-patch convention
    function: Callable | None = None      # file layout -> model layout (e.g. swap_scale_shift)

    @classmethod
    def of(cls, comfy_target) -> "Target":
        """From a ComfyUI key-map value: "key", (key, offset) or (key, offset, function)."""
        if isinstance(comfy_target, str):
            return cls(comfy_target)
        return cls(comfy_target[0], comfy_target[1], comfy_target[2] if len(comfy_target) > 2 else None)

    def patch_key(self):
        """The key `ModelPatcher.add_patches` takes for this target."""
        if self.offset is None and self.function is None:
            return self.key
        if self.function is None:
            return (self.key, self.offset)
        return (self.key, self.offset, self.function)

    def shape(self, model_shape) -> tuple:
        shape = list(model_shape)
        if self.offset is not None:
            shape[self.offset[0]] = self.offset[2]
        return tuple(shape)

    def fits(self, shapes: dict) -> bool:
        shape = shapes.get(self.key)
        if shape is None:
            return False
        if self.offset is None:
            return True
        dim, start, length = self.offset
        return dim < len(shape) and start + length <= shape[dim]

    def narrow(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor if self.offset is None else tensor.narrow(*self.offset)

    def describe(self) -> str:
        if self.offset is None:
            return self.key
        dim, start, length = self.offset
        return f"{self.key}[{start}:{start + length}]" if dim == 0 else f"{self.key} (dim {dim}, {start}+{length})"
