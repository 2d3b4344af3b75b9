"""The job pipeline in one table: for each active state, the task that advances it, the step
module that task runs, the phase a failure there is charged to, the task's time limits, and
whether the step holds a lease while it runs. `workers/tasks.py` registers its tasks from it
and the reconciler re-drives stalled jobs by it.

The lease (jobs.step_lease_owner / step_lease_until): a leased step takes it when it starts
(compare-and-set: free, lapsed, or already its own) and renews it from a heartbeat thread
every third of its time to live while it runs; the reconciler re-drives no job whose lease is
live, and a second task of the same step finds the lease taken and returns at once. A worker
killed mid-step stops renewing: the lease lapses after `lease_ttl` and the reconciler re-drives
the job as before. A transition clears the lease (the next state's step takes its own).
"""

from __future__ import annotations

import logging
import secrets
import threading
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy import ColumnElement, or_, update
from sqlalchemy.orm import Session

from service import queue
from service.config import Settings
from service.db.models import Endpoint, Job, ModelEvaluation, utcnow
from service.db.session import session_scope
from service.domain.states import PHASE_OF_STATE, JobState, Phase

log = logging.getLogger("stackml.worker")


@dataclass(frozen=True)
class Step:
    state: JobState
    task: str  # the Celery task name (service.queue)
    step: str  # the module under workers/steps that does the work
    phase: Phase  # where a failure in this state is charged
    time_limit: int  # seconds: the task is killed past it
    soft_time_limit: int
    leased: bool  # holds a lease (heartbeat) while it runs: a long step, never run twice
    server: bool  # works on the job's booted server (open_step gives it an SSH target)


_S = JobState
# (state, task, step, phase, (time limit, soft time limit), leased, server)
_ROWS = (
    (_S.QUEUED, queue.ALLOCATE, "allocate", Phase.ADMIT, (180, 150), False, False),
    (_S.ALLOCATING, queue.ALLOCATE, "allocate", Phase.ALLOCATE, (180, 150), False, False),
    (_S.PROVISIONING, queue.PROVISION, "provision", Phase.PROVISION, (600, 540), True, True),
    (_S.RUNNING, queue.POLL, "poll", Phase.TRAIN, (90, 75), False, True),
    (_S.EXPORTING, queue.EXPORT, "export", Phase.EXPORT, (600, 540), True, True),
    (_S.CANCELLING, queue.CANCEL, "teardown", Phase.TEARDOWN, (180, 150), False, False),
)
PIPELINE: dict[JobState, Step] = {
    state: Step(state, task, step, phase, hard, soft, leased, server)
    for state, task, step, phase, (hard, soft), leased, server in _ROWS
}

# tasks that advance no state of their own: (time_limit, soft_time_limit)
TEARDOWN_LIMITS = (180, 150)
RECONCILE_LIMITS = (120, 100)

assert {s: p.phase for s, p in PIPELINE.items()} == PHASE_OF_STATE


def limits(task: str) -> tuple[int, int]:
    """(time_limit, soft_time_limit) of a task by name."""
    for step in PIPELINE.values():
        if step.task == task:
            return step.time_limit, step.soft_time_limit
    return {queue.TEARDOWN: TEARDOWN_LIMITS, queue.RECONCILE: RECONCILE_LIMITS}[task]


def next_task(state: JobState) -> str:
    return PIPELINE[state].task


def lease_ttl(cfg: Settings) -> float:
    """How long a lease lives without a heartbeat: the reconciler's `stuck_after`, so that a
    killed worker's step is re-driven as soon after its death as a lost message would be."""
    return max(1.0, cfg.stuck_after)


def no_live_lease() -> ColumnElement[bool]:
    """The SQL condition "no step holds the job" (for the reconciler's queries)."""
    return lease_free(Job)


# -- a row's step lease: jobs' (here) and endpoints' (workers/steps/serve.py) -----------------

LeasedTable = type[Job] | type[Endpoint] | type[ModelEvaluation]


def lease_free(table: LeasedTable) -> ColumnElement[bool]:
    """The SQL condition "no step holds this row" (never leased, or the lease lapsed)."""
    return or_(table.step_lease_until.is_(None), table.step_lease_until < utcnow())


def take_row_lease(
    s: Session, table: LeasedTable, row_id: str, ttl: float, *where: ColumnElement[bool]
) -> str | None:
    """Lease the row for `ttl` seconds when no step holds it and `where` holds: the new owner
    token, or None."""
    owner = secrets.token_hex(8)
    won = s.execute(
        update(table)
        .where(table.id == row_id, *where, lease_free(table))
        .values(step_lease_owner=owner, step_lease_until=utcnow() + timedelta(seconds=ttl))
    ).rowcount  # type: ignore[attr-defined]
    return owner if won else None


def renew_row_lease(s: Session, table: LeasedTable, row_id: str, owner: str, ttl: float) -> bool:
    """Extend a lease still held by `owner`; False once it was lost."""
    won = s.execute(
        update(table)
        .where(table.id == row_id, table.step_lease_owner == owner)
        .values(step_lease_until=utcnow() + timedelta(seconds=ttl))
    ).rowcount  # type: ignore[attr-defined]
    return bool(won)


def release_row_lease(s: Session, table: LeasedTable, row_id: str, owner: str) -> None:
    s.execute(
        update(table)
        .where(table.id == row_id, table.step_lease_owner == owner)
        .values(step_lease_owner=None, step_lease_until=None)
    )


@contextmanager
def lease_heartbeat(
    ttl: float,
    renew: Callable[[], bool],
    release: Callable[[], None],
    *,
    what: str,
    lease_name: str,
    thread_name: str,
    warn_lost: bool,
) -> Iterator[None]:
    """Call `renew` every third of `ttl` until the block ends, then `release`. A renewal that
    fails for a moment (the database restarting) is tried again at the next beat; one that
    finds the lease lost stops the heartbeat (logged when `warn_lost`). Log lines read
    "<what>: could not renew <lease_name>: <error>"."""
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(ttl / 3):
            try:
                if not renew():
                    if warn_lost:
                        log.warning("%s: %s was lost", what, lease_name)
                    return
            except Exception as e:  # noqa: BLE001 - the next beat tries again
                log.warning("%s: could not renew %s: %s", what, lease_name, e)

    t = threading.Thread(target=beat, name=thread_name, daemon=True)
    t.start()
    try:
        yield
    finally:
        stop.set()
        t.join(timeout=5)
        try:
            release()
        except Exception as e:  # noqa: BLE001 - an unreleased lease lapses by itself
            log.warning("%s: could not release %s: %s", what, lease_name, e)


# -- a job's step lease -----------------------------------------------------------------------


@dataclass(frozen=True)
class Lease:
    job_id: str
    owner: str
    ttl: float


def take_lease(url: str, job_id: str, state: JobState, ttl: float) -> Lease | None:
    """The job's lease for a step of `state`, or None when another step holds it (or the job
    left `state`)."""
    with session_scope(url) as s:
        owner = take_row_lease(s, Job, job_id, ttl, Job.state == state.value)
    return Lease(job_id, owner, ttl) if owner else None


def renew_lease(url: str, lease: Lease) -> bool:
    """Extend a lease still held by its owner; False once it was lost (lapsed and taken, or
    cleared by a transition)."""
    with session_scope(url) as s:
        return renew_row_lease(s, Job, lease.job_id, lease.owner, lease.ttl)


def release_lease(url: str, lease: Lease) -> None:
    with session_scope(url) as s:
        release_row_lease(s, Job, lease.job_id, lease.owner)


def heartbeat(url: str, lease: Lease) -> AbstractContextManager[None]:
    """Renew `lease` every third of its time to live until the block ends, then release it
    (lease_heartbeat)."""
    return lease_heartbeat(
        lease.ttl,
        lambda: renew_lease(url, lease),
        lambda: release_lease(url, lease),
        what=f"job {lease.job_id}",
        lease_name="the step's lease",
        thread_name=f"lease-{lease.job_id}",
        warn_lost=True,
    )
