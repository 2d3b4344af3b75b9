"""Metric curves in the terminal: Unicode braille (each character a 2x4 grid of dots, so a
60x10 chart has 120x40 points), with the value range on the left and the x range below.
Pure functions of the points: what `stackml jobs metrics --plot` prints."""

from __future__ import annotations

import math
from collections.abc import Sequence

BRAILLE = 0x2800
# the bit of each dot of a braille cell, by (column, row) inside the cell
DOT_BITS = ((0x01, 0x02, 0x04, 0x40), (0x08, 0x10, 0x20, 0x80))
Point = tuple[float, float]


def braille_canvas(points: Sequence[Point], width: int, height: int) -> list[str]:
    """`height` lines of `width` braille characters drawing `points` (x, y) joined by straight
    segments, the x range across the width and the y range up the height (larger y higher)."""
    if width < 1 or height < 1:
        raise ValueError("a chart is at least 1x1 characters")
    pts = [(float(x), float(y)) for x, y in points if math.isfinite(x) and math.isfinite(y)]
    cells = [[0] * width for _ in range(height)]
    if not pts:
        return ["".join(chr(BRAILLE) for _ in row) for row in cells]
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    x0, x1 = _span(min(xs), max(xs))
    y0, y1 = _span(min(ys), max(ys))
    px_w, px_h = width * 2, height * 4

    def to_px(x: float, y: float) -> tuple[int, int]:
        col = round((x - x0) / (x1 - x0) * (px_w - 1))
        row = round((y1 - y) / (y1 - y0) * (px_h - 1))  # row 0 is the top
        return col, row

    def dot(col: int, row: int) -> None:
        cells[row // 4][col // 2] |= DOT_BITS[col % 2][row % 4]

    prev = to_px(*pts[0])
    dot(*prev)
    for x, y in pts[1:]:
        cur = to_px(x, y)
        steps = max(abs(cur[0] - prev[0]), abs(cur[1] - prev[1]))
        for i in range(1, steps + 1):  # every pixel of the segment, both ends included
            dot(
                prev[0] + round((cur[0] - prev[0]) * i / steps),
                prev[1] + round((cur[1] - prev[1]) * i / steps),
            )
        prev = cur
    return ["".join(chr(BRAILLE + bits) for bits in row) for row in cells]


def chart(
    title: str, points: Sequence[Point], *, width: int = 60, height: int = 8, x_name: str = ""
) -> list[str]:
    """A titled chart: the canvas with the y range on its left edge and the x range below."""
    canvas = braille_canvas(points, width, height)
    finite = [(x, y) for x, y in points if math.isfinite(x) and math.isfinite(y)]
    if not finite:
        return [f"{title}: no points"]
    ys = [y for _, y in finite]
    xs = [x for x, _ in finite]
    top, bottom = _fmt(max(ys)), _fmt(min(ys))
    pad = max(len(top), len(bottom))
    lines = [f"{title} (last {_fmt(ys[-1])}, min {bottom}, max {top})"]
    for i, row in enumerate(canvas):
        label = top if i == 0 else bottom if i == len(canvas) - 1 else ""
        lines.append(f"{label:>{pad}} ┤{row}")
    left, right = _fmt(min(xs)), _fmt(max(xs))
    axis = f"{' ' * pad}  {left}"
    tail = f"{right} {x_name}".rstrip()
    lines.append(axis + " " * max(1, width - len(left) - len(right)) + tail)
    return lines


def _span(lo: float, hi: float) -> tuple[float, float]:
    """A non-empty range: a constant series is drawn across the middle."""
    if hi > lo:
        return lo, hi
    delta = abs(lo) * 0.5 or 1.0
    return lo - delta, hi + delta


def _fmt(value: float) -> str:
    return f"{value:.4g}"


def metric_charts(
    series: dict[str, list[dict[str, object]]], *, width: int = 60, height: int = 8
) -> list[list[str]]:
    """One chart per metric of GET /v1/jobs/{id}/metrics: x is the epoch when the points have
    one, else the step, else the point's position."""
    out = []
    for name, points in series.items():
        axis = "epoch" if any(p.get("epoch") is not None for p in points) else ""
        if not axis and any(p.get("step") is not None for p in points):
            axis = "step"
        xy: list[Point] = []
        for i, p in enumerate(points):
            value, pos = p.get("value"), p.get(axis) if axis else i + 1
            if isinstance(value, int | float) and isinstance(pos, int | float):
                xy.append((float(pos), float(value)))
        out.append(chart(name, xy, width=width, height=height, x_name=axis))
    return out
