"""The metric-line protocol: a trainer prints one JSON object per line on stdout.

A metric line is a line whose JSON object has the key ``"stackml_metric"`` set to 1
(the protocol version); every other numeric key is a metric, and the optional
``"step"`` (int) and ``"epoch"`` (int) say where in training it was measured::

    {"stackml_metric": 1, "epoch": 2, "loss": 0.31, "accuracy": 0.91}

Anything else on stdout is ordinary log output.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

MARKER = "stackml_metric"
_POSITION_KEYS = ("step", "epoch")


@dataclass(frozen=True)
class MetricPoint:
    name: str
    value: float
    step: int | None
    epoch: int | None


def parse_metric_line(line: str) -> list[MetricPoint]:
    """Return the points in one log line, or [] when it is not a well-formed metric line."""
    text = line.strip()
    if not text.startswith("{") or MARKER not in text:
        return []
    try:
        obj = json.loads(text)
    except ValueError:
        return []
    if not isinstance(obj, dict) or type(obj.get(MARKER)) is not int or obj[MARKER] != 1:
        return []
    step = obj.get("step")
    epoch = obj.get("epoch")
    step = step if isinstance(step, int) and not isinstance(step, bool) else None
    epoch = epoch if isinstance(epoch, int) and not isinstance(epoch, bool) else None
    points = []
    for key, value in obj.items():
        if key == MARKER or key in _POSITION_KEYS or isinstance(value, bool):
            continue
        if isinstance(value, int | float) and math.isfinite(value) and len(key) <= 128:
            points.append(MetricPoint(key, float(value), step, epoch))
    return points


def parse_metric_lines(text: str) -> list[MetricPoint]:
    points: list[MetricPoint] = []
    for line in text.splitlines():
        points.extend(parse_metric_line(line))
    return points


def format_metric_line(
    metrics: dict[str, float], *, step: int | None = None, epoch: int | None = None
) -> str:
    obj: dict[str, float | int] = {MARKER: 1}
    if step is not None:
        obj["step"] = step
    if epoch is not None:
        obj["epoch"] = epoch
    obj.update({k: float(v) for k, v in metrics.items()})
    return json.dumps(obj)
