"""The files a training run leaves next to its weights: loss CSV, loss plot PNG, preview PNGs and a
JSON summary. Shared by the training node and `comfy-selfnpo-train`; every write is atomic
(`atomic_files.atomic_write`), so a crash or a full disk never leaves a half-written file behind.
The pictures themselves are drawn in the pack's `images` module.
"""
from __future__ import annotations

import csv
import io
import itertools
from dataclasses import dataclass
from pathlib import Path

from . import checkpoint
from .atomic_files import atomic_write, save_json
from .run_lock import LOCK_NAME

CSV_COLUMNS = ("step", "loss", "lr", "teacher_s", "student_s", "elapsed_s")


@dataclass
class RunPaths:
    """Where one run keeps its files. `run_dir` holds the resumable checkpoint and the logs;
    `weights` is the exported Self-NPO file (for the node: inside the `self_npo` models folder)."""
    run_dir: Path
    weights: Path

    @property
    def checkpoint(self) -> Path:  # the trainer's default resumable checkpoint (a folder)
        return self.run_dir / "checkpoint"

    @property
    def loss_csv(self) -> Path:
        return self.run_dir / "loss.csv"

    @property
    def loss_png(self) -> Path:
        return self.run_dir / "loss.png"

    @property
    def previews(self) -> Path:
        return self.run_dir / "previews"

    @property
    def summary(self) -> Path:
        return self.run_dir / "summary.json"

    def has_checkpoint(self) -> bool:
        return checkpoint.exists(self.checkpoint)

    def step_weights(self, step: int) -> Path:
        """The weights exported at a save step, beside the final file (kohya/ai-toolkit naming)."""
        return self.weights.with_name(f"{self.weights.stem}-step{step:06d}{self.weights.suffix}")

    def step_weight_files(self) -> list[Path]:
        """This run's exported step files, oldest first."""
        pattern = f"{self.weights.stem}-step[0-9][0-9][0-9][0-9][0-9][0-9]{self.weights.suffix}"
        return sorted(self.weights.parent.glob(pattern))

    def set_aside(self, tag: str) -> list[Path]:
        """Start over without losing anything: move the earlier run's files (all but the lock) to the
        folder `<run_dir>-<tag>`, and its weights to `<name>-<tag>….safetensors` beside them (names the
        loader lists and the step-file rotation leaves alone). Returns where things went."""
        tag = self._unused_tag(tag)
        aside = self.run_dir.with_name(f"{self.run_dir.name}-{tag}")
        entries = [e for e in sorted(self.run_dir.iterdir()) if e.name != LOCK_NAME] if self.run_dir.is_dir() else []
        for entry in entries:
            aside.mkdir(parents=True, exist_ok=True)
            entry.rename(aside / entry.name)
        moved = [aside] if entries else []
        for path in [self.weights, *self.step_weight_files()]:
            if path.is_file():
                moved.append(path.with_name(f"{self.weights.stem}-{tag}{path.name[len(self.weights.stem):]}"))
                path.rename(moved[-1])
        return moved

    def _unused_tag(self, tag: str) -> str:
        """`tag`, or `tag-2`, `tag-3`, ... where a folder or weights file of that name exists (never overwrite)."""
        for n in itertools.count(1):
            candidate = tag if n == 1 else f"{tag}-{n}"
            if not (self.run_dir.with_name(f"{self.run_dir.name}-{candidate}").exists()
                    or self.weights.with_name(f"{self.weights.stem}-{candidate}{self.weights.suffix}").exists()):
                return candidate

    def rotate_step_weights(self, keep_last: int) -> list[Path]:
        """Delete all but the newest `keep_last` step files (0 keeps all); returns the deleted ones."""
        files = self.step_weight_files()
        doomed = files[:-keep_last] if keep_last else []
        for path in doomed:
            path.unlink(missing_ok=True)
        return doomed


# ---------------------------------------------------------------- loss log

def write_loss_csv(path, rows: list[dict]) -> Path:
    def write(tmp):
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS, extrasaction="ignore")
            writer.writeheader()
            for row in rows:
                writer.writerow(row)
    return atomic_write(path, write)


def read_loss_csv(path, up_to_step: int | None = None) -> list[dict]:
    """Rows of an earlier (interrupted) run; only steps <= up_to_step are kept, because a resumed run
    redoes every step after its checkpoint."""
    path = Path(path)
    if not path.is_file():
        return []
    rows = []
    try:
        with open(path, newline="", encoding="utf-8") as f:
            for row in csv.DictReader(f):
                parsed = {k: (int(v) if k == "step" else float(v)) for k, v in row.items() if k in CSV_COLUMNS and v != ""}
                if "step" in parsed and (up_to_step is None or parsed["step"] <= up_to_step):
                    rows.append(parsed)
    except (ValueError, csv.Error, UnicodeDecodeError):
        return []  # a damaged log is not worth failing a run for; it is rewritten from here on
    return rows


def image_to_tensor(image):
    """PIL RGB -> ComfyUI IMAGE ([1, H, W, 3] float in [0, 1])."""
    import numpy as np
    import torch

    return torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0)[None]


def save_png(path, image) -> Path:
    def write(tmp):
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        with open(tmp, "wb") as f:
            f.write(buffer.getvalue())
    return atomic_write(path, write)


def save_summary(path, summary: dict) -> Path:
    return save_json(path, summary)
