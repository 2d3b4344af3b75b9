"""The metric-line protocol: a trainer prints one JSON object per line on stdout.

A metric line is a line whose JSON object has the key ``"stackml_metric"`` set to 1
(the protocol version); every other numeric key is a metric, and the optional
``"step"`` (int) and ``"epoch"`` (int) say where in training it was measured::

    {"stackml_metric": 1, "epoch": 2, "loss": 0.31, "accuracy": 0.91}

Anything else on stdout is ordinary log output.

The trainer is untrusted: parsing never raises, whatever the line holds. What the database
cannot hold is dropped, and `inspect_metric_line` says why:

- a line longer than `MAX_LINE_CHARS`, nested past the parser's depth, or with a number of
  more digits than Python converts: not parsed at all (no points);
- a value that is not a finite float (NaN, infinities, an integer beyond float range, a
  string, a boolean, a list): that metric is dropped;
- a metric name that is empty, longer than `MAX_NAME_CHARS`, holds a control character or
  is not valid UTF-8 (a lone surrogate from a ``\\ud800`` escape): that metric is dropped;
- a ``step`` or ``epoch`` that is not an integer in [`POSITION_MIN`, `POSITION_MAX`] (the
  range of the metrics table's INTEGER columns, 32-bit in PostgreSQL): the position is
  dropped (None) and the values are kept, as for a step of the wrong type;
- more than `MAX_POINTS_PER_LINE` metrics on one line: the rest are dropped.

A job stores at most ``max_metric_points`` points (a setting); `points_allowed` and
`cap_points` are what the poll step uses to keep to it.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

MARKER = "stackml_metric"
_POSITION_KEYS = ("step", "epoch")

MAX_LINE_CHARS = 64 * 1024
MAX_NAME_CHARS = 128  # the metrics table's name column
MAX_POINTS_PER_LINE = 256
# step and epoch are INTEGER columns: 32-bit signed in PostgreSQL (and within SQLite's 64)
POSITION_MIN = -(1 << 31)
POSITION_MAX = (1 << 31) - 1

_BAD_NAME_CHARS = re.compile(r"[\x00-\x1f\x7f-\x9f]")


@dataclass(frozen=True)
class MetricPoint:
    name: str
    value: float
    step: int | None
    epoch: int | None


@dataclass(frozen=True)
class ParsedLine:
    """The points of one line, and why anything on a metric line was dropped (empty for a
    well-formed metric line and for ordinary log output)."""

    points: tuple[MetricPoint, ...] = ()
    problems: tuple[str, ...] = ()


_NOTHING = ParsedLine()


def inspect_metric_line(line: object) -> ParsedLine:
    """The points in one log line with the reasons for what was dropped; never raises."""
    if isinstance(line, bytes | bytearray):
        line = bytes(line).decode("utf-8", "replace")
    if not isinstance(line, str):
        return _NOTHING
    if MARKER not in line:
        return _NOTHING  # ordinary log output (checked before any other work on a long line)
    text = line.strip()
    if not text.startswith("{"):
        return _NOTHING
    if len(text) > MAX_LINE_CHARS:
        return ParsedLine(problems=(f"a metric line longer than {MAX_LINE_CHARS} characters",))
    try:
        obj = json.loads(text)
    except RecursionError:
        return ParsedLine(problems=("a metric line nested too deeply",))
    except ValueError as e:  # bad JSON, or an integer of more digits than int() takes
        if "digits" in str(e):
            return ParsedLine(problems=(f"a metric line with an unreadable number: {e}",))
        return _NOTHING
    if not isinstance(obj, dict) or type(obj.get(MARKER)) is not int or obj[MARKER] != 1:
        return _NOTHING
    problems: list[str] = []
    step = _position(obj, "step", problems)
    epoch = _position(obj, "epoch", problems)
    points: list[MetricPoint] = []
    for key, value in obj.items():
        if key == MARKER or key in _POSITION_KEYS:
            continue
        why = _bad_name(key) or _bad_value(value)
        if why is not None:
            problems.append(f"metric {_shown(key)}: {why}")
            continue
        if len(points) == MAX_POINTS_PER_LINE:
            problems.append(f"more than {MAX_POINTS_PER_LINE} metrics on one line; rest dropped")
            break
        points.append(MetricPoint(key, float(value), step, epoch))
    return ParsedLine(tuple(points), tuple(problems))


def _position(obj: dict[str, object], key: str, problems: list[str]) -> int | None:
    if key not in obj:
        return None
    val = obj[key]
    if type(val) is not int:
        problems.append(f"{key} is not an integer; the line's points have no {key}")
        return None
    if not POSITION_MIN <= val <= POSITION_MAX:
        problems.append(
            f"{key} is outside [{POSITION_MIN}, {POSITION_MAX}]; the line's points have no {key}"
        )
        return None
    return val


def _bad_name(key: str) -> str | None:
    if not key or len(key) > MAX_NAME_CHARS:
        return f"a name must have 1 to {MAX_NAME_CHARS} characters"
    if _BAD_NAME_CHARS.search(key):
        return "a name must not contain control characters"
    try:
        key.encode("utf-8")
    except UnicodeEncodeError:
        return "a name must be valid UTF-8"
    return None


def _bad_value(value: object) -> str | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return "not a number"
    try:
        as_float = float(value)
    except OverflowError:
        return "beyond the range of a float"
    if not math.isfinite(as_float):
        return "not finite"
    return None


def _shown(key: str) -> str:
    """A metric name as it may appear in a reason: short and printable."""
    return ascii(key[:40]) + ("..." if len(key) > 40 else "")


def parse_metric_line(line: str) -> list[MetricPoint]:
    """Return the points in one log line, or [] when it is not a well-formed metric line.
    Never raises; see the module docstring for what is dropped."""
    return list(inspect_metric_line(line).points)


def parse_metric_lines(text: str) -> list[MetricPoint]:
    points: list[MetricPoint] = []
    for line in text.splitlines():
        points.extend(parse_metric_line(line))
    return points


def points_allowed(stored: int, cap: int) -> int:
    """How many more points a job that holds `stored` may store under a cap of `cap`
    (the ``max_metric_points`` setting; 0 or less: no metrics are stored)."""
    return max(0, int(cap) - max(0, int(stored)))


def cap_points(
    points: Sequence[MetricPoint], stored: int, cap: int
) -> tuple[list[MetricPoint], int]:
    """The first `points` that fit under the cap, and how many were left out."""
    room = points_allowed(stored, cap)
    kept = list(points[:room])
    return kept, len(points) - len(kept)


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
