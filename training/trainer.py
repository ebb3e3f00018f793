"""TDFT trainer: owns the student copy, the teacher, the optimizer and the data; the node and the
CLI drive it through `train_step` / `train` / `export`. The per-step math lives in `tdft.py`."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .config import TDFTConfig
from .errors import (DataError, NonFiniteLoss, ResumeMismatch, TrainingCancelled,  # noqa: F401
                     TrainingError, UnsupportedModel)


@dataclass
class StepResult:
    step: int
    loss: float
    lr: float
    teacher_s: float
    student_s: float


@dataclass
class TrainResult:
    steps: int
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0
    peak_memory_bytes: int = 0


def base_model_hash(model) -> str:
    """Stable hash of the base UNet weights (as they are in the ModelPatcher, without patches)."""
    raise NotImplementedError


class TDFTTrainer:
    def __init__(self, model, clip, vae, data, config: TDFTConfig, work_dir: str | Path,
                 device=None, log=None):
        self.config = config
        self.work_dir = Path(work_dir)
        self.step = 0
        raise NotImplementedError("TDFTTrainer is being implemented")

    def train_step(self) -> StepResult:
        raise NotImplementedError

    def train(self, steps=None, on_step=None, should_stop=None) -> TrainResult:
        raise NotImplementedError

    def save_checkpoint(self, path=None) -> Path:
        raise NotImplementedError

    def load_checkpoint(self, path) -> None:
        raise NotImplementedError

    def export(self, path, format=None) -> Path:
        raise NotImplementedError

    def negative_model(self):
        raise NotImplementedError

    def predict_x0(self, x, sigma, cond):
        raise NotImplementedError
