"""The evaluation gate's decision (no I/O): does a candidate's score let it take a label?

A job's `output.gate` (service/domain/spec.py, `Gate`) names a metric, its direction, an
absolute `threshold` and/or a relative `min_improvement` over the champion (the version the
label points at when the evaluation starts). The platform's evaluator scores both versions on
one holdout (workers/vm/evaluator.py, on a server of its own); `decide` turns the two scores
into a decision with a machine-readable reason and a sentence.

Rules, in order:
- a score that is missing or not finite: refused, `evaluation_failed`;
- `threshold`: the candidate must be at least that good (minimize: <=, maximize: >=), else
  `below_threshold` (also when there is no champion);
- a champion: the candidate must be strictly better, and with `min_improvement` m better by at
  least m x |champion score| (5% of the champion's score for 0.05), else
  `not_better_than_champion`; no champion: the threshold alone decides.
The compare-and-set of the label afterwards can still refuse (`champion_changed`): that is the
registry's (service/db/registry.py `promote`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import StrEnum
from typing import Any


class Reason(StrEnum):
    """Why a candidate did not take the label (stable: `evaluation.reason` in the API)."""

    BELOW_THRESHOLD = "below_threshold"
    NOT_BETTER_THAN_CHAMPION = "not_better_than_champion"
    CHAMPION_CHANGED = "champion_changed"
    EVALUATION_FAILED = "evaluation_failed"


class Decision(StrEnum):
    PROMOTED = "promoted"  # passed, and the label moved to the candidate
    PASSED = "passed"  # passed; `promote: false` or the label already there: nothing moved
    REFUSED = "refused"


@dataclass(frozen=True)
class GateRule:
    metric: str
    direction: str  # minimize | maximize
    threshold: float | None = None
    min_improvement: float | None = None

    @classmethod
    def of(cls, gate: dict[str, Any]) -> GateRule:
        """From a stored spec's `output.gate` (already validated at submission)."""
        return cls(
            metric=str(gate["metric"]),
            direction=str(gate.get("direction") or "minimize"),
            threshold=_opt_float(gate.get("threshold")),
            min_improvement=_opt_float(gate.get("min_improvement")),
        )


@dataclass(frozen=True)
class Verdict:
    passed: bool
    reason: Reason | None
    message: str


def _opt_float(v: Any) -> float | None:
    return None if v is None else float(v)


def _fmt(x: float) -> str:
    return f"{x:.6g}"


def better(rule: GateRule, a: float, b: float) -> bool:
    """Whether score `a` is strictly better than `b` under the rule's direction."""
    return a < b if rule.direction == "minimize" else a > b


def decide(rule: GateRule, candidate: float | None, champion: float | None) -> Verdict:
    """The gate's verdict for the candidate's score against the champion's (None: the label
    points nowhere, or the champion could not be scored: see `evaluation_failed`)."""
    m = rule.metric
    if candidate is None or not math.isfinite(candidate):
        return Verdict(
            False,
            Reason.EVALUATION_FAILED,
            f"the candidate's {m} is not a finite number ({candidate!r})",
        )
    if champion is not None and not math.isfinite(champion):
        return Verdict(
            False, Reason.EVALUATION_FAILED, f"the champion's {m} is not a finite number"
        )
    if rule.threshold is not None:
        t = rule.threshold
        ok = candidate <= t if rule.direction == "minimize" else candidate >= t
        if not ok:
            word = "at most" if rule.direction == "minimize" else "at least"
            return Verdict(
                False,
                Reason.BELOW_THRESHOLD,
                f"candidate {m} {_fmt(candidate)} does not meet the threshold: it must be "
                f"{word} {_fmt(t)}",
            )
    if champion is None:
        what = "meets the threshold" if rule.threshold is not None else "has no champion"
        return Verdict(True, None, f"candidate {m} {_fmt(candidate)} {what}; no champion")
    gain = champion - candidate if rule.direction == "minimize" else candidate - champion
    need = (rule.min_improvement or 0.0) * abs(champion)
    if gain <= 0 or gain < need:
        if rule.min_improvement:
            want = f"by at least {rule.min_improvement:.4g} of it ({_fmt(need)})"
        else:
            want = "strictly"
        return Verdict(
            False,
            Reason.NOT_BETTER_THAN_CHAMPION,
            f"candidate {m} {_fmt(candidate)} is not better than the champion's "
            f"{_fmt(champion)} {want}",
        )
    return Verdict(
        True,
        None,
        f"candidate {m} {_fmt(candidate)} is better than the champion's {_fmt(champion)}"
        + (f" by {gain / abs(champion):.2%}" if champion else ""),
    )


def why(verdict_decision: Decision, reason: Reason | None, message: str) -> str:
    """The `why` of the history row a gate writes: the decision, the reason, the sentence."""
    head = verdict_decision.value if reason is None else f"{verdict_decision.value} ({reason})"
    return f"gate {head}: {message}"
