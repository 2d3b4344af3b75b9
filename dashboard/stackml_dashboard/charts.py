"""Metric charts as inline SVG, drawn on the server (no JavaScript): one line per metric,
value against epoch (or step, or the point's order when neither is recorded)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from django.utils.html import escape

WIDTH, HEIGHT = 420, 220
LEFT, RIGHT, TOP, BOTTOM = 56, 12, 24, 34


def _fmt(v: float) -> str:
    if v != 0 and (abs(v) >= 1e5 or abs(v) < 1e-3):
        return f"{v:.2e}"
    return f"{v:.4g}"


def series(points: Sequence[Mapping[str, Any]]) -> tuple[str, list[tuple[float, float]]]:
    """(x axis name, [(x, value)]) of one metric's points, in order of x."""
    if points and all(p.get("epoch") is not None for p in points):
        axis, xs = "epoch", [float(p["epoch"]) for p in points]
    elif points and all(p.get("step") is not None for p in points):
        axis, xs = "step", [float(p["step"]) for p in points]
    else:
        axis, xs = "point", [float(i + 1) for i in range(len(points))]
    pairs = [(x, float(p["value"])) for x, p in zip(xs, points, strict=True)]
    pairs = [(x, y) for x, y in pairs if math.isfinite(x) and math.isfinite(y)]
    return axis, sorted(pairs, key=lambda xy: xy[0])


def svg_chart(name: str, points: Sequence[Mapping[str, Any]]) -> str:
    """One metric's chart: an <svg> element (the name escaped; every number formatted here)."""
    axis, pairs = series(points)
    title = escape(name)
    head = (
        f'<svg class="stackml-chart" data-metric="{title}" xmlns="http://www.w3.org/2000/svg" '
        f'width="{WIDTH}" height="{HEIGHT}" viewBox="0 0 {WIDTH} {HEIGHT}" role="img" '
        f'aria-label="{title} by {axis}">'
        f"<title>{title} by {axis}</title>"
        f'<text x="{LEFT}" y="15" font-size="13" font-weight="bold">{title}</text>'
    )
    if not pairs:
        return head + f'<text x="{LEFT}" y="{HEIGHT // 2}">no points</text></svg>'
    x0, x1 = pairs[0][0], pairs[-1][0]
    ys = [y for _, y in pairs]
    y0, y1 = min(ys), max(ys)
    if x1 == x0:
        x0, x1 = x0 - 1, x1 + 1
    if y1 == y0:
        pad = abs(y0) * 0.1 or 1.0
        y0, y1 = y0 - pad, y1 + pad
    pw, ph = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM

    def px(x: float) -> float:
        return LEFT + (x - x0) / (x1 - x0) * pw

    def py(y: float) -> float:
        return TOP + (y1 - y) / (y1 - y0) * ph

    coords = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in pairs)
    dots = "".join(
        f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="2.5" fill="#1f77b4">'
        f"<title>{axis} {_fmt(x)}: {_fmt(y)}</title></circle>"
        for x, y in pairs
    )
    bottom, right = TOP + ph, LEFT + pw
    axes = (
        f'<line x1="{LEFT}" y1="{TOP}" x2="{LEFT}" y2="{bottom}" stroke="#888"/>'
        f'<line x1="{LEFT}" y1="{bottom}" x2="{right}" y2="{bottom}" stroke="#888"/>'
        f'<text x="{LEFT - 4}" y="{TOP + 4}" font-size="10" text-anchor="end">{_fmt(y1)}</text>'
        f'<text x="{LEFT - 4}" y="{bottom}" font-size="10" text-anchor="end">{_fmt(y0)}</text>'
        f'<text x="{LEFT}" y="{bottom + 14}" font-size="10">{_fmt(x0)}</text>'
        f'<text x="{right}" y="{bottom + 14}" font-size="10" text-anchor="end">{_fmt(x1)}</text>'
        f'<text x="{LEFT + pw / 2:.0f}" y="{HEIGHT - 4}" font-size="11" '
        f'text-anchor="middle">{axis}</text>'
    )
    line = f'<polyline fill="none" stroke="#1f77b4" stroke-width="2" points="{coords}"/>'
    return head + axes + line + dots + "</svg>"


def charts(metrics: Mapping[str, Sequence[Mapping[str, Any]]]) -> list[tuple[str, str]]:
    """(name, svg) of each metric, by name."""
    return [(name, svg_chart(name, pts)) for name, pts in sorted(metrics.items())]
