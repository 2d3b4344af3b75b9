"""Hyperparameter tuning without I/O: the `tuning` schema, the parameters each algorithm gives a
trial, the median stopping rule, and when a tuning job ends (service/domain/tuning.py)."""

from __future__ import annotations

import math
from typing import Any

import pytest
from pydantic import ValidationError

from service.domain.spec import JobSpec, Tuning, trial_spec
from service.domain.states import JobState
from service.domain.tuning import Trial, TrialState, decide, grid_point, median_stop, suggest

S = JobState
LR = {"name": "lr", "type": "double", "min": 0.0001, "max": 1.0, "scale": "log"}


def tuning(**over: Any) -> Tuning:
    data: dict[str, Any] = {"metric": "loss", "goal": "minimize", "parameters": [LR]}
    data.update(over)
    return Tuning.model_validate(data)


def trial(n: int, state: JobState, series: list[float] | None = None, **kw: Any) -> Trial:
    values = series or []
    return Trial(
        number=n,
        job_id=f"job-{n}",
        job_state=state,
        params=kw.pop("params", {"lr": 0.01 * n}),
        series=[(k + 1, v) for k, v in enumerate(values)],
        **kw,
    )


# -- the schema -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("param", "words"),
    [
        ({"name": "lr", "type": "double", "min": 1}, "needs min and max"),
        ({"name": "lr", "type": "double", "min": 2, "max": 1}, "min must be less than max"),
        ({"name": "lr", "type": "double", "min": 0, "max": 1, "scale": "log"}, "min > 0"),
        ({"name": "n", "type": "integer", "min": 1.5, "max": 4}, "are integers"),
        ({"name": "n", "type": "discrete", "values": []}, "at least one value"),
        ({"name": "n", "type": "discrete", "values": ["a"]}, "values are numbers"),
        ({"name": "o", "type": "categorical", "values": ["a", "a"]}, "must not repeat"),
        ({"name": "o", "type": "categorical", "values": [1]}, "values are strings"),
        ({"name": "o", "type": "categorical", "values": ["a"], "min": 1}, "not min and max"),
        ({"name": "o", "type": "discrete", "values": [1], "scale": "log"}, "has no scale"),
        ({"name": "lr", "type": "double", "min": 0, "max": 1, "values": [1]}, "not values"),
        ({"name": "STACKML_X-1", "type": "discrete", "values": [1]}, "pattern"),
    ],
)
def test_a_bad_parameter_is_refused_with_a_reason(param: dict[str, Any], words: str) -> None:
    with pytest.raises(ValidationError) as e:
        tuning(parameters=[param])
    assert words in str(e.value)


@pytest.mark.parametrize(
    ("over", "words"),
    [
        ({"parameters": [LR, LR]}, "must not repeat: lr"),
        ({"max_trials": 2, "max_parallel_trials": 3}, "must not exceed max_trials"),
        ({"algorithm": "grid"}, "not double ones (lr)"),
        ({"max_trials": 0}, "greater than or equal to 1"),
        ({"max_trials": 101}, "less than or equal to 100"),
        ({"goal": "lower"}, "'minimize' or 'maximize'"),
        ({"metric": "a b"}, "pattern"),
        ({"parameters": []}, "at least 1 item"),
        (
            {
                "algorithm": "grid",
                "parameters": [
                    {"name": f"p{i}", "type": "integer", "min": 0, "max": 9} for i in range(5)
                ],
            },
            "more than 10000 points",
        ),
    ],
)
def test_a_bad_tuning_section_is_refused_with_a_reason(over: dict[str, Any], words: str) -> None:
    with pytest.raises(ValidationError) as e:
        tuning(**over)
    assert words in str(e.value)


def base_spec(**over: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "name": "sweep",
        "trainer": {"package_uri": "local://p/t.tar.gz", "module": "m"},
        "tuning": {"metric": "loss", "goal": "minimize", "parameters": [LR]},
    }
    data.update(over)
    return data


def test_a_tuned_name_must_not_also_be_fixed_nor_the_output_named() -> None:
    with pytest.raises(ValidationError) as e:
        JobSpec.model_validate(
            base_spec(hyperparameters={"lr": 0.1}, output={"model_uri": "local://p/m/"})
        )
    text = str(e.value)
    assert "lr is both a fixed hyperparameter and a tuned parameter" in text
    assert "each write to their own models/<trial job id>/" in text
    with pytest.raises(ValidationError) as e:
        JobSpec.model_validate(
            {
                **base_spec(),
                "type": "batch_prediction",
                "trainer": None,
                "prediction": {
                    "model": "m",
                    "input_uris": ["local://p/x"],
                    "output_prefix": "local://p/o/",
                },
            }
        )
    assert "tuning is a training field" in str(e.value)


def test_a_trial_spec_is_its_tuning_jobs_spec_with_its_parameters_and_no_tuning() -> None:
    parent = JobSpec.model_validate(
        base_spec(
            name="n" * 63,
            hyperparameters={"epochs": 3},
            output={"register_as": "best"},
            env={"TOKEN": "secret"},
        )
    ).model_dump(mode="json")
    child = JobSpec.model_validate(trial_spec(parent, 12, {"lr": 0.5}))
    assert child.tuning is None
    assert child.name == "n" * 55 + "-t12"
    assert child.hyperparameters == {"epochs": 3, "lr": 0.5}
    assert child.output.register_as is None and child.output.model_uri is None
    assert child.env == {"TOKEN": "secret"}  # the trainer still gets its environment
    assert child.trainer_argv() == ["--epochs=3", "--lr=0.5"]


# -- parameters ------------------------------------------------------------------------------


def test_grid_walks_every_combination_in_order_and_caps_the_trials() -> None:
    t = tuning(
        algorithm="grid",
        max_trials=100,
        parameters=[
            {"name": "layers", "type": "integer", "min": 1, "max": 2},
            {"name": "act", "type": "categorical", "values": ["relu", "tanh"]},
            {"name": "lr", "type": "discrete", "values": [0.1, 1]},
        ],
    )
    assert t.trials() == 8
    points = [grid_point(t, n) for n in range(1, 9)]
    assert points[0] == {"layers": 1, "act": "relu", "lr": 0.1}
    assert points[1] == {"layers": 1, "act": "relu", "lr": 1}  # the last varies fastest
    assert points[7] == {"layers": 2, "act": "tanh", "lr": 1}
    assert len({tuple(sorted(p.items())) for p in points}) == 8
    assert isinstance(points[1]["lr"], int)  # 1, not 1.0: `--lr=1`


@pytest.mark.parametrize("algorithm", ["random", "tpe"])
def test_random_and_tpe_stay_in_range_and_repeat_for_the_same_seed(algorithm: str) -> None:
    t = tuning(
        algorithm=algorithm,
        seed=11,
        parameters=[
            LR,
            {"name": "units", "type": "integer", "min": 8, "max": 512, "scale": "log"},
            {"name": "opt", "type": "categorical", "values": ["adam", "sgd"]},
        ],
    )
    done = [trial(n, S.SUCCEEDED, [1.0 / n], params=suggest(t, n, [])) for n in range(1, 4)]
    for n in range(1, 12):
        p = suggest(t, n, done)
        assert p == suggest(t, n, done)  # asked twice (two passes): the same answer
        assert 0.0001 <= p["lr"] <= 1 and isinstance(p["lr"], float)
        assert 8 <= p["units"] <= 512 and isinstance(p["units"], int)
        assert p["opt"] in ("adam", "sgd")
    assert suggest(t, 5, done) != suggest(t, 6, done)  # each trial its own draw
    other = tuning(algorithm=algorithm, seed=12, parameters=t.model_dump()["parameters"])
    assert suggest(other, 5, done) != suggest(t, 5, done)


def test_log_scale_spreads_over_the_decades() -> None:
    t = tuning(algorithm="random", seed=1)
    draws = [suggest(t, n, [])["lr"] for n in range(1, 401)]
    decades = [sum(1 for d in draws if 10 ** (k - 4) <= d < 10 ** (k - 3)) for k in range(4)]
    assert all(60 <= c <= 140 for c in decades), decades  # ~100 in each of the 4 decades


def test_tpe_learns_from_the_finished_trials() -> None:
    """Past its random startup trials, TPE asks near the best region (within half a decade
    of lr = 10^-1.5) far more often than random search with the same seed does."""

    def loss(lr: float) -> float:
        return (math.log10(lr) + 1.5) ** 2

    def late_near(algorithm: str) -> int:
        t = tuning(algorithm=algorithm, seed=3)
        done: list[Trial] = []
        for n in range(1, 31):
            p = suggest(t, n, done)
            done.append(trial(n, S.SUCCEEDED, [loss(float(p["lr"]))], params=p))
        return sum(1 for tr in done[15:] if abs(math.log10(float(tr.params["lr"])) + 1.5) < 0.5)

    tpe, rnd = late_near("tpe"), late_near("random")
    assert tpe >= 2 * rnd and tpe >= 7, (tpe, rnd)


# -- the median rule -------------------------------------------------------------------------


def test_median_rule_stops_a_trial_worse_than_the_median_of_completed_ones() -> None:
    t = tuning(early_stopping={"min_trials": 2, "min_steps": 2})
    done = [
        trial(1, S.SUCCEEDED, [5, 3, 2, 1]),
        trial(2, S.SUCCEEDED, [6, 4, 3, 2]),
        trial(3, S.SUCCEEDED, [9, 8, 7, 6]),
    ]
    bad = trial(4, S.RUNNING, [9, 9, 8])
    why = median_stop(t, bad, [*done, bad])
    assert why is not None and "at step 3" in why and "median 3" in why and "best loss 8" in why
    good = trial(5, S.RUNNING, [5, 3, 2.5])  # better than the median 3 at step 3
    assert median_stop(t, good, [*done, good]) is None
    early = trial(6, S.RUNNING, [50, 50])  # step 2 is not past min_steps
    assert median_stop(t, early, [*done, early]) is None
    alone = trial(7, S.RUNNING, [50, 50, 50])  # one completed trial is not enough
    assert median_stop(t, alone, [done[0], alone]) is None
    # maximize: lower is worse
    up = tuning(goal="maximize", early_stopping={"min_trials": 2, "min_steps": 0})
    assert median_stop(up, trial(8, S.RUNNING, [1, 1]), done) is not None
    assert median_stop(up, trial(8, S.RUNNING, [9, 9]), done) is None
    # without early_stopping nothing is stopped
    assert median_stop(tuning(), bad, [*done, bad]) is None


def test_a_completed_trial_that_reported_less_often_counts_with_its_last_value() -> None:
    t = tuning(early_stopping={"min_trials": 2, "min_steps": 0})
    sparse = Trial(1, "job-1", S.SUCCEEDED, {}, [(1, 5.0), (10, 1.0)])
    dense = Trial(2, "job-2", S.SUCCEEDED, {}, [(k, 4.0) for k in range(1, 11)])
    running = Trial(3, "job-3", S.RUNNING, {}, [(5, 4.8)])
    # at step 5: sparse's value is 5.0 (its step 1), dense's 4.0; the median is 4.5
    assert median_stop(t, running, [sparse, dense, running]) is not None
    assert median_stop(t, Trial(3, "job-3", S.RUNNING, {}, [(5, 4.4)]), [sparse, dense]) is None


# -- what the tuning job does ----------------------------------------------------------------


def test_it_starts_up_to_max_parallel_trials_and_never_more_than_max_trials() -> None:
    t = tuning(max_trials=5, max_parallel_trials=2)
    assert decide(t, []).launch == [1, 2]
    assert decide(t, [trial(1, S.RUNNING), trial(2, S.QUEUED)]).launch == []
    assert decide(t, [trial(1, S.SUCCEEDED, [1]), trial(2, S.RUNNING)]).launch == [3]
    four = [trial(n, S.SUCCEEDED, [n]) for n in range(1, 5)]
    assert decide(t, four).launch == [5]
    # a stopped trial still being cancelled holds its place until its servers are gone
    cancelling = trial(3, S.CANCELLING, [9], stopped=True)
    assert cancelling.state is TrialState.STOPPED
    assert decide(t, [*four[:2], cancelling, trial(4, S.RUNNING)]).launch == []


def test_it_ends_with_the_best_trial_once_every_trial_finished() -> None:
    t = tuning(max_trials=4, max_parallel_trials=2)
    trials = [
        trial(1, S.SUCCEEDED, [3, 2]),
        trial(2, S.SUCCEEDED, [2, 1]),
        trial(3, S.CANCELLED, [9], stopped=True),
        trial(4, S.FAILED, failure="exited 1"),
    ]
    d = decide(t, trials)
    assert d.finish is S.SUCCEEDED and d.best is trials[1] and d.launch == []
    assert "all 4 trials finished; best: trial 2 (job-2) with loss 1" in d.message
    assert decide(tuning(max_trials=4, goal="maximize"), trials).best is trials[0]
    assert decide(t, trials[:3] + [trial(4, S.RUNNING, [0.5])]).finish is None


def test_too_many_failed_trials_fail_it_and_a_trial_without_the_metric_is_failed() -> None:
    t = tuning(max_trials=10, max_parallel_trials=3, max_failed_trials=2)
    silent = trial(2, S.SUCCEEDED)  # succeeded, never reported loss
    assert silent.state is TrialState.FAILED
    d = decide(t, [trial(1, S.FAILED, failure="exited 3"), silent, trial(3, S.RUNNING)])
    assert d.finish is S.FAILED and d.reason == "trials_failed"
    assert "2 trials failed (max_failed_trials 2); trial 2 (job-2): no loss" in d.message
    none_ok = decide(tuning(max_trials=1), [trial(1, S.CANCELLED)])
    assert none_ok.finish is S.FAILED and "no trial succeeded" in none_ok.message


def test_past_its_deadline_it_ends_with_the_best_so_far_or_fails_with_timeout() -> None:
    t = tuning(max_trials=10)
    d = decide(t, [trial(1, S.SUCCEEDED, [1]), trial(2, S.RUNNING)], past_deadline=True)
    assert d.finish is S.SUCCEEDED and "reached its deadline" in d.message
    d = decide(t, [trial(1, S.RUNNING)], past_deadline=True)
    assert d.finish is S.FAILED and d.reason == "timeout"


def test_the_rule_stops_and_a_new_trial_starts_once_the_stopped_one_is_gone() -> None:
    t = tuning(max_trials=4, max_parallel_trials=2, early_stopping={"min_trials": 2})
    done = [trial(1, S.SUCCEEDED, [2, 1]), trial(2, S.SUCCEEDED, [3, 2])]
    d = decide(t, [*done, trial(3, S.RUNNING, [9, 9]), trial(4, S.RUNNING, [1, 0.5])])
    assert [n for n, _ in d.stop] == [3] and d.launch == [] and d.finish is None
