"""One training run, shared by the training node and `comfy-selfnpo-train`.

Both front ends do the same things around `TDFTTrainer`: check that the output can be written before
spending any compute, resume (or refuse to) from the run's checkpoint, keep the loss log and plot,
render previews, export the weights, write a JSON summary, and turn a cancel, an out-of-memory error
or a full disk into a clear message with a resumable checkpoint left behind. They differ only in how
they report progress and where files go, which they pass in (`RunPaths`, callbacks).

With several processes (torchrun) every process runs the session; only the main one writes files
(`world.main_only`): logs, previews, exports, summary.
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

from ..images import loss_plot
from . import run_files
from .distributed import LocalWorld
from .errors import NonFiniteLoss, OutOfMemory, TrainingCancelled, TrainingError, comfy_interrupt, out_of_memory
from .run_files import RunPaths
from .run_lock import FolderInUse, RunLock
from .signals import signals_deferred

log = logging.getLogger("comfy_selfnpo.training")


class OutputError(TrainingError):
    """The output location cannot be written (missing permission, disk full, bad name)."""


class RunExists(TrainingError):
    """The output folder holds the checkpoint of an earlier run, and this run was asked neither to
    resume it nor to start over."""


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


def describe_os_error(e: OSError, what: str, kept: str = "the previous checkpoint and weights were left "
                      "as they were") -> str:
    """A write failure for the user: what could not be written, why, and what is kept."""
    target = e.filename or what
    if e.errno == errno.ENOSPC:
        return f"the disk is full while writing {target}; {kept}. Free some space and resume."
    return f"could not write {target}: {e.strerror or e}; {kept}."


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
    start_over: bool = False        # move an earlier run's files aside (`RunPaths.set_aside`) and start anew
    preview_every: int = 0
    preview_prompt: str = ""
    preview_seed: int = 0
    preview_settings: object = None  # previews.PreviewSettings
    sample_prompts: list | None = None  # previews.SamplePrompt rows; default: the preview prompt and seed
    observers: list = field(default_factory=list)  # extra loggers: .step(Progress), .preview(image, step)
    on_step: Callable[[Progress], None] | None = None
    on_preview: Callable[[object, int], None] | None = None  # (PIL side-by-side image, step)
    should_stop: Callable[[], bool] | None = None
    on_prepare: Callable[[int, int], None] | None = None  # (done, total) of the one-time data preparation
    allow_data_change: bool = False  # resume although the data's content differs from the checkpoint's
    model_name: str = ""  # the base model's file name, recorded in the exported files' metadata
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
                 device=None, world=None):
        from .recipes import resolve_for_model

        self.model, self.clip, self.vae, self.data = model, clip, vae, data
        self.config, self.paths = resolve_for_model(config, model), paths  # the model family's recipe where "auto"
        self.options = options or SessionOptions()
        self.device = device
        self.world = world or LocalWorld()
        self.trainer = None
        self.rows: list[dict] = []
        self.started = time.perf_counter()
        self.resumed_from = None
        self.resume_changes: list[str] = []  # what a resume changed that may change (checkpoint.MAY_CHANGE)
        self.lock = RunLock(paths.run_dir)

    # ------------------------------------------------------------ setup

    def prepare(self):
        """Lock the run folder, check the outputs, build the trainer, resume. On failure nothing stays
        locked; after success, `run()` (or `close()`) releases the folder."""
        try:
            return self._prepare()
        except BaseException:
            self.close()
            raise

    def _prepare(self):
        from .trainer import TDFTTrainer

        opts, paths = self.options, self.paths
        self.world.check_same_job(self._job_facts)  # before anything that would wait for a differing peer
        exists = self.world.from_main(self._claim_output)  # the main process's files decide for all
        if opts.require_resume and not exists:
            raise TrainingError(f"--resume: there is no checkpoint to resume from at {str(paths.checkpoint)!r}")
        if exists and not opts.resume and opts.refuse_existing:
            raise RunExists(f"{str(paths.run_dir)!r} already holds a training checkpoint; pass --resume to "
                            "continue it, or choose another output folder/name to start over (nothing was "
                            "overwritten)")
        self.trainer = TDFTTrainer(self.model, self.clip, self.vae, self.data, self.config, paths.run_dir,
                                   device=self.device, log=log.info, world=self.world)
        self.trainer.model_name = opts.model_name
        if exists and opts.resume:
            # ResumeMismatch names what differs; UnusableCheckpoint says how to start over
            self.resume_changes = self.trainer.load_checkpoint(paths.checkpoint,
                                                               allow_data_change=opts.allow_data_change)
            for change in self.resume_changes:
                log.warning("resuming with a changed setting: %s", change)
            self.resumed_from = self.trainer.step
            self.rows = run_files.read_loss_csv(paths.loss_csv, up_to_step=self.trainer.step)
            log.info("resuming %s at step %d of %d", paths.run_dir, self.trainer.step, self.config.steps)
        return self.trainer

    def _job_facts(self) -> dict:
        """What every process of a torchrun job must share: the base model, the data, the settings."""
        from .identity import model_identity

        return {"base model (weights hash)": model_identity(self.model),
                "data (content fingerprint)": f"{type(self.data).__name__} {self.data.fingerprint()}",
                **self.config.to_dict(), "resume": self.options.resume,
                "allow_data_change": self.options.allow_data_change}

    def _claim_output(self) -> bool:
        """Lock the run folder and check the outputs can be written; returns whether it holds a checkpoint."""
        if self.data.overlaps(self.paths.run_dir):
            raise OutputError(f"the output folder {str(self.paths.run_dir)!r} is inside the training data "
                              "folder: its previews and loss plot would become training images in the next "
                              "run. Choose an output folder outside the data folder.")
        check_writable(self.paths.run_dir)
        check_writable(self.paths.weights.parent)
        try:
            self.lock.acquire()
        except FolderInUse as e:
            raise OutputError(f"{e}; wait for it to finish or choose another output folder/name "
                              "(nothing was changed)") from None
        if self.options.start_over:
            moved = self.paths.set_aside(time.strftime("old-%Y%m%d-%H%M%S"))
            if moved:
                log.warning("starting over: the earlier run's files were moved to %s", ", ".join(map(str, moved)))
        return self.paths.has_checkpoint()

    def close(self) -> None:
        """Release the run folder for the next run; close the loggers."""
        self.lock.release()
        for observer in self.options.observers:
            getattr(observer, "close", lambda: None)()

    # ------------------------------------------------------------ run

    def _on_step(self, result):
        elapsed = time.perf_counter() - self.started
        self.rows.append({"step": result.step, "loss": result.loss, "lr": result.lr,
                          "teacher_s": result.teacher_s, "student_s": result.student_s, "elapsed_s": elapsed})
        progress = Progress(result.step, self.config.steps, result.loss, result.lr, elapsed)
        for report in [self.options.on_step] + [getattr(o, "step", None) for o in self.options.observers]:
            if report is not None:
                report(progress)
        every = self.options.preview_every
        if every and (result.step % every == 0 or result.step == self.config.steps):
            try:
                self.world.main_only(lambda: self.preview(result.step))
            except (torch.OutOfMemoryError, comfy_interrupt()):  # a cancel in ComfyUI stops the run, as asked
                raise
            except Exception as e:  # a preview is a convenience: it never ends a training run
                log.warning("preview at step %d failed (%s: %s); training goes on", result.step, type(e).__name__, e)

    def preview(self, step: int):
        from .previews import PreviewSettings, SamplePrompt, preview_grid

        opts = self.options
        prompts = opts.sample_prompts or [SamplePrompt(opts.preview_prompt or (self.data.captions[0] if len(self.data)
                                                                                else ""), opts.preview_seed)]
        settings = opts.preview_settings or PreviewSettings(size=self.config.resolution)
        image = preview_grid(self.model, self.trainer.negative_model(), self.clip, self.vae, prompts, settings)
        run_files.save_png(self.paths.previews / f"step_{step:06d}.png", image)
        for report in [opts.on_preview] + [getattr(o, "preview", None) for o in opts.observers]:
            if report is not None:
                report(image, step)
        return image

    def _on_save(self, step: int, folder) -> None:
        """A periodic save: beside the checkpoint, the weights of this step (usable at once) and the logs."""
        def write():
            self.trainer.export(self.paths.step_weights(step))
            self.paths.rotate_step_weights(self.config.keep_last)
            self._write_logs()
        self.world.main_only(write)

    def _write_logs(self):
        run_files.write_loss_csv(self.paths.loss_csv, self.rows)
        image = loss_plot([r["step"] for r in self.rows], [r["loss"] for r in self.rows])
        run_files.save_png(self.paths.loss_png, image)
        return image

    def _summary(self, status: str, message: str = "", result=None) -> dict:
        trainer = self.trainer
        peak = getattr(result, "peak_memory_bytes", None)
        if peak is None:
            from .trainer import peak_memory
            peak = peak_memory(trainer.device) if trainer is not None else 0
        summary = {
            "status": status,
            "message": message,
            "step": trainer.step if trainer is not None else 0,
            "steps": self.config.steps,
            "resumed_from_step": self.resumed_from,
            "resume_changes": self.resume_changes,
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
        def write():
            self._write_logs()
            run_files.save_summary(self.paths.summary, self._summary(status, message))
        try:
            with signals_deferred():  # the summary must agree with the checkpoint it describes
                self.world.main_only(write)
        except OSError as e:
            log.warning("could not write the run logs: %s", e)

    def run(self) -> SessionResult:
        if self.trainer is None:
            self.prepare()
        try:
            result = self._train()
        except TrainingCancelled as e:
            self._finish_failed("cancelled", str(e))
            raise
        except (torch.OutOfMemoryError, OutOfMemory) as e:
            # from a step, the trainer has saved the state before it; a bare torch error comes from
            # elsewhere (optimizer, export, preview): save here
            path = getattr(e, "checkpoint_path", None) or self._save_after_oom()
            error = out_of_memory(e, self.trainer.step, checkpoint_path=path)
            self._finish_failed("out_of_memory", str(error))
            raise error from e
        except NonFiniteLoss as e:
            self._finish_failed("non_finite_loss", str(e))
            raise
        except OSError as e:
            message = describe_os_error(e, "the checkpoint or the weights", self._kept())
            self._finish_failed("write_failed", message)
            raise OutputError(message) from e
        except KeyboardInterrupt:
            self._finish_failed("cancelled", "interrupted")
            raise
        finally:
            self.close()
        return self._finish(result)

    def _kept(self) -> str:
        saved = getattr(self.trainer, "saved_step", None)
        if saved is None:
            return "no checkpoint of this run had been saved yet"
        return (f"the resumable checkpoint of step {saved} in {str(self.paths.checkpoint)!r} is intact "
                "and the run can resume from it")

    def _train(self):
        trainer = self.trainer
        result = trainer.train(on_step=self._on_step, should_stop=self.options.should_stop, on_save=self._on_save,
                               on_prepare=self.options.on_prepare)
        if trainer.saved_step != trainer.step:
            trainer.save_checkpoint()  # first: a finished run stays resumable, even if the export fails
        self.world.main_only(lambda: trainer.export(self.paths.weights))
        return result

    def _finish(self, result) -> SessionResult:
        def write():
            image = self._write_logs()
            summary = self._summary("finished", result=result)
            summary["paths"]["weights"] = str(self.paths.weights)
            run_files.save_summary(self.paths.summary, summary)
            return image, summary
        loss_image, summary = self.world.main_only(write) or (None, {})
        return SessionResult(self.trainer, self.paths.weights, self.trainer.step,
                             round(time.perf_counter() - self.started, 3), self.rows, summary, loss_image)

    def _save_after_oom(self):
        """The checkpoint folder, or None when memory is too tight to gather the state."""
        import comfy.model_management

        comfy.model_management.soft_empty_cache()
        try:
            return self.trainer.save_checkpoint()
        except Exception as e:
            log.warning("no checkpoint could be saved after running out of memory (%s)", type(e).__name__)
            return None
