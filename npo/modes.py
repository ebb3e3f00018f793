"""Guidance modes (one table row each) and the sampling interval in which they act.

A step evaluates a few predictions D(model, prompt). A mode lists them and says how they become the
(cond, uncond) pair from which ComfyUI's CFG — with every pre-CFG, CFG and post-CFG patch — makes
the guided prediction D = uncond + g·(cond − uncond):

  npo               cond = D_pos(c)            uncond = D_neg(c_neg)        the paper
  autoguidance      cond = D_pos(c)            uncond = D_neg(c)            Karras et al. 2024: the
                                                                            weak model on the prompt
  cfg+autoguidance  cond = D_pos(c) + Δ        uncond = D_pos(c_neg) + Δ    Δ = g_ag·(D_pos(c) − D_neg(c))
  plain CFG         cond = D_pos(c)            uncond = D_pos(c_neg)        steps outside the interval

cfg+autoguidance shifts both predictions by Δ: CFG's difference stays what plain CFG has, and Δ
arrives exactly once for every g (g = 1 and g = 0 included), so
D = D_pos(c_neg) + g·(D_pos(c) − D_pos(c_neg)) + g_ag·(D_pos(c) − D_neg(c)) without knowing g here.

Each prediction has a slot: its index in the cond list handed to ComfyUI's `calc_cond_batch`, which
is also the `cond_or_uncond` value of its rows. Slot 1 is CFG's uncond slot; ComfyUI asks for it only
when CFG needs an uncond (cfg ≠ 1), so a prediction in slot 1 is skipped when there is none.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

COND_SLOT, UNCOND_SLOT, EXTRA_SLOT = 0, 1, 2
PROMPT, NEGATIVE_PROMPT = 0, 1


@dataclass(frozen=True)
class Prediction:
    slot: int
    negative_model: bool  # False: the positive model
    prompt: int           # PROMPT (c) or NEGATIVE_PROMPT (c_neg)


@dataclass(frozen=True)
class GuidanceMode:
    name: str
    predictions: tuple[Prediction, ...]

    def cond_lists(self, cond, uncond) -> tuple[list, list]:
        """The cond lists for the positive and for the negative model, both indexed by slot (None
        where that model computes nothing)."""
        size = 1 + max(p.slot for p in self.predictions)
        lists = {False: [None] * size, True: [None] * size}
        prompts = (cond, uncond)
        for p in self.predictions:
            if p.slot == UNCOND_SLOT and uncond is None:
                continue  # cfg = 1: CFG has no uncond branch
            lists[p.negative_model][p.slot] = prompts[p.prompt]
        return lists[False], lists[True]

    @property
    def uses_uncond_branch(self) -> bool:
        """Whether the negative model acts through CFG's uncond branch (which cfg 1 skips)."""
        return any(p.negative_model and p.slot == UNCOND_SLOT for p in self.predictions)

    def to_cfg(self, out: list, has_uncond: bool) -> list:
        """The (cond, uncond) predictions CFG receives, from the predictions by slot."""
        return [out[COND_SLOT], out[UNCOND_SLOT]]


@dataclass(frozen=True)
class CFGPlusAutoguidance(GuidanceMode):
    scale: float = 1.0

    def to_cfg(self, out: list, has_uncond: bool) -> list:
        shift = self.scale * (out[COND_SLOT] - out[EXTRA_SLOT])
        uncond = out[UNCOND_SLOT] + shift if has_uncond else out[UNCOND_SLOT]
        return [out[COND_SLOT] + shift, uncond]


PLAIN_CFG = GuidanceMode("plain CFG", (Prediction(COND_SLOT, False, PROMPT),
                                       Prediction(UNCOND_SLOT, False, NEGATIVE_PROMPT)))

_MODE_TABLE = {
    "npo": lambda scale: GuidanceMode("npo", (Prediction(COND_SLOT, False, PROMPT),
                                              Prediction(UNCOND_SLOT, True, NEGATIVE_PROMPT))),
    "autoguidance": lambda scale: GuidanceMode("autoguidance", (Prediction(COND_SLOT, False, PROMPT),
                                                                Prediction(UNCOND_SLOT, True, PROMPT))),
    # a zero autoguidance scale is plain CFG: it costs no negative forward
    "cfg+autoguidance": lambda scale: PLAIN_CFG if scale == 0 else CFGPlusAutoguidance(
        "cfg+autoguidance", (Prediction(COND_SLOT, False, PROMPT), Prediction(UNCOND_SLOT, False, NEGATIVE_PROMPT),
                             Prediction(EXTRA_SLOT, True, PROMPT)), scale=scale),
}
MODES = tuple(_MODE_TABLE)


def make_mode(mode: str = "npo", autoguidance_scale: float = 1.0) -> GuidanceMode:
    """The mode object for a mode name; `autoguidance_scale` (g_ag) is used by cfg+autoguidance."""
    if mode not in _MODE_TABLE:
        raise ValueError(f"Self-NPO mode must be one of {MODES}, not {mode!r}")
    if not math.isfinite(autoguidance_scale):
        raise ValueError(f"autoguidance_scale must be a finite number, not {autoguidance_scale!r}")
    return _MODE_TABLE[mode](float(autoguidance_scale))


@dataclass(frozen=True)
class Interval:
    """The part of sampling in which the mode acts, as ComfyUI's start/end percent of the model's noise
    schedule (0 = pure noise, 1 = the end; as ControlNet and conditioning ranges, so with denoise < 1
    sampling starts part-way). Steps outside it are plain CFG on the positive model."""
    start_percent: float = 0.0
    end_percent: float = 1.0

    def __post_init__(self):
        for name in ("start_percent", "end_percent"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and 0.0 <= value <= 1.0):
                raise ValueError(f"{name} must be a number from 0.0 to 1.0, not {value!r}")
        if self.start_percent > self.end_percent:
            raise ValueError(f"start_percent ({self.start_percent}) is after end_percent ({self.end_percent}): "
                             "the interval would contain no step")

    @property
    def whole_run(self) -> bool:
        return self.start_percent <= 0.0 and self.end_percent >= 1.0

    def sigma_bounds(self, model_sampling) -> tuple[float, float]:
        """(highest, lowest) σ inside the interval, converted as ComfyUI converts percents."""
        return model_sampling.percent_to_sigma(self.start_percent), model_sampling.percent_to_sigma(self.end_percent)

    def describe(self) -> str:
        return f"{self.start_percent:g}–{self.end_percent:g}"


def sigma_inside(sigma: torch.Tensor, bounds: tuple[float, float]) -> bool:
    """Whether a step's σ lies in [lowest, highest], both ends included. Compared in the σ tensor's
    own dtype, as ComfyUI compares a conditioning's start/end σ, so a border step is decided alike."""
    high, low = bounds
    s = sigma.flatten()[0]
    return bool((s <= high) & (s >= low))
