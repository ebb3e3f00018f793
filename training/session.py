"""One training run, shared by the training node and `comfy-selfnpo-train`.

Both front ends do the same things around `TDFTTrainer`: check that the output can be written before
spending any compute, resume (or refuse to) from the run's checkpoint, keep the loss log and plot,
render previews, export the weights, write a JSON summary, and turn a cancel, an out-of-memory error
or a full disk into a clear message with a resumable checkpoint left behind. They differ only in how
they report progress and where files go, which they pass in (`RunPaths`, callbacks).
"""
from __future__ import annotations

import errno
import logging
import os
import re
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from . import run_files
from .errors import NonFiniteLoss, OutOfMemory, TrainingCancelled, TrainingError
from .run_files import RunPaths

log = logging.getLogger("comfy_selfnpo.training")

OOM_HINT = ("Out of memory. Try, in this order: a LoRA preset (lora-8gb/lora-12gb), a smaller "
            "batch_size (raise grad_accum to keep the effective batch), gradient_checkpointing=true, "
            "a lower resolution, mixed_precision=bf16/fp16, or teacher=base (no EMA copy).")


class OutputError(TrainingError):
    """The output location cannot be written (missing permission, disk full, bad name)."""


class TrainingOutOfMemory(TrainingError):
    """Training ran out of (GPU) memory; what could be saved was saved, the message says how to fit."""


_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._ -]*$")


def check_run_name(name: str) -> str:
    """A run/output name: one file name without folders (so nothing is written outside the output
    folder), without the extension."""
    name = (name or "").strip()
    if name.endswith(".safetensors"):
        name = name[: -len(".safetensors")]
    if not _SAFE_NAME.match(name) or ".." in name:
        raise OutputError(f"output name {name!r} is not usable: use letters, digits, '.', '_', '-' or "
                          "spaces, no folders")
    return name


def check_writable(folder: Path) -> None:
    """Fail before training, not after an hour, when the output folder cannot be written."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-test-", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise OutputError(f"cannot write to the output folder {str(folder)!r}: {e.strerror or e}. "
                          "Choose a folder you can write to (or fix its permissions).") from e


def describe_os_error(e: OSError, what: str) -> str:
    if e.errno == errno.ENOSPC:
        return (f"the disk is full while writing {what}; the previous checkpoint and weights were left "
                "as they were. Free some space and resume.")
    return f"could not write {what}: {e}. The previous checkpoint and weights were left as they were."


@dataclass
class Progress:
    step: int
    total: int
    loss: float
    lr: float
    elapsed_s: float


@dataclass
class SessionOptions:
    resume: bool = True             # continue from paths.checkpoint when it exists
    require_resume: bool = False    # refuse to start when there is no checkpoint (CLI --resume)
    refuse_existing: bool = False   # refuse when a checkpoint exists and resume is False
    preview_every: int = 0
    preview_prompt: str = ""
    preview_seed: int = 0
    preview_settings: object = None  # previews.PreviewSettings
    on_step: Callable[[Progress], None] | None = None
    on_preview: Callable[[object, int], None] | None = None  # (PIL side-by-side image, step)
    should_stop: Callable[[], bool] | None = None
    extra_summary: dict = field(default_factory=dict)


@dataclass
class SessionResult:
    trainer: object
    weights: Path
    steps: int
    seconds: float
    loss_rows: list
    summary: dict
    loss_image: object  # PIL


class TrainingSession:
    def __init__(self, model, clip, vae, data, config, paths: RunPaths, options: SessionOptions | None = None,
                 device=None):
        self.model, self.clip, self.vae, self.data = model, clip, vae, data
        self.config, self.paths = config, paths
        self.options = options or SessionOptions()
        self.device = device
        self.trainer = None
        self.rows: list[dict] = []
        self.started = time.perf_counter()
        self.resumed_from = None

    # ------------------------------------------------------------ setup

    def prepare(self):
        from .trainer import TDFTTrainer

        opts, paths = self.options, self.paths
        check_writable(paths.run_dir)
        check_writable(paths.weights.parent)
        exists = paths.has_checkpoint()
        if opts.require_resume and not exists:
            raise TrainingError(f"--resume: there is no checkpoint to resume from at {str(paths.checkpoint)!r}")
        if exists and not opts.resume and opts.refuse_existing:
            raise OutputError(f"{str(paths.run_dir)!r} already holds a training checkpoint; pass --resume to "
                              "continue it, or choose another output folder/name (nothing was overwritten)")
        self.trainer = TDFTTrainer(self.model, self.clip, self.vae, self.data, self.config, paths.run_dir,
                                   device=self.device, log=log.info)
        if exists and opts.resume:
            self.trainer.load_checkpoint(paths.checkpoint)  # ResumeMismatch says what differs
            self.resumed_from = self.trainer.step
            self.rows = run_files.read_loss_csv(paths.loss_csv, up_to_step=self.trainer.step)
            log.info("resuming %s at step %d of %d", paths.run_dir, self.trainer.step, self.config.steps)
        return self.trainer

    # ------------------------------------------------------------ run

    def _on_step(self, result):
        elapsed = time.perf_counter() - self.started
        self.rows.append({"step": result.step, "loss": result.loss, "lr": result.lr,
                          "teacher_s": result.teacher_s, "student_s": result.student_s, "elapsed_s": elapsed})
        save_every = self.config.save_every
        if save_every and result.step % save_every == 0:
            self._write_logs()
        if self.options.on_step is not None:
            self.options.on_step(Progress(result.step, self.config.steps, result.loss, result.lr, elapsed))
        every = self.options.preview_every
        if every and (result.step % every == 0 or result.step == self.config.steps):
            try:
                self.preview(result.step)
            except torch.OutOfMemoryError:
                raise
            except Exception as e:  # a preview is a convenience: it never ends a training run
                log.warning("preview at step %d failed (%s: %s); training goes on", result.step, type(e).__name__, e)

    def preview(self, step: int):
        from .previews import PreviewSettings, sample_cfg_and_npo, side_by_side

        prompt = self.options.preview_prompt or (self.data.captions[0] if len(self.data) else "")
        settings = self.options.preview_settings or PreviewSettings(size=self.config.resolution)
        cfg_image, npo_image = sample_cfg_and_npo(self.model, self.trainer.negative_model(), self.clip, self.vae,
                                                  prompt, self.options.preview_seed, settings)
        image = side_by_side(cfg_image, npo_image)
        run_files.save_png(self.paths.previews / f"step_{step:06d}.png", image)
        if self.options.on_preview is not None:
            self.options.on_preview(image, step)
        return image

    def _write_logs(self):
        run_files.write_loss_csv(self.paths.loss_csv, self.rows)
        image = run_files.loss_plot([r["step"] for r in self.rows], [r["loss"] for r in self.rows])
        run_files.save_png(self.paths.loss_png, image)
        return image

    def _summary(self, status: str, message: str = "", result=None) -> dict:
        trainer = self.trainer
        peak = getattr(result, "peak_memory_bytes", None)
        if peak is None:
            from .trainer import _peak_memory
            peak = _peak_memory(trainer.device) if trainer is not None else 0
        summary = {
            "status": status,
            "message": message,
            "step": trainer.step if trainer is not None else 0,
            "steps": self.config.steps,
            "resumed_from_step": self.resumed_from,
            "seconds": round(time.perf_counter() - self.started, 3),
            "peak_memory_bytes": int(peak),
            "device": str(trainer.device) if trainer is not None else None,
            "base_model_hash": getattr(trainer, "base_hash", None),
            "final_loss": self.rows[-1]["loss"] if self.rows else None,
            "config": self.config.to_dict(),
            "paths": {
                "weights": str(self.paths.weights) if status == "finished" else None,
                "checkpoint": str(self.paths.checkpoint) if self.paths.has_checkpoint() else None,
                "loss_csv": str(self.paths.loss_csv),
                "loss_png": str(self.paths.loss_png),
                "previews": sorted(str(p) for p in self.paths.previews.glob("*.png")) if self.paths.previews.is_dir() else [],
            },
            **self.options.extra_summary,
        }
        return summary

    def _finish_failed(self, status: str, message: str):
        """Best effort: logs and summary of a run that stopped early; never hides the real error."""
        try:
            self._write_logs()
            run_files.save_summary(self.paths.summary, self._summary(status, message))
        except OSError as e:
            log.warning("could not write the run logs: %s", e)

    def run(self) -> SessionResult:
        if self.trainer is None:
            self.prepare()
        trainer = self.trainer
        try:
            result = trainer.train(on_step=self._on_step, should_stop=self.options.should_stop)
            weights = trainer.export(self.paths.weights)
            if not self.config.save_every or trainer.step % self.config.save_every:
                trainer.save_checkpoint()  # a finished run stays resumable with more steps
        except TrainingCancelled as e:
            self._finish_failed("cancelled", str(e))
            raise
        except (torch.OutOfMemoryError, OutOfMemory) as e:
            # OutOfMemory: the trainer caught it inside a step and already saved the pre-step state;
            # a bare torch error comes from elsewhere (optimizer, export, preview): save here.
            if isinstance(e, OutOfMemory) and e.checkpoint_path is not None:
                saved = (f"A resumable checkpoint was saved to {e.checkpoint_path}: resume it with the same "
                         "settings where more memory is free, or start a new run with smaller ones.")
            else:
                saved = self._save_after_oom()
            message = f"{OOM_HINT} {saved} (step {trainer.step}; {str(e).splitlines()[0] if str(e) else ''})"
            self._finish_failed("out_of_memory", message)
            raise TrainingOutOfMemory(message) from e
        except NonFiniteLoss as e:
            self._finish_failed("non_finite_loss", str(e))
            raise
        except OSError as e:
            message = describe_os_error(e, "the checkpoint or the weights")
            self._finish_failed("write_failed", message)
            raise OutputError(message) from e
        except KeyboardInterrupt:
            self._finish_failed("cancelled", "interrupted")
            raise
        loss_image = self._write_logs()
        summary = self._summary("finished", result=result)
        summary["paths"]["weights"] = str(weights)
        run_files.save_summary(self.paths.summary, summary)
        return SessionResult(trainer, Path(weights), trainer.step, summary["seconds"], self.rows, summary, loss_image)

    def _save_after_oom(self) -> str:
        import comfy.model_management

        comfy.model_management.soft_empty_cache()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        try:
            path = self.trainer.save_checkpoint()
            return (f"A resumable checkpoint was saved to {path}: resume it with the same settings where more "
                    "memory is free, or start a new run with smaller ones.")
        except Exception as e:  # memory may still be too tight to gather the state
            return f"No checkpoint could be saved ({type(e).__name__}); the last periodic one is kept."
