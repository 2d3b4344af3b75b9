"""Firing schedules (the `stackml.fire_schedules` task, sent by Celery beat every few seconds):
for each schedule with a slot due, one transaction locks the schedule's row, works out the due
slots (service/domain/schedules.py: catchup and its cap), and for each slot inserts its
schedule_runs row, applies the concurrency policy, and creates the slot's job, all in that
transaction; the jobs' first tasks are enqueued after the commit, as the API does.

Exactly once: the slot row's unique key (schedule_id, fire_time) decides who fires a slot. Two
beats (or two workers running the pass) at once: the second finds the schedule's row locked
and leaves it (SKIP LOCKED), or, if it comes after the first committed, finds the slot handled
(its next_fire_at moved on; and were it to try, its insert conflicts and it creates nothing).
A beat restarted, or a broker down across a fire time: nothing fired the slot, so the next
pass finds it due and fires it (catchup none: the latest missed slot; all: up to max_catchup).
A worker killed mid-pass: its transaction rolls back, slot row and job together.
A job whose ALLOCATE message is lost (broker down after the commit) is re-driven by the
reconciler like any QUEUED job that makes no progress.

A schedule with a `dataset` rebuilds it first: the slot's transaction starts a new version of
the dataset (service/db/datasets.py: rebuild) and records the slot as `building` with that
version; the build task is enqueued after the commit. Each pass then looks at the building
slots (each in its own transaction, the slot row locked and still `building`, so one firer
moves it on): a READY version starts the slot's job, training on the version's train/ prefix
(and a gate without a holdout scored on its holdout/); a FAILED one fails the slot with the
build's sentence; one still building after DATASET_WAIT fails it too. A lost build message is
re-driven by the serving-log index pass (workers/steps/serving_index.py).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from pydantic import ValidationError
from sqlalchemy.orm import Session

from service import queue, trusts
from service.backends import registry
from service.config import Settings, get_settings
from service.db import datasets as datasets_repo
from service.db import jobs as jobs_repo
from service.db import schedules as repo
from service.db import tuning as tuning_repo
from service.db.models import DatasetVersion, Job, Schedule, ScheduleRun, utcnow
from service.db.session import session_scope
from service.domain import outputs
from service.domain import schedules as dom
from service.domain.errors import StackMLError
from service.domain.spec import JobSpec, stored, unbuilt_fields

log = logging.getLogger("stackml.worker.schedules")

TASK = "stackml.fire_schedules"
INTERVAL = 5.0  # seconds between passes (beat); a slot fires at most this late
MAX_PER_PASS = 100  # schedules handled per pass (the most overdue first)
DATASET_WAIT = timedelta(hours=1)  # a slot's dataset build that takes longer fails the slot

Enqueue = Callable[[str, str], None]


@dataclass
class Fired:
    schedule_id: str
    fire_time: datetime
    outcome: str
    job_id: str | None = None
    reason: str = ""


@dataclass
class Report:
    slots: list[Fired] = field(default_factory=list)
    lost_races: int = 0  # slots another firer had already handled

    def started(self) -> list[Fired]:
        return [f for f in self.slots if f.outcome == dom.Outcome.STARTED]


def _enqueue_quietly(task: str, job_id: str) -> None:
    """A lost message only delays the job: the reconciler re-drives a QUEUED job that makes
    no progress."""
    try:
        queue.enqueue(task, job_id)
    except Exception as e:  # noqa: BLE001 - any broker failure has the same remedy
        log.warning(
            "could not enqueue %s for %s (the reconciler will re-drive it): %s", task, job_id, e
        )


def run(
    now: datetime | None = None,
    *,
    settings: Settings | None = None,
    enqueue: Enqueue | None = None,
) -> Report:
    """One firing pass: every schedule with a slot due at `now` (default: the time now)."""
    cfg = settings or get_settings()
    send = enqueue or _enqueue_quietly
    report = Report()
    with session_scope(cfg.db_url) as s:
        ids = repo.due(s, now or utcnow(), MAX_PER_PASS)
    for schedule_id in ids:
        try:
            fire(schedule_id, now or utcnow(), settings=cfg, enqueue=send, report=report)
        except Exception:
            log.exception(
                "schedule %s: firing pass failed (the next pass tries again)", schedule_id
            )
    with session_scope(cfg.db_url) as s:
        waiting = repo.building_slots(s, MAX_PER_PASS)
    for run_id in waiting:
        try:
            after_build(run_id, now or utcnow(), settings=cfg, enqueue=send, report=report)
        except Exception:
            log.exception("schedule slot %s: starting its job failed (next pass tries)", run_id)
    return report


def after_build(
    run_id: int,
    now: datetime,
    *,
    settings: Settings,
    enqueue: Enqueue,
    report: Report | None = None,
) -> Report:
    """Move one `building` slot on when its dataset version has finished: start its job on
    the version (READY), or fail the slot (FAILED, or still building after DATASET_WAIT)."""
    report = report if report is not None else Report()
    after_commit: list[tuple[str, str]] = []
    with session_scope(settings.db_url) as s:
        run = repo.lock_building_slot(s, run_id)
        if run is None:
            return report
        sch = s.get(Schedule, run.schedule_id)
        dv = s.get(DatasetVersion, run.dataset_version_id) if run.dataset_version_id else None
        name = sch.dataset if sch is not None else None
        what = f"dataset {name!r} version {run.dataset_version}"

        def done(outcome: dom.Outcome, reason: str, job_id: str | None = None) -> None:
            repo.finish_slot(s, run.id, outcome=outcome.value, reason=reason, job_id=job_id)
            report.slots.append(
                Fired(run.schedule_id, run.fire_time, outcome.value, job_id, reason)
            )
            log.info(
                "schedule %s slot %s: %s %s %s",
                run.schedule_id,
                run.fire_time,
                outcome,
                job_id or "",
                reason,
            )

        if sch is None or dv is None:
            done(dom.Outcome.FAILED, f"{what} is gone: nothing to train on")
        elif dv.state == datasets_repo.FAILED:
            done(dom.Outcome.FAILED, f"{what} failed: {dv.failure_message or 'no reason'}"[:2000])
        elif dv.state == datasets_repo.BUILDING:
            if dom._aware(now) - dom._aware(run.recorded_at) > DATASET_WAIT:
                done(
                    dom.Outcome.FAILED,
                    f"{what} was still building after {DATASET_WAIT.total_seconds():.0f} s",
                )
            return report
        else:
            _start_on_dataset(s, settings, sch, run, dv, after_commit, done)
    for task, job_id in after_commit:
        enqueue(task, job_id)
    return report


def _start_on_dataset(
    s: Session,
    settings: Settings,
    sch: Schedule,
    run: ScheduleRun,
    dv: DatasetVersion,
    after_commit: list[tuple[str, str]],
    done: Callable[..., None],
) -> None:
    """The slot's job on the READY version `dv` (Replace cancels the live run first)."""
    if trusts.enabled(settings):
        done(dom.Outcome.FAILED, "schedules cannot fire with keystone auth and per-project tenancy")
        return
    template = dom.on_dataset(sch.job, f"{dv.prefix_uri}train/", f"{dv.prefix_uri}holdout/")
    try:
        with s.begin_nested():
            job = _create_job(s, settings, sch, run.fire_time, template)
    except (ValidationError, StackMLError, ValueError) as e:
        done(dom.Outcome.FAILED, f"the job template is no longer accepted: {e}"[:2000])
        return
    if dom.Concurrency(sch.concurrency) is dom.Concurrency.REPLACE:
        for job_id in repo.live_jobs(s, sch.id):
            if job_id != job.id and _request_cancel(s, job_id, sch.name):
                after_commit.append((queue.CANCEL, job_id))
    after_commit.append((_first_task(job), job.id))
    done(
        dom.Outcome.STARTED,
        f"on dataset {sch.dataset!r} version {run.dataset_version} ({dv.prefix_uri}train/)",
        job.id,
    )


def fire(
    schedule_id: str,
    now: datetime,
    *,
    settings: Settings,
    enqueue: Enqueue,
    report: Report | None = None,
) -> Report:
    """Handle the due slots of one schedule in one transaction; enqueue after the commit."""
    report = report if report is not None else Report()
    after_commit: list[tuple[str, str]] = []
    with session_scope(settings.db_url) as s:
        sch = repo.lock_for_firing(s, schedule_id)
        if sch is None or sch.paused or sch.next_fire_at is None:
            return report
        if dom._aware(sch.next_fire_at) > dom._aware(now):
            return report  # another firer handled it since `due` was read
        plan = dom.plan(
            sch.cron,
            sch.timezone,
            after=sch.handled_until,
            now=now,
            catchup=dom.Catchup(sch.catchup),
            max_catchup=sch.max_catchup,
        )
        for i, slot in enumerate(plan.fire):
            missed = plan.missed if i == 0 else 0
            _fire_slot(s, settings, sch, slot, missed, after_commit, report)
        repo.advance(s, sch, plan.through or dom._aware(sch.handled_until))
    for task, job_id in after_commit:
        enqueue(task, job_id)
    return report


def _fire_slot(
    s: Session,
    settings: Settings,
    sch: Schedule,
    slot: datetime,
    missed: int,
    after_commit: list[tuple[str, str]],
    report: Report,
) -> None:
    live = repo.live_jobs(s, sch.id)
    pending = repo.building(s, sch.id) if sch.dataset else []
    waiting = [
        f"slot {dom._aware(r.fire_time):%Y-%m-%dT%H:%M:%SZ} rebuilding its dataset" for r in pending
    ]
    decision = dom.decide(dom.Concurrency(sch.concurrency), live + waiting)
    run_id = repo.claim_slot(
        s, sch.id, slot, outcome=dom.Outcome.SKIPPED.value, reason="firing", missed=missed
    )
    if run_id is None:
        report.lost_races += 1
        log.info("schedule %s: slot %s was already handled", sch.id, slot.isoformat())
        return

    def done(outcome: dom.Outcome, reason: str, job_id: str | None = None) -> None:
        repo.finish_slot(s, run_id, outcome=outcome.value, reason=reason, job_id=job_id)
        report.slots.append(Fired(sch.id, slot, outcome.value, job_id, reason))
        log.info(
            "schedule %s slot %s: %s %s %s", sch.id, slot.isoformat(), outcome, job_id or "", reason
        )

    if decision.action is dom.Action.SKIP:
        done(dom.Outcome.SKIPPED, decision.reason)
        return
    if trusts.enabled(settings):
        done(
            dom.Outcome.FAILED,
            "schedules cannot fire with keystone auth and per-project tenancy: a slot has no "
            "user token to make its job's Keystone trust from",
        )
        return
    if sch.dataset:
        # Replace: earlier slots still rebuilding give way now; the live run is cancelled
        # when this slot's job starts (after_build)
        for r in pending if decision.action is dom.Action.REPLACE else []:
            repo.finish_slot(
                s,
                r.id,
                outcome=dom.Outcome.SKIPPED.value,
                job_id=None,
                reason=f"concurrency Replace: replaced by the slot at {slot:%Y-%m-%dT%H:%M:%SZ}",
            )
        store = registry.store(settings, project_id=sch.project_id)
        started = datasets_repo.rebuild(
            s, sch.project_id, sch.dataset, store=store, by=sch.created_by
        )
        if started.version_id is None:
            done(dom.Outcome.FAILED, started.reason or f"dataset {sch.dataset!r} cannot be rebuilt")
            return
        repo.finish_slot(
            s,
            run_id,
            outcome=dom.Outcome.BUILDING.value,
            job_id=None,
            reason=f"rebuilding dataset {sch.dataset!r} as version {started.version} first",
            dataset_version_id=started.version_id,
            dataset_version=started.version,
        )
        report.slots.append(Fired(sch.id, slot, dom.Outcome.BUILDING.value))
        after_commit.append((queue.BUILD_DATASET, str(started.version_id)))
        return
    try:
        with s.begin_nested():
            job = _create_job(s, settings, sch, slot)
    except (ValidationError, StackMLError, ValueError) as e:
        done(dom.Outcome.FAILED, f"the job template is no longer accepted: {e}"[:2000])
        return
    if decision.action is dom.Action.REPLACE:
        for job_id in decision.cancel:
            if _request_cancel(s, job_id, sch.name):
                after_commit.append((queue.CANCEL, job_id))
    after_commit.append((_first_task(job), job.id))
    done(dom.Outcome.STARTED, decision.reason, job.id)


def _create_job(
    s: Session,
    settings: Settings,
    sch: Schedule,
    slot: datetime,
    template: dict[str, Any] | None = None,
) -> Job:
    """The slot's job, as POST /v1/jobs makes it: QUEUED, its output in models/<job id>/; a
    tuning job RUNNING, with no output until its best trial's (its trials each write to their
    own prefix)."""
    spec = JobSpec.model_validate(dom.fired_spec(template or sch.job, sch.id, slot))
    if spec.batch:
        raise ValueError("batch prediction jobs cannot be fired by a schedule yet")
    unbuilt = unbuilt_fields(spec)
    if unbuilt:
        raise ValueError("; ".join(m for _, m in unbuilt))
    job = jobs_repo.create_job(s, sch.project_id, spec)
    store = registry.store(settings, project_id=sch.project_id)
    data = stored(spec)
    if spec.tuning is None and data["output"].get("model_uri") is None:
        default = outputs.default_prefix(store.project_prefix(sch.project_id), job.id)
        data["output"]["model_uri"] = store.uri(default)
    job.spec = data
    job.output = {} if spec.tuning is not None else {"model_uri": data["output"]["model_uri"]}
    jobs_repo.add_event(s, job.id, "schedule", f"submitted by schedule {sch.name} ({sch.id})")
    s.flush()
    if spec.tuning is not None:
        tuning_repo.start(s, job, spec.tuning)
    return job


def _first_task(job: Job) -> str:
    """A new job's first task: a tuning job's poll step submits its trials; any other job is
    allocated."""
    return queue.POLL if (job.spec or {}).get("tuning") else queue.ALLOCATE


def _request_cancel(s: Session, job_id: str, schedule: str) -> bool:
    """Cancel the live run a Replace slot replaces (service/db/jobs.py request_cancel, as
    POST /v1/jobs/{id}/cancel does): True when a worker must tear its servers down."""
    why = f"cancel requested by schedule {schedule} (concurrency Replace)"
    outcome = jobs_repo.request_cancel(s, job_id, why)
    if outcome is jobs_repo.CancelRequest.BUSY:
        log.warning("job %s changes state too fast to cancel for schedule %s", job_id, schedule)
    return outcome is jobs_repo.CancelRequest.TEARDOWN
