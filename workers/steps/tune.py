"""Tune: the step of a RUNNING tuning job (the poll task runs it for a job with `tuning`).

A tuning job boots nothing. Each pass reads its trials (child jobs), asks
service.domain.tuning.decide, and carries the decision out: it stops the trials the median rule
names (a cancel, marked trial_stopped), submits new trials (QUEUED jobs that admission starts
like any other, within the project's quota and its fair turn), and at the end ends the tuning
job: SUCCEEDED with the best trial's model (registered when the spec says
`output.register_as`), or FAILED; its teardown cancels the trials still running. Until then
it hands itself back to the queue every `INTERVAL` seconds; a lost message is re-driven by
the reconciler as any RUNNING job's.

Every decision is a function of the trials' rows, and every act a compare-and-set or a unique
insert ((parent_id, trial)), so two passes at once (a duplicate message, a re-drive) do each
thing once.
"""

from __future__ import annotations

import math
import time
from datetime import UTC, datetime

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError

from service import queue
from service.db import jobs as repo
from service.db import tuning as tuning_repo
from service.db.models import Job
from service.domain.spec import Tuning
from service.domain.states import FailureReason, JobState, Phase
from service.domain.tuning import Decision, Trial, decide, params_text, suggest
from workers import jobctx
from workers.jobctx import db, log

INTERVAL = 2.0  # seconds between passes


def run(ctx: jobctx.StepContext) -> None:
    tuning = ctx.spec.tuning
    if tuning is None:
        raise ValueError(f"job {ctx.job_id} is not a tuning job")
    with db() as s:
        parent = repo.get_job(s, ctx.job_id)
        # the whole series only for the median rule; the rest needs each trial's last value
        got = tuning_repo.trials(s, parent, tuning, series_too=tuning.early_stopping is not None)
        started_at = parent.started_at
    d = decide(tuning, got, past_deadline=_past_deadline(ctx, tuning, started_at))
    by_number = {t.number: t for t in got}
    for number, why in d.stop:
        _stop(ctx.job_id, by_number[number], why)
    if d.finish is not None:
        _finish(ctx, d)
        return
    for number in d.launch:
        if not _launch(ctx, tuning, number, got):
            break
    with db() as s:
        repo.touch(s, ctx.job_id)
    jobctx.next_step(queue.POLL, ctx.job_id, INTERVAL)


def deadline_seconds(tuning: Tuning, max_runtime: int) -> int:
    """A tuning job's bound: max_runtime_seconds (each trial's) per wave of parallel trials."""
    return max_runtime * math.ceil(tuning.trials() / tuning.max_parallel_trials)


def _past_deadline(ctx: jobctx.StepContext, tuning: Tuning, started_at: datetime | None) -> bool:
    if started_at is None:
        return False
    if started_at.tzinfo is None:
        started_at = started_at.replace(tzinfo=UTC)
    bound = deadline_seconds(tuning, ctx.spec.max_runtime_seconds)
    return time.time() - started_at.timestamp() > bound


def _stop(parent_id: str, trial: Trial, why: str) -> None:
    """Cancel a running trial the median rule stops, marked as stopped (not failed)."""
    with db() as s:
        won = s.execute(
            update(Job)
            .where(Job.id == trial.job_id, Job.state == JobState.RUNNING.value)
            .values(trial_stopped=True)
        ).rowcount  # type: ignore[attr-defined]
        if not won:
            return  # it finished (or was cancelled) meanwhile: the next pass sees it
        asked = repo.request_cancel(s, trial.job_id, why)
        repo.add_event(s, parent_id, "trial", f"trial {trial.number} ({trial.job_id}) {why}")
    log.info("tuning job %s: trial %d %s", parent_id, trial.number, why)
    if asked is repo.CancelRequest.TEARDOWN:
        jobctx.next_step(queue.CANCEL, trial.job_id)


def _launch(ctx: jobctx.StepContext, tuning: Tuning, number: int, got: list[Trial]) -> bool:
    """Submit trial `number`; False when the tuning job left RUNNING (cancelled) meanwhile."""
    params = suggest(tuning, number, got)
    store = jobctx.store(ctx.project_id)
    area = store.project_prefix(ctx.project_id)
    try:
        with db() as s:
            # the parent's row, locked: a cancel of the tuning job (which cancels the trials it
            # sees) waits for this insert, or this sees the tuning job cancelled
            parent = s.scalars(select(Job).where(Job.id == ctx.job_id).with_for_update()).one()
            if parent.state != JobState.RUNNING.value or parent.cancel_requested:
                return False
            child = tuning_repo.create_trial(s, parent, number, params, area, store.uri)
            shown = params_text(params)
            repo.add_event(
                s, ctx.job_id, "trial", f"trial {number} ({child.id}) submitted: {shown}"
            )
            child_id = child.id
    except IntegrityError:
        log.info("tuning job %s: trial %d was submitted by another pass", ctx.job_id, number)
        return True
    jobctx.next_step(queue.ALLOCATE, child_id)
    return True


def _finish(ctx: jobctx.StepContext, d: Decision) -> None:
    """End the tuning job as decided; its teardown cancels the trials still active (as it does
    for a cancelled tuning job: workers/steps/teardown.py)."""
    from workers.steps import register

    version_id = None
    with db() as s:
        parent = s.scalars(select(Job).where(Job.id == ctx.job_id).with_for_update()).one()
        if parent.state != JobState.RUNNING.value:
            return
        if d.finish is JobState.SUCCEEDED and d.best is not None:
            best = repo.get_job(s, d.best.job_id)
            output = {
                "model_uri": (best.output or {}).get("model_uri"),
                "best_trial": d.best.number,
                "best_job_id": best.id,
                "value": d.best.value,
                "hyperparameters": d.best.params,
            }
            if repo.transition(
                s,
                ctx.job_id,
                JobState.RUNNING,
                JobState.SUCCEEDED,
                d.message,
                output=output,
                tuning=True,
            ):
                version_id = register.register_job_output(s, repo.get_job(s, ctx.job_id), best)
        else:
            reason = FailureReason.TIMEOUT if d.reason == "timeout" else FailureReason.TRIALS_FAILED
            repo.transition(
                s,
                ctx.job_id,
                JobState.RUNNING,
                JobState.FAILED,
                failure=repo.Failure(Phase.TRAIN, reason, d.message),
            )
    log.info("tuning job %s ended %s: %s", ctx.job_id, d.finish, d.message)
    jobctx.next_step(queue.TEARDOWN, ctx.job_id)
    if version_id is not None:
        register.enqueue(version_id)
