"""Figures of the quality benchmark, drawn with PIL (the pack does not depend on matplotlib).

frontier_figure: three panels over the guidance sweep - precision against recall (the frontier), FD
against g, class accuracy against g - one curve per row, error bars = standard errors over seeds.
sample_figure: a few samples of each method side by side.
"""
from __future__ import annotations

import math

from PIL import Image, ImageDraw, ImageFont

PALETTE = ((31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14),
           (23, 190, 207), (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34))
GREY, BLACK, WHITE = (170, 170, 170), (0, 0, 0), (255, 255, 255)


def font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: one bitmap size
        return ImageFont.load_default()


def nice_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    """Round tick values covering [lo, hi]."""
    span = max(hi - lo, 1e-9)
    raw = span / count
    step = 10 ** math.floor(math.log10(raw))
    step *= min((m for m in (1, 2, 5, 10) if m * step >= raw), default=10)
    first = math.ceil(lo / step) * step
    return [round(first + i * step, 10) for i in range(int((hi - first) / step + 1e-9) + 1)]


class Axes:
    """A data rectangle on a PIL canvas: maps data to pixels and draws series."""

    def __init__(self, draw: ImageDraw.ImageDraw, box, xlim, ylim, title: str, xlabel: str, ylabel: str):
        self.draw, self.box = draw, box
        pad_x = (xlim[1] - xlim[0]) * 0.06 or 0.5
        pad_y = (ylim[1] - ylim[0]) * 0.06 or 0.5
        self.xlim, self.ylim = (xlim[0] - pad_x, xlim[1] + pad_x), (ylim[0] - pad_y, ylim[1] + pad_y)
        left, top, right, bottom = box
        draw.rectangle(box, outline=BLACK)
        small = font(12)
        for t in nice_ticks(*self.xlim):
            x, _ = self.xy(t, self.ylim[0])
            draw.line([(x, bottom), (x, bottom + 4)], fill=BLACK)
            draw.text((x, bottom + 6), f"{t:g}", fill=BLACK, font=small, anchor="mt")
        for t in nice_ticks(*self.ylim):
            _, y = self.xy(self.xlim[0], t)
            draw.line([(left - 4, y), (left, y)], fill=BLACK)
            draw.text((left - 6, y), f"{t:g}", fill=BLACK, font=small, anchor="rm")
        draw.text(((left + right) / 2, top - 8), title, fill=BLACK, font=font(15), anchor="md")
        draw.text(((left + right) / 2, bottom + 24), xlabel, fill=BLACK, font=font(13), anchor="mt")
        draw.text((left - 44, top - 8), ylabel, fill=BLACK, font=font(13), anchor="ld")

    def xy(self, x: float, y: float):
        left, top, right, bottom = self.box
        fx = (x - self.xlim[0]) / (self.xlim[1] - self.xlim[0])
        fy = (y - self.ylim[0]) / (self.ylim[1] - self.ylim[0])
        return left + fx * (right - left), bottom - fy * (bottom - top)

    def series(self, points, color, dashed: bool = False, labels=None):
        """points: [(x, x_err, y, y_err)]; draws error bars, markers and the connecting line."""
        pixels = [self.xy(x, y) for x, _, y, _ in points]
        for (x, xe, y, ye), (px, py) in zip(points, pixels):
            if xe:
                self.draw.line([self.xy(x - xe, y), self.xy(x + xe, y)], fill=color, width=1)
            if ye:
                self.draw.line([self.xy(x, y - ye), self.xy(x, y + ye)], fill=color, width=1)
            self.draw.ellipse([px - 3, py - 3, px + 3, py + 3], fill=color)
        for a, b in zip(pixels, pixels[1:]):
            self._line(a, b, color, dashed)
        for label, (px, py) in zip(labels or [], pixels):
            self.draw.text((px + 5, py - 5), label, fill=color, font=font(11), anchor="ld")

    def hline(self, y: float, label: str):
        """A grey dashed reference line across the panel."""
        a, b = self.xy(self.xlim[0], y), self.xy(self.xlim[1], y)
        self._line(a, b, GREY, dashed=True)
        self.draw.text((a[0] + 4, a[1] - 3), label, fill=(110, 110, 110), font=font(11), anchor="ld")

    def _line(self, a, b, color, dashed: bool):
        if not dashed:
            self.draw.line([a, b], fill=color, width=2)
            return
        length = math.dist(a, b)
        pieces = max(1, int(length / 6))
        for i in range(0, pieces, 2):
            s, e = i / pieces, min(1.0, (i + 1) / pieces)
            self.draw.line([(a[0] + (b[0] - a[0]) * s, a[1] + (b[1] - a[1]) * s),
                            (a[0] + (b[0] - a[0]) * e, a[1] + (b[1] - a[1]) * e)], fill=color, width=2)


def _curves(results):
    """[(name, color, dashed, points)] with the shared unguided point (g = 1) first on each curve."""
    start = dict(results["unguided"], g=1.0)
    out = []
    for i, row in enumerate(results["rows"]):
        interval = "start_percent" in row["options"]
        out.append((row["name"], PALETTE[i % len(PALETTE)], interval, [start] + row["points"]))
    return out


def _limits(values):
    return min(values), max(values)


def frontier_figure(results: dict) -> Image.Image:
    curves = _curves(results)
    panel_w, panel_h, margin = 460, 400, 70
    legend_h = 22 * (len(curves) + 3)
    image = Image.new("RGB", (3 * panel_w + margin, panel_h + 2 * margin + legend_h), WHITE)
    draw = ImageDraw.Draw(image)
    points = [p for _, _, _, ps in curves for p in ps]
    gs = [p["g"] for p in points]
    real = results["references"]["real_train_digits"]

    def box(i):
        left = margin + i * panel_w + 20
        return (left, margin, left + panel_w - 90, margin + panel_h - 40)

    pr = Axes(draw, box(0), _limits([p["recall"][0] for p in points] + [real["recall"]]),
              _limits([p["precision"][0] for p in points] + [real["precision"]]),
              "precision vs recall (up and right is better)", "recall", "precision")
    fd = Axes(draw, box(1), _limits(gs), _limits([p["fd"][0] for p in points] + [real["fd"]]),
              "Frechet distance vs g (lower is better)", "guidance scale g", "FD")
    fd.hline(real["fd"], "real digits")
    acc = Axes(draw, box(2), _limits(gs), _limits([p["accuracy"][0] for p in points]),
               "requested-class accuracy vs g", "guidance scale g", "accuracy")
    rx, ry = pr.xy(real["recall"], real["precision"])
    draw.rectangle([rx - 4, ry - 4, rx + 4, ry + 4], outline=BLACK)
    draw.text((rx + 7, ry), "real digits", fill=BLACK, font=font(11), anchor="lm")
    for index, (name, color, dashed, ps) in enumerate(curves):
        labels = [f"{p['g']:g}" for p in ps] if index == 0 else None
        pr.series([(p["recall"][0], p["recall"][1], p["precision"][0], p["precision"][1]) for p in ps],
                  color, dashed, labels)
        fd.series([(p["g"], 0, p["fd"][0], p["fd"][1]) for p in ps], color, dashed)
        acc.series([(p["g"], 0, p["accuracy"][0], p["accuracy"][1]) for p in ps], color, dashed)
    y = margin + panel_h + 20
    for name, color, dashed, _ in curves:
        draw.line([(margin + 20, y + 7), (margin + 60, y + 7)], fill=color, width=3)
        draw.text((margin + 70, y), name + ("   (dashed: NPO only inside the interval)" if dashed else ""),
                  fill=BLACK, font=font(13))
        y += 22
    budget = results["budget"]
    note = (f"every curve starts at g = 1 (no guidance); the cfg points are labelled with g.  Error bars: "
            f"standard error over {len(budget['seeds'])} seed(s) x {10 * budget['per_class']} samples.")
    draw.text((margin + 20, y + 6), note, fill=(80, 80, 80), font=font(12))
    return image


def sample_figure(rows, scale: int = 4) -> Image.Image:
    """rows: [(label, PIL grey image of digits)] -> one labelled strip per method."""
    label_w = max(280, 8 * max(len(label) for label, _ in rows))
    width = label_w + max(img.width for _, img in rows) + 10
    height = sum(img.height + 8 for _, img in rows) + 8
    canvas = Image.new("RGB", (width, height), WHITE)
    draw = ImageDraw.Draw(canvas)
    y = 8
    for label, img in rows:
        canvas.paste(img.convert("RGB"), (label_w, y))
        draw.text((label_w - 10, y + img.height / 2), label, fill=BLACK, font=font(14), anchor="rm")
        y += img.height + 8
    return canvas
