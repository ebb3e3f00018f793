"""Errors the trainer raises. Every message is meant for the user: it says what went wrong and what
to do about it. The node and the CLI show `str(error)` as is."""
from __future__ import annotations


class TrainingError(RuntimeError):
    """Base class of every error the trainer raises on purpose."""


class DataError(TrainingError):
    """The training data cannot be used: missing/empty folder, no readable image, no prompts, ..."""


class NonFiniteLoss(TrainingError):
    """The loss became NaN or infinite. The last good checkpoint on disk is kept unchanged."""


class ResumeMismatch(TrainingError):
    """A checkpoint belongs to another base model or was trained with other hyper-parameters."""


class UnsupportedModel(TrainingError):
    """The model kind cannot be trained with TDFT (e.g. no discrete or flow noise schedule)."""


class OutOfMemory(TrainingError):
    """The device ran out of memory in a step; train() saved a resumable checkpoint of the state
    before that step first (`checkpoint_path`)."""
    checkpoint_path = None


class TrainingCancelled(TrainingError):
    """Training stopped on request; a resumable checkpoint was saved first (see `checkpoint_path`)."""

    def __init__(self, message: str, checkpoint_path=None, step: int | None = None):
        super().__init__(message)
        self.checkpoint_path = checkpoint_path
        self.step = step
