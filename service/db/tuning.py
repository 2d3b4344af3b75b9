"""A tuning job's trials in the database: each a job with `parent_id` (the tuning job) and
`trial` (its number), read back as service.domain.tuning.Trial, summarised for the API."""

from __future__ import annotations

from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from service.db import jobs as repo
from service.db.models import Job, MetricRow, Resource
from service.domain.spec import JobSpec, Scalar, Tuning, stored, trial_spec
from service.domain.states import JobState
from service.domain.tuning import Trial, best_trial


def tuning_of(job: Job) -> Tuning | None:
    """The tuning section of a job's stored spec, or None for any other job."""
    data = (job.spec or {}).get("tuning")
    return Tuning.model_validate(data) if isinstance(data, dict) else None


def start(s: Session, job: Job, tuning: Tuning) -> None:
    """A new tuning job (POST /v1/jobs, or a schedule's slot) boots nothing: RUNNING at once,
    and its first task is the poll step that submits its trials (queue.POLL, not ALLOCATE)."""
    repo.transition(
        s,
        job.id,
        JobState.QUEUED,
        JobState.RUNNING,
        f"tuning {tuning.metric} ({tuning.goal}) with {tuning.algorithm}: {tuning.trials()} "
        f"trials, {tuning.max_parallel_trials} at a time",
        tuning=True,
    )
    s.refresh(job)


def trial_rows(s: Session, parent_id: str) -> list[Job]:
    return list(s.scalars(select(Job).where(Job.parent_id == parent_id).order_by(Job.trial)))


def trials(s: Session, parent: Job, tuning: Tuning, *, series_too: bool = True) -> list[Trial]:
    """The tuning job's trials, in order, with each one's series of the tuned metric (one
    query for all of them). Without `series_too` (what the median rule alone needs), each
    trial's series is its last point only, and `steps` counts the points: two grouped queries
    that read one row per trial, whatever the trainers reported."""
    rows = trial_rows(s, parent.id)
    series: dict[str, list[tuple[int, float]]] = {r.id: [] for r in rows}
    steps: dict[str, int] = {}
    if rows and not series_too:
        ids = list(series)
        counted = (
            select(MetricRow.job_id, func.count(), func.max(MetricRow.step))
            .where(MetricRow.job_id.in_(ids), MetricRow.name == tuning.metric)
            .group_by(MetricRow.job_id)
        )
        last = repo.latest_metrics_of(s, ids)
        for job_id, n, top in s.execute(counted):
            steps[job_id] = int(n)
            value = last.get(job_id, {}).get(tuning.metric)
            if value is not None:
                series[job_id] = [(int(top) if top is not None else int(n), float(value))]
    elif rows:
        full = (
            select(MetricRow.job_id, MetricRow.step, MetricRow.value)
            .where(MetricRow.job_id.in_(list(series)), MetricRow.name == tuning.metric)
            .order_by(MetricRow.job_id, MetricRow.log_offset, MetricRow.id)
        )
        for job_id, step, value in s.execute(full):
            points = series[job_id]
            # a line without a step counts as the next one
            points.append((step if step is not None else len(points) + 1, float(value)))
    names = {p.name for p in tuning.parameters}
    return [
        Trial(
            number=r.trial or 0,
            job_id=r.id,
            job_state=JobState(r.state),
            params={k: v for k, v in (r.spec.get("hyperparameters") or {}).items() if k in names},
            series=series[r.id],
            reported=steps.get(r.id),
            stopped=r.trial_stopped,
            failure=r.failure_message,
        )
        for r in rows
    ]


def create_trial(
    s: Session, parent: Job, number: int, params: dict[str, Scalar], area: str, uri: Any
) -> Job:
    """Trial `number` of `parent`, QUEUED, writing to its own models/<id>/ prefix of the
    project's `area` (`uri` turns a key into the store's URI). The unique (parent_id, trial)
    makes a second insert of the same trial fail (IntegrityError): another pass made it."""
    from service.domain import outputs

    job_id = repo.new_job_id()
    spec = JobSpec.model_validate(trial_spec(parent.spec, number, params))
    data = stored(spec)
    data["output"]["model_uri"] = uri(outputs.default_prefix(area, job_id))
    job = repo.create_job(
        s,
        parent.project_id,
        spec,
        job_id=job_id,
        stored_spec=data,
        output={"model_uri": data["output"]["model_uri"]},
    )
    job.parent_id = parent.id
    job.trial = number
    s.flush()
    return job


def empty_summary(parent: Job) -> dict[str, Any] | None:
    """The `tuning` block of a tuning job just submitted: no trial yet (no query)."""
    tuning = tuning_of(parent)
    return None if tuning is None else _block(tuning, [], {})


def summary(s: Session, parent: Job) -> dict[str, Any] | None:
    """The `tuning` block of a tuning job's view: its trials (number, job, state, parameters,
    value of the metric, steps reported), the best one and the trials' usage; None for any
    other job."""
    tuning = tuning_of(parent)
    if tuning is None:
        return None
    got = trials(s, parent, tuning, series_too=False)
    servers = repo.resources_of(s, [t.job_id for t in got])
    return _block(tuning, got, servers)


def _block(tuning: Tuning, got: list[Trial], servers: dict[str, list[Resource]]) -> dict[str, Any]:
    from service.db import quotas

    best = best_trial(tuning, got)
    counts: dict[str, int] = {}
    for t in got:
        counts[t.state.value] = counts.get(t.state.value, 0) + 1
    return {
        "metric": tuning.metric,
        "goal": tuning.goal,
        "max_trials": tuning.trials(),
        "trials": [
            {
                "trial": t.number,
                "job_id": t.job_id,
                "state": t.state.value,
                "job_state": t.job_state.value,
                "hyperparameters": t.params,
                "value": t.value,
                "steps": t.steps,
                "last_step": t.series[-1][0] if t.series else None,
            }
            for t in got
        ],
        "counts": counts,
        # the trials' servers together (the tuning job holds none: its own usage is zero)
        "trials_usage": quotas.job_usage([r for rs in servers.values() for r in rs]).as_dict(),
        "best_trial": None
        if best is None
        else {
            "trial": best.number,
            "job_id": best.job_id,
            "value": best.value,
            "hyperparameters": best.params,
        },
    }
