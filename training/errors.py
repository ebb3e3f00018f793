"""Errors the trainer raises. Every message is meant for the user: it says what went wrong and what
to do about it. The node and the CLI show `str(error)` as is."""
from __future__ import annotations

import sys


class TrainingError(RuntimeError):
    """Base class of every error the trainer raises on purpose."""


class DataError(TrainingError):
    """The training data cannot be used: missing/empty folder, no readable image, no prompts, ..."""


class NonFiniteLoss(TrainingError):
    """The loss became NaN or infinite. The last good checkpoint on disk is kept unchanged."""


class ResumeMismatch(TrainingError):
    """This run differs from the run its checkpoint belongs to (base model, data, settings that must
    stay fixed within a run). The checkpoint is fine and is left as it is. `differences`: one line
    per differing setting with both values; `data_only`: only the data's content changed, which the
    user may accept (CLI --allow-data-change, the node's on_existing_run)."""

    def __init__(self, message: str, differences: tuple = (), data_only: bool = False):
        super().__init__(message)
        self.differences, self.data_only = tuple(differences), data_only


class UnusableCheckpoint(TrainingError):
    """A checkpoint that cannot be resumed at all: missing, damaged, or of another format version."""


class ProcessesDisagree(TrainingError):
    """The processes of one torchrun job were started with different models, data or settings."""


class UnsupportedModel(TrainingError):
    """The model kind cannot be trained with TDFT (e.g. no discrete or flow noise schedule)."""


OOM_HINT = ("Out of memory. Try, in this order: a LoRA preset (lora-8gb/lora-12gb), a smaller "
            "batch_size (raise grad_accum to keep the effective batch), gradient_checkpointing=true, "
            "a lower resolution, mixed_precision=bf16/fp16, or teacher=base (no EMA copy).")


class OutOfMemory(TrainingError):
    """The device ran out of memory. A step that runs out leaves the run as it was before that step;
    `checkpoint_path` is where that state was saved (None when nothing could be saved)."""

    def __init__(self, message: str, step: int = 0, checkpoint_path=None, detail: str = ""):
        super().__init__(message)
        self.step, self.checkpoint_path, self.detail = step, checkpoint_path, detail


def out_of_memory(cause: BaseException, step: int, checkpoint_path=None) -> OutOfMemory:
    """The one out-of-memory error every front end shows: the hint, what was saved, where it happened.
    `step`: steps completed; `checkpoint_path`: where the state before the failed step was saved."""
    if checkpoint_path is not None:
        saved_note = (f"A resumable checkpoint of the state before step {step + 1} was saved to {checkpoint_path}: "
                      "resume it with the same settings where more memory is free, or start a new run with "
                      "smaller ones.")
    else:
        saved_note = "No checkpoint could be saved now; the last periodic checkpoint (if any) is kept."
    detail = getattr(cause, "detail", "") or (str(cause).splitlines()[0] if str(cause) else type(cause).__name__)
    message = " ".join(part for part in (OOM_HINT, saved_note, f"(step {step + 1}: {detail})") if part)
    return OutOfMemory(message, step=step, checkpoint_path=checkpoint_path, detail=detail)


class TrainingCancelled(TrainingError):
    """Training stopped on request; a resumable checkpoint was saved first (see `checkpoint_path`)."""

    def __init__(self, message: str, checkpoint_path=None, step: int | None = None):
        super().__init__(message)
        self.checkpoint_path = checkpoint_path
        self.step = step


class _NeverRaised(Exception):
    pass


def comfy_interrupt() -> type:
    """ComfyUI's cancel: `comfy.model_management.InterruptProcessingException`, which core raises
    inside any layer's forward (comfy/ops.py) once the user pressed cancel — mid-step, anywhere in a
    teacher or student pass. Where ComfyUI is not loaded, a class nothing raises."""
    mm = sys.modules.get("comfy.model_management")
    return getattr(mm, "InterruptProcessingException", _NeverRaised)
