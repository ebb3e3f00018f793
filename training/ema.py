"""Exponential moving average of the student: the authors' teacher θ⁻ ← d·θ⁻ + (1 − d)·θ."""
from __future__ import annotations

import torch


@torch.no_grad()
def ema_update(target_params, source_params, decay: float) -> None:
    """In place, per tensor: target = decay·target + (1 − decay)·source (source cast to target's
    dtype/device; the EMA is kept in float32 even when the student computes in half precision)."""
    for t, s in zip(target_params, source_params, strict=True):
        t.mul_(decay).add_(s.detach().to(device=t.device, dtype=t.dtype), alpha=1.0 - decay)
