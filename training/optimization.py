"""The optimizer side of a step: AdamW (8-bit when bitsandbytes is there), the learning-rate schedule,
mixed-precision autocast with fp16's gradient scaler, gradient clipping — built once from the config."""
from __future__ import annotations

import math
import warnings

import torch

_AMP_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def lr_factor(config, step: int) -> float:
    """Multiplier of the learning rate at optimizer step `step` (0-based)."""
    warm = config.warmup_steps
    if config.lr_schedule == "constant":
        return 1.0
    if warm and step < warm:
        return (step + 1) / warm
    if config.lr_schedule == "warmup":
        return 1.0
    progress = min(1.0, (step - warm) / max(1, config.steps - warm))  # cosine
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def _adamw(params, config, log):
    kwargs = dict(lr=config.learning_rate, betas=(config.adam_beta1, config.adam_beta2), eps=config.adam_eps,
                  weight_decay=config.weight_decay)
    if config.optimizer == "adamw8bit":
        try:
            import bitsandbytes as bnb

            return bnb.optim.AdamW8bit(params, **kwargs)
        except Exception as e:  # not installed, or no GPU build
            msg = f"8-bit AdamW needs bitsandbytes ({type(e).__name__}: {e}); using plain AdamW"
            warnings.warn(msg)
            log(msg)
    return torch.optim.AdamW(params, **kwargs)


class Optimization:
    def __init__(self, params: list, config, device: torch.device, log=print):
        self.params, self.config, self.device = params, config, device
        self.optimizer = _adamw(params, config, log)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: lr_factor(config, s))
        self.scaler = torch.amp.GradScaler(device.type) if config.mixed_precision == "fp16" else None
        self._amp_dtype = _AMP_DTYPES.get(config.mixed_precision)

    def autocast(self):
        if self._amp_dtype is None:
            return torch.autocast(self.device.type, enabled=False)
        return torch.autocast(self.device.type, dtype=self._amp_dtype)

    def backward(self, loss: torch.Tensor) -> None:
        scaled = loss / self.config.grad_accum
        if self.scaler is not None:
            scaled = self.scaler.scale(scaled)
        scaled.backward()

    def step(self) -> float:
        """Clip, step, advance the schedule; returns the learning rate the step used."""
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        if self.config.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.params, self.config.max_grad_norm)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        lr = self.optimizer.param_groups[0]["lr"]
        self.scheduler.step()
        self.zero_grad()
        return lr

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def state_dict(self) -> dict:
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "scaler": None if self.scaler is None else self.scaler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        """The saved moments, step count and scaler; the learning rate and its schedule are this
        config's (a resume may change them: checkpoint.MAY_CHANGE), at the saved step."""
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler is not None and state["scaler"] is not None:
            self.scaler.load_state_dict(state["scaler"])
        lr = self.config.learning_rate
        self.scheduler.base_lrs = [lr] * len(self.optimizer.param_groups)
        for group in self.optimizer.param_groups:
            group["initial_lr"] = lr
            group["lr"] = lr * lr_factor(self.config, self.scheduler.last_epoch)
