"""What resolving an NPO file against a model did, and the error for files that do not fit."""
from __future__ import annotations

import os
from dataclasses import dataclass, field


class NPOFormatError(ValueError):
    """The file is not an NPO weight file this pack can read, or does not fit the model."""


@dataclass
class PatchReport:
    """What resolving an NPO file against a model did."""
    format: str
    patched: int = 0                                   # model weights that receive an NPO patch
    unmatched: list[str] = field(default_factory=list)  # file entries that fit no model weight
    ignored: list[str] = field(default_factory=list)    # text-encoder/VAE entries, skipped on purpose
    strength: float = 1.0
    merge_weight: float = 0.0
    merged: int = 0                                    # weights that receive the −β(θ_pos − θ_base) term
    source: str = ""
    offset_against: str = ""                           # whole-model files: the weights subtracted from them
    warnings: list[str] = field(default_factory=list)

    def summary(self) -> str:
        text = (f"{file_name(self.source)}: {self.format}, patched {self.patched} weights (strength {self.strength:g}"
                f", merge weight {self.merge_weight:g}")
        if self.merge_weight:
            text += f" on {self.merged} weights"
        text += f"), {len(self.unmatched)} unmatched keys"
        if self.ignored:
            text += f", {len(self.ignored)} text-encoder keys ignored"
        if self.offset_against:
            text += f"; whole model taken as an offset against {self.offset_against}"
        return text + "".join(f"\nWARNING: {w}" for w in self.warnings)


def file_name(source: str) -> str:
    return os.path.basename(source) if source else "NPO weights"
