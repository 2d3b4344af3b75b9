"""Hyperparameter tuning, decided from what the trials are (no I/O): which parameters the next
trial gets, which running trial the median rule stops, and when the tuning job is done.

A tuning job's trials are training jobs of their own (jobs.parent_id, jobs.trial); the worker's
tune step (workers/steps/tune.py) reads them, asks `decide`, and carries out the decision.
Everything here is a function of the trials' recorded state, so a decision taken twice (two
workers, a re-drive) is the same decision.
"""

from __future__ import annotations

import itertools
import math
import random
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from service.domain.spec import Scalar, Tuning, TuningParameter
from service.domain.states import JobState


class TrialState(StrEnum):
    """A trial as its tuning job sees it (from its job's state)."""

    PENDING = "PENDING"  # its job is queued or its server is being prepared
    RUNNING = "RUNNING"  # its trainer runs (or its model is being exported)
    SUCCEEDED = "SUCCEEDED"  # done, with a value of the metric
    STOPPED = "STOPPED"  # stopped early by the median rule
    FAILED = "FAILED"  # its job failed, or succeeded without reporting the metric
    CANCELLED = "CANCELLED"  # its job was cancelled by someone (not stopped by the rule)

    @property
    def active(self) -> bool:
        return self in (TrialState.PENDING, TrialState.RUNNING)


_PENDING = {JobState.QUEUED, JobState.ALLOCATING, JobState.PROVISIONING}


@dataclass(frozen=True)
class Trial:
    number: int  # 1-based
    job_id: str
    job_state: JobState
    params: dict[str, Scalar]
    series: list[tuple[int, float]]  # (step, value) of the metric, in the order reported
    stopped: bool = False  # the median rule cancelled it
    failure: str | None = None  # its job's failure message
    reported: int | None = None  # points reported, when `series` holds only the last one

    @property
    def steps(self) -> int:
        """How many values of the metric the trial reported."""
        return self.reported if self.reported is not None else len(self.series)

    @property
    def state(self) -> TrialState:
        if self.stopped:
            return TrialState.STOPPED
        if self.job_state in _PENDING:
            return TrialState.PENDING
        if self.job_state in (JobState.RUNNING, JobState.EXPORTING):
            return TrialState.RUNNING
        if self.job_state is JobState.SUCCEEDED:
            return TrialState.SUCCEEDED if self.series else TrialState.FAILED
        if self.job_state in (JobState.CANCELLING, JobState.CANCELLED):
            return TrialState.CANCELLED
        return TrialState.FAILED

    @property
    def value(self) -> float | None:
        """The trial's value of the metric: the last one it reported."""
        return self.series[-1][1] if self.series else None


@dataclass
class Decision:
    stop: list[tuple[int, str]] = field(default_factory=list)  # (trial, why) to stop early
    launch: list[int] = field(default_factory=list)  # trial numbers to start now
    finish: JobState | None = None  # SUCCEEDED or FAILED: the tuning job ends
    message: str = ""  # why it ends
    reason: str = ""  # FAILED: trials_failed or timeout (failure.reason)
    best: Trial | None = None


def better(goal: str, a: float, b: float) -> bool:
    return a < b if goal == "minimize" else a > b


def best_trial(tuning: Tuning, trials: Sequence[Trial]) -> Trial | None:
    """The succeeded trial with the best value (the lowest-numbered one of equals)."""
    best = None
    for t in trials:
        v = t.value
        if t.state is TrialState.SUCCEEDED and v is not None:
            if best is None or better(tuning.goal, v, best.value):  # type: ignore[arg-type]
                best = t
    return best


def decide(tuning: Tuning, trials: Sequence[Trial], *, past_deadline: bool = False) -> Decision:
    """What the tuning job does now, given its trials (ordered by number)."""
    d = Decision()
    active = [t for t in trials if t.state.active]
    failed = [t for t in trials if t.state is TrialState.FAILED]
    d.best = best_trial(tuning, trials)
    if len(failed) >= tuning.max_failed_trials:
        last = failed[-1]
        d.finish = JobState.FAILED
        d.reason = "trials_failed"
        d.message = (
            f"{len(failed)} trials failed (max_failed_trials {tuning.max_failed_trials}); "
            f"trial {last.number} ({last.job_id}): {last.failure or 'no ' + tuning.metric}"
        )
        return d
    if past_deadline:
        return _ended(tuning, d, trials, "the tuning job reached its deadline", "timeout")
    if tuning.early_stopping is not None:
        d.stop = [
            (t.number, why) for t in active if (why := median_stop(tuning, t, trials)) is not None
        ]
    total = tuning.trials()
    # a trial holds its servers until its job is over (a stopped one: until its cancel ends)
    running = len([t for t in trials if not t.job_state.terminal])
    started = max((t.number for t in trials), default=0)
    room = max(0, tuning.max_parallel_trials - running)
    d.launch = list(range(started + 1, min(total, started + room) + 1))
    if not d.launch and running == 0 and started >= total:
        return _ended(tuning, d, trials, f"all {total} trials finished", "trials_failed")
    return d


def _ended(tuning: Tuning, d: Decision, trials: Sequence[Trial], why: str, reason: str) -> Decision:
    if d.best is not None:
        d.finish = JobState.SUCCEEDED
        d.message = (
            f"{why}; best: trial {d.best.number} ({d.best.job_id}) with {tuning.metric} "
            f"{d.best.value:.6g} ({params_text(d.best.params)})"
        )
    else:
        d.finish = JobState.FAILED
        d.reason = reason
        d.message = f"{why}; no trial succeeded with a value of {tuning.metric}"
    return d


def params_text(params: dict[str, Scalar]) -> str:
    """`a=1, b=x`: a trial's parameters in events and messages."""
    return ", ".join(f"{k}={v}" for k, v in sorted(params.items()))


def median_stop(tuning: Tuning, trial: Trial, trials: Sequence[Trial]) -> str | None:
    """Why the median rule stops `trial` now, or None: its best value so far is worse than the
    median of the completed trials' values at its last step (each completed trial's value at
    the last step it reported at or before that one): Vizier's median stopping rule, as
    Optuna's MedianPruner applies it, with trials that report at different steps compared."""
    rule = tuning.early_stopping
    if rule is None or trial.state is not TrialState.RUNNING or not trial.series:
        return None
    step = trial.series[-1][0]
    if step <= rule.min_steps:
        return None
    done = [t for t in trials if t.state is TrialState.SUCCEEDED and t.number != trial.number]
    at_step = [v for t in done if (v := _value_at(t.series, step)) is not None]
    if len(at_step) < rule.min_trials:
        return None
    bests = [v for _, v in trial.series]
    own = min(bests) if tuning.goal == "minimize" else max(bests)
    median = statistics.median(at_step)
    if not better(tuning.goal, median, own):
        return None
    return (
        f"stopped early at step {step}: its best {tuning.metric} {own:.6g} is worse than the "
        f"median {median:.6g} of {len(at_step)} completed trials there"
    )


def _value_at(series: Sequence[tuple[int, float]], step: int) -> float | None:
    """The value reported at `step`, or the last one before it."""
    out = None
    for s, v in series:
        if s <= step:
            out = v
    return out


# -- the next trial's parameters ----------------------------------------------------------


def suggest(tuning: Tuning, number: int, trials: Sequence[Trial]) -> dict[str, Scalar]:
    """Trial `number`'s parameters: a function of the seed, the number and (tpe) the finished
    trials, so that asking twice gives the same answer."""
    seed = _seed(tuning, number)
    if tuning.algorithm == "grid":
        return grid_point(tuning, number)
    if tuning.algorithm == "random":
        rng = random.Random(seed)
        return {p.name: _draw(p, rng) for p in tuning.parameters}
    return _tpe(tuning, seed, trials)


def _seed(tuning: Tuning, number: int) -> int:
    return ((tuning.seed or 0) * 1_000_003 + number) % (2**31)


def grid_point(tuning: Tuning, number: int) -> dict[str, Scalar]:
    """The `number`-th combination (1-based) of the grid, the last parameter varying fastest."""
    axes = [_axis(p) for p in tuning.parameters]
    point = next(itertools.islice(itertools.product(*axes), number - 1, None))
    return {p.name: v for p, v in zip(tuning.parameters, point, strict=True)}


def _axis(p: TuningParameter) -> list[Scalar]:
    if p.type == "integer":
        return list(range(int(p.min or 0), int(p.max or 0) + 1))
    return [_number(v) for v in p.values or ()]


def _number(v: float | str) -> Scalar:
    if isinstance(v, float) and v.is_integer():
        return int(v)
    return v


def _draw(p: TuningParameter, rng: random.Random) -> Scalar:
    if p.type in ("discrete", "categorical"):
        return _number(rng.choice(p.values or []))
    lo, hi = float(p.min or 0), float(p.max or 0)
    if p.type == "integer":
        if p.scale == "log":
            return min(
                int(hi), max(int(lo), round(math.exp(rng.uniform(math.log(lo), math.log(hi)))))
            )
        return rng.randint(int(lo), int(hi))
    if p.scale == "log":
        return math.exp(rng.uniform(math.log(lo), math.log(hi)))
    return rng.uniform(lo, hi)


def _distribution(p: TuningParameter) -> Any:
    import optuna

    d = optuna.distributions
    if p.type == "double":
        return d.FloatDistribution(float(p.min or 0), float(p.max or 0), log=p.scale == "log")
    if p.type == "integer":
        return d.IntDistribution(int(p.min or 0), int(p.max or 0), log=p.scale == "log")
    return d.CategoricalDistribution([_number(v) for v in p.values or ()])


def _tpe(tuning: Tuning, seed: int, trials: Sequence[Trial]) -> dict[str, Scalar]:
    """Optuna's TPE over the finished trials (succeeded: their value; stopped: pruned with
    their series; failed: failed). Seeded per trial number: each ask starts from the study."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    dists = {p.name: _distribution(p) for p in tuning.parameters}
    study = optuna.create_study(
        direction=tuning.goal, sampler=optuna.samplers.TPESampler(seed=seed)
    )
    states = optuna.trial.TrialState
    for t in trials:
        params = {k: v for k, v in t.params.items() if k in dists}
        if set(params) != set(dists):
            continue  # a trial of another search space (never, unless edited by hand)
        kw: dict[str, Any] = {"params": params, "distributions": dists}
        try:
            if t.state is TrialState.SUCCEEDED and t.value is not None:
                study.add_trial(optuna.trial.create_trial(value=t.value, **kw))
            elif t.state is TrialState.STOPPED and t.series:
                study.add_trial(
                    optuna.trial.create_trial(
                        state=states.PRUNED, intermediate_values=dict(t.series), **kw
                    )
                )
            elif t.state is TrialState.FAILED:
                study.add_trial(optuna.trial.create_trial(state=states.FAIL, **kw))
        except ValueError:
            continue  # a value outside its distribution (never, unless edited by hand)
    return dict(study.ask(dists).params)
