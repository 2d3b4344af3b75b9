"""The evaluation gate's pure parts: the job spec's `output.gate` checks (field-level errors,
defaults written into the stored spec) and service/domain/gate.py's decision for each reason,
both directions, absolute thresholds and relative improvement."""

from __future__ import annotations

import math
from typing import Any

import pytest
from pydantic import ValidationError

from service.domain.gate import GateRule, Reason, decide
from service.domain.spec import JobSpec

H = "local://projects/local/data/holdout/"


def _spec(output: dict[str, Any]) -> JobSpec:
    return JobSpec.model_validate(
        {
            "name": "j",
            "trainer": {"package_uri": "local://projects/local/staging/a/p.tar.gz", "module": "m"},
            "output": output,
        }
    )


def _refusal(output: dict[str, Any]) -> tuple[str, str]:
    with pytest.raises(ValidationError) as e:
        _spec(output)
    err = e.value.errors()[0]
    return ".".join(str(x) for x in err["loc"]), str(err["msg"])


def test_gate_defaults_are_written_into_the_spec() -> None:
    spec = _spec(
        {"register_as": "demo", "gate": {"metric": "rmse", "threshold": 1, "holdout_uri": H}}
    )
    gate = spec.model_dump(mode="json")["output"]["gate"]
    assert gate == {
        "metric": "rmse",
        "direction": "minimize",
        "threshold": 1.0,
        "min_improvement": None,
        "holdout_uri": H,
        "label": "default",
        "promote": True,
    }
    acc = _spec(
        {
            "register_as": "d",
            "gate": {"metric": "accuracy", "min_improvement": 0.01, "holdout_uri": H},
        }
    )
    assert acc.output.gate is not None and acc.output.gate.direction == "maximize"
    # a stored spec validates again as it is (resubmission, schedules' templates)
    again = JobSpec.model_validate(spec.model_dump(mode="json"))
    assert again == spec


@pytest.mark.parametrize(
    ("gate", "where", "says"),
    [
        ({"metric": "rmse", "holdout_uri": H}, "output.gate", "threshold, min_improvement"),
        ({"metric": "f1", "threshold": 1, "holdout_uri": H}, "output.gate.metric", ""),
        (
            {"metric": "rmse", "direction": "maximize", "threshold": 1, "holdout_uri": H},
            "output.gate.direction",
            "must be minimize",
        ),
        (
            {"metric": "accuracy", "direction": "minimize", "threshold": 0.5, "holdout_uri": H},
            "output.gate.direction",
            "must be maximize",
        ),
        (
            {"metric": "accuracy", "threshold": 2, "holdout_uri": H},
            "output.gate.threshold",
            "between 0 and 1",
        ),
        (
            {"metric": "mae", "threshold": -1, "holdout_uri": H},
            "output.gate.threshold",
            "never negative",
        ),
        (
            {"metric": "mse", "min_improvement": 1.5, "holdout_uri": H},
            "output.gate.min_improvement",
            "",
        ),
        (
            {"metric": "mse", "min_improvement": -0.1, "holdout_uri": H},
            "output.gate.min_improvement",
            "",
        ),
        (
            {"metric": "mse", "threshold": 1, "holdout_uri": "http://x/y"},
            "output.gate.holdout_uri",
            "",
        ),
        (
            {"metric": "mse", "threshold": 1, "holdout_uri": "local://projects/local/../x/"},
            "output.gate.holdout_uri",
            "'..'",
        ),
        (
            {"metric": "mse", "threshold": 1, "holdout_uri": H, "label": "Bad Label"},
            "output.gate.label",
            "",
        ),
        ({"metric": "mse", "threshold": 1, "holdout_uri": H, "extra": 1}, "output.gate.extra", ""),
        (
            {"metric": "mse", "threshold": 1, "holdout_uri": H, "promote": "yes please"},
            "output.gate.promote",
            "",
        ),
    ],
)
def test_bad_gates_name_their_field(gate: dict[str, Any], where: str, says: str) -> None:
    field, message = _refusal({"register_as": "demo", "gate": gate})
    assert field == where, message
    assert says in message


def test_a_gate_needs_register_as() -> None:
    field, message = _refusal({"gate": {"metric": "rmse", "threshold": 1, "holdout_uri": H}})
    assert field == "output.gate"
    assert "register_as" in message


RMSE = GateRule(metric="rmse", direction="minimize", threshold=0.5)
ACC = GateRule(metric="accuracy", direction="maximize", threshold=0.8)


def test_threshold_both_directions() -> None:
    assert decide(RMSE, 0.4, None).passed
    assert decide(RMSE, 0.5, None).passed  # "at least this good": equal meets it
    v = decide(RMSE, 0.6, None)
    assert (v.passed, v.reason) == (False, Reason.BELOW_THRESHOLD)
    assert "at most 0.5" in v.message
    assert decide(ACC, 0.9, None).passed
    v = decide(ACC, 0.7, None)
    assert (v.passed, v.reason) == (False, Reason.BELOW_THRESHOLD)
    assert "at least 0.8" in v.message
    # below the threshold is the reason even when a champion is worse still
    assert decide(RMSE, 0.6, 0.9).reason is Reason.BELOW_THRESHOLD


def test_no_champion_promotes_what_meets_the_threshold() -> None:
    v = decide(RMSE, 0.1, None)
    assert v.passed and v.reason is None and "no champion" in v.message
    only_relative = GateRule(metric="rmse", direction="minimize", min_improvement=0.05)
    assert decide(only_relative, 123.0, None).passed


def test_champion_must_be_beaten_strictly_in_the_metrics_direction() -> None:
    assert decide(RMSE, 0.3, 0.4).passed
    v = decide(RMSE, 0.4, 0.4)
    assert (v.passed, v.reason) == (False, Reason.NOT_BETTER_THAN_CHAMPION)
    assert decide(RMSE, 0.45, 0.4).reason is Reason.NOT_BETTER_THAN_CHAMPION
    assert decide(ACC, 0.95, 0.9).passed
    assert decide(ACC, 0.85, 0.9).reason is Reason.NOT_BETTER_THAN_CHAMPION
    assert decide(ACC, 0.9, 0.9).reason is Reason.NOT_BETTER_THAN_CHAMPION


def test_relative_improvement() -> None:
    five = GateRule(metric="rmse", direction="minimize", min_improvement=0.05)
    assert decide(five, 0.94, 1.0).passed  # 6% lower
    assert decide(five, 0.95, 1.0).passed  # exactly 5%
    v = decide(five, 0.96, 1.0)  # 4%: better, not enough
    assert (v.passed, v.reason) == (False, Reason.NOT_BETTER_THAN_CHAMPION)
    assert "0.05" in v.message
    up = GateRule(metric="accuracy", direction="maximize", min_improvement=0.1)
    assert decide(up, 0.89, 0.8).passed  # +11.25%
    assert decide(up, 0.87, 0.8).reason is Reason.NOT_BETTER_THAN_CHAMPION  # +8.75%
    both = GateRule(metric="mae", direction="minimize", threshold=0.2, min_improvement=0.5)
    assert decide(both, 0.1, 0.3).passed
    assert decide(both, 0.25, 1.0).reason is Reason.BELOW_THRESHOLD
    assert decide(both, 0.19, 0.3).reason is Reason.NOT_BETTER_THAN_CHAMPION
    # a perfect champion (score 0) cannot be beaten
    assert decide(five, 0.0, 0.0).reason is Reason.NOT_BETTER_THAN_CHAMPION


@pytest.mark.parametrize("bad", [None, math.nan, math.inf, -math.inf])
def test_scores_that_are_not_numbers_fail_the_evaluation(bad: float | None) -> None:
    v = decide(RMSE, bad, 0.3)
    assert (v.passed, v.reason) == (False, Reason.EVALUATION_FAILED)
    if bad is not None:
        assert decide(RMSE, 0.1, bad).reason is Reason.EVALUATION_FAILED


def test_rule_from_a_stored_gate() -> None:
    r = GateRule.of(
        {"metric": "accuracy", "direction": "maximize", "threshold": 1, "holdout_uri": H}
    )
    assert r == GateRule(metric="accuracy", direction="maximize", threshold=1.0)
