"""Pictures the pack draws with PIL (no matplotlib: the dependencies stay torch + ComfyUI's own): the
loss curve and labelled image grids (CFG | NPO-CFG previews, the digits demo). Below both training/ and
digits/, which use them; nothing here knows about either."""
from __future__ import annotations

import math


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
