"""The files a training run leaves next to its weights: loss CSV, loss plot PNG, preview PNGs and a
JSON summary. Shared by the training node and `comfy-selfnpo-train`; every write is atomic
(`atomic_files.atomic_write`), so a crash or a full disk never leaves a half-written file behind.

The plot is drawn with PIL (no matplotlib: the pack's dependencies stay torch + ComfyUI's own).
"""
from __future__ import annotations

import csv
import io
import itertools
import math
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


# ---------------------------------------------------------------- loss plot

def _font():
    from PIL import ImageFont

    return ImageFont.load_default()


def _fmt(value: float) -> str:
    return f"{value:.3g}" if value != 0 and (abs(value) >= 1e-3 and abs(value) < 1e4) else f"{value:.2e}"


def loss_trend(values: list[float], window: int | None = None) -> list[float]:
    """The trend of a noisy loss: a centred rolling median (window ≈ a tenth of the run, 5 to 51 steps,
    shortened at the ends). A median ignores single outliers — the large first steps of a run do not
    drag the start of the curve the way an exponential average seeded with them does."""
    import statistics

    n = len(values)
    window = window or max(5, min(51, n // 10 | 1))
    half = window // 2
    return [statistics.median(values[max(0, i - half): i + half + 1]) for i in range(n)]


def loss_plot(steps: list[int], losses: list[float], width: int = 640, height: int = 360,
              title: str = "TDFT loss"):
    """A PIL line chart of loss against step, with its trend (`loss_trend`: what users read, since
    single TDFT losses are noisy), min/max labels and the step range."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    font = _font()
    left, right, top, bottom = 64, width - 16, 28, height - 36
    draw.text((left, 8), title, fill=(0, 0, 0), font=font)
    draw.rectangle([left, top, right, bottom], outline=(0, 0, 0))
    points = [(s, v) for s, v in zip(steps, losses) if math.isfinite(v)]
    if not points:
        draw.text((left + 10, (top + bottom) // 2), "no loss recorded yet", fill=(120, 120, 120), font=font)
        return image
    s_min, s_max = points[0][0], points[-1][0]
    v_min, v_max = min(v for _, v in points), max(v for _, v in points)
    if v_max == v_min:
        v_min, v_max = v_min - 0.5 * abs(v_min or 1), v_max + 0.5 * abs(v_max or 1)
    span_s = max(s_max - s_min, 1)

    def xy(s, v):
        x = left + (s - s_min) / span_s * (right - left)
        y = bottom - (v - v_min) / (v_max - v_min) * (bottom - top)
        return (x, y)

    for frac in (0.25, 0.5, 0.75):  # light grid
        y = top + frac * (bottom - top)
        draw.line([(left, y), (right, y)], fill=(230, 230, 230))
    raw = [xy(s, v) for s, v in points]
    if len(raw) == 1:
        x, y = raw[0]
        draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill=(70, 130, 220))
    else:
        draw.line(raw, fill=(150, 185, 235), width=1)
        trend = loss_trend([v for _, v in points])
        draw.line([xy(s, v) for (s, _), v in zip(points, trend)], fill=(20, 60, 160), width=2)
    draw.text((4, top - 4), _fmt(v_max), fill=(0, 0, 0), font=font)
    draw.text((4, bottom - 8), _fmt(v_min), fill=(0, 0, 0), font=font)
    draw.text((left, bottom + 6), f"step {s_min}", fill=(0, 0, 0), font=font)
    label = f"step {s_max}"
    draw.text((right - 6 * len(label), bottom + 6), label, fill=(0, 0, 0), font=font)
    draw.text((left, bottom + 20), f"last loss {_fmt(points[-1][1])} (dark: rolling median)",
              fill=(80, 80, 80), font=font)
    return image


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


# ---------------------------------------------------------------- image grids

GRID_HEADER, GRID_SIDE, GRID_PAD = 18, 110, 4


def grid_cell_box(row: int, col: int, cell_w: int, cell_h: int, row_labels: bool) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of one cell of `labelled_grid` (cell sizes after scaling)."""
    left = (GRID_SIDE if row_labels else 0) + GRID_PAD + col * (cell_w + GRID_PAD)
    top = GRID_HEADER + GRID_PAD + row * (cell_h + GRID_PAD)
    return left, top, left + cell_w, top + cell_h


def labelled_grid(rows: list[list], column_labels: list[str], row_labels: list[str] | None = None,
                  scale: int = 1):
    """Tile PIL images into a grid with a header row (e.g. "CFG" | "NPO-CFG"). Tiny models make
    64x64 images; `scale` enlarges them (nearest neighbour keeps pixels honest)."""
    from PIL import Image, ImageDraw

    cell_w = max(im.width for row in rows for im in row) * scale
    cell_h = max(im.height for row in rows for im in row) * scale
    header, side, pad = GRID_HEADER, (GRID_SIDE if row_labels else 0), GRID_PAD
    ncols = max(len(row) for row in rows)
    grid = Image.new("RGB", (side + ncols * (cell_w + pad) + pad, header + len(rows) * (cell_h + pad) + pad),
                     (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    font = _font()
    for c, label in enumerate(column_labels):
        draw.text((side + pad + c * (cell_w + pad), 4), label, fill=(0, 0, 0), font=font)
    for r, row in enumerate(rows):
        y = grid_cell_box(r, 0, cell_w, cell_h, bool(row_labels))[1]
        if row_labels:
            draw.text((4, y + cell_h // 2 - 6), row_labels[r][:18], fill=(0, 0, 0), font=font)
        for c, im in enumerate(row):
            im = im.convert("RGB")
            if scale != 1:
                im = im.resize((im.width * scale, im.height * scale), Image.Resampling.NEAREST)
            grid.paste(im, grid_cell_box(r, c, cell_w, cell_h, bool(row_labels))[:2])
    return grid
