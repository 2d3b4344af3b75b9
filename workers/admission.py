"""Admission: which QUEUED jobs may start, fairly across projects, within their projects' quotas
and the platform's server cap; moves the chosen ones to ALLOCATING and says why the rest wait.

Every decision is taken under one lock (`lock`) from one fair order over the whole queue
(service/domain/quota.py), and applies all of it at once: the chosen jobs move QUEUED ->
ALLOCATING in that order, so racing workers can neither exceed a quota nor start a job ahead of
one before it. It runs in the allocate step of any queued job (workers/steps/allocate.py
`_admit`), in the reconciler every interval, and after every teardown (`admit_waiting`).

Every decision parks every job it leaves waiting (QUEUED with queue_wait 'parked' and the
reason), fresh ones too: a fresh job's own allocate step, on its way, then finds it parked and
ends at once, instead of taking the whole decision again (in a burst, the queue's every job
would). Who advances a job admitted on someone else's turn: a parked job is advanced by the
allocate step admission enqueues for it (a fresh job parked by another's decision and admitted
before its own step ran gets a second step: allocate claims its boot by compare-and-set, so two
runs boot one server); any other queued job (fresh from submission, or back from a backoff)
has its own step coming, which finds it ALLOCATING.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from sqlalchemy import insert, select, update
from sqlalchemy.orm import Session

from service import queue
from service.backends.interfaces import Flavor
from service.db import jobs as repo
from service.db import quotas
from service.db.models import Job, JobEvent, utcnow
from service.domain.errors import BackendError
from service.domain.quota import CAPACITY_WAIT, QUOTA_WAIT, Decision, decide
from service.domain.states import JobState, QueueWait
from workers import jobctx
from workers.jobctx import db, log

HOLDS_SERVER = quotas.HOLDS_SERVER
WAITING = "waiting"  # every reason admission writes starts with it (prose for people)
__all__ = ["CAPACITY_WAIT", "HOLDS_SERVER", "QUOTA_WAIT", "admit", "admit_waiting", "lock"]

Describe = Callable[[Job], str]


def lock(s: Session) -> None:
    """Serialise admissions for the rest of this transaction."""
    quotas.lock(s)


def flavors() -> Mapping[str, Flavor]:
    try:
        return quotas.flavor_table(jobctx.settings())
    except BackendError as e:  # GPU counts unknown for a moment: count servers and jobs only
        log.warning("admission without the flavor catalogue: %s", e)
        return {}


def decision(s: Session) -> tuple[Decision, quotas.AdmissionView]:
    """The admission decision over the whole queue; call under `lock`."""
    cfg = jobctx.settings()
    view = quotas.admission_view(s, cfg, flavors())
    return (
        decide(
            [r.queued for r in view.queue],
            view.in_use,
            lambda p: view.limits.get(p) or quotas.defaults(cfg),
            last_admitted=view.last_admitted,
            capacity=cfg.max_servers or None,
            servers_in_use=quotas.servers_in_use(view.in_use),
        ),
        view,
    )


@dataclass
class Admitted:
    """What one admission pass did: `admitted` moved to ALLOCATING (in fair order), of which
    `enqueue` need an allocate step (after the commit); `waiting` says why the others wait (each
    is parked with its reason)."""

    admitted: list[str] = field(default_factory=list)
    enqueue: list[str] = field(default_factory=list)
    waiting: dict[str, str] = field(default_factory=dict)


def admit(s: Session, describe: Describe) -> Admitted:
    """Take the decision and apply it: admit the chosen jobs, refresh parked jobs' reasons.
    Call under `lock`; `describe(job)` is the admission event's message."""
    d, view = decision(s)
    current = {r.queued.job_id: r.reason for r in view.queue}
    parked_ids = set(
        s.scalars(
            select(Job.id).where(
                Job.state == JobState.QUEUED.value, Job.queue_wait == QueueWait.PARKED.value
            )
        )
    )
    out = Admitted(waiting=dict(d.waiting))
    if d.admit:
        jobs = {j.id: j for j in s.scalars(select(Job).where(Job.id.in_(d.admit)))}
        for job_id in d.admit:
            job = jobs[job_id]
            parked = job_id in parked_ids
            if repo.transition(
                s,
                job_id,
                JobState.QUEUED,
                JobState.ALLOCATING,
                describe(job),
                queue_reason=None,
                not_before=None,
            ):
                quotas.record_admission(s, job.project_id)
                out.admitted.append(job_id)
                if parked:
                    out.enqueue.append(job_id)
    # fresh jobs and parked ones whose reason changed (the others stay as they are)
    park_all(
        s,
        {j: why for j, why in d.waiting.items() if j not in parked_ids or current.get(j) != why},
        current,
    )
    return out


def park_all(s: Session, reasons: Mapping[str, str], current: Mapping[str, str | None]) -> None:
    """Park each job of `reasons` still QUEUED with its reason, in one statement a reason; a
    timeline event where the reason differs from `current` (what the decision read). The rows
    are not loaded: a burst parks hundreds of jobs in one decision."""
    now = utcnow()
    by_reason: dict[str, list[str]] = {}
    for job_id, why in reasons.items():
        by_reason.setdefault(why, []).append(job_id)
    for why, ids in by_reason.items():
        moved = s.scalars(
            update(Job)
            .where(Job.id.in_(ids), Job.state == JobState.QUEUED.value)
            .values(queue_wait=QueueWait.PARKED.value, queue_reason=why, last_progress_at=now)
            .returning(Job.id)
            .execution_options(synchronize_session=False)
        ).all()
        events = [
            {"job_id": j, "at": now, "kind": "waiting", "message": why}
            for j in moved
            if current.get(j) != why
        ]
        if events:
            s.execute(insert(JobEvent), events)


def park(s: Session, job: Job, reason: str) -> None:
    """Keep `job` QUEUED with `reason`; the timeline gets an event when the reason changes."""
    job.queue_wait = QueueWait.PARKED.value
    if job.queue_reason != reason:
        job.queue_reason = reason
        repo.add_event(s, job.id, "waiting", reason)
    # on the loaded row, not repo.touch's UPDATE: that one re-evaluates its criteria against
    # every object in the session, and admission parks many jobs loaded in one session
    job.last_progress_at = utcnow()


def admit_waiting() -> list[str]:
    """Admit what the queue now allows (servers freed, quotas raised); the jobs admitted.
    With no job QUEUED it takes no lock and reads nothing more (every teardown calls it): a job
    queued after that look is admitted by its own allocate step, which sees what was freed."""
    from workers.steps.allocate import booting_message

    with db() as s:
        queued = select(Job.id).where(Job.state == JobState.QUEUED.value).limit(1)
        if s.scalars(queued).first() is None:
            return []
        lock(s)
        done = admit(s, booting_message)
    for job_id in done.enqueue:
        jobctx.next_step(queue.ALLOCATE, job_id)
    return done.admitted
