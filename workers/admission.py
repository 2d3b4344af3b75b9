"""Admission: when servers free up, hand the oldest jobs waiting for capacity to allocate."""

from __future__ import annotations

from sqlalchemy import func, or_, select, text
from sqlalchemy.orm import Session

from service import queue
from service.db.models import Job, Resource
from service.domain.states import JobState, ResourceState
from workers import jobctx
from workers.jobctx import db

CAPACITY_WAIT = "waiting for capacity"
HOLDS_SERVER = (
    JobState.ALLOCATING,
    JobState.PROVISIONING,
    JobState.RUNNING,
    JobState.EXPORTING,
    JobState.CANCELLING,
)
_LOCK_KEY = 0x57AC  # one admission at a time across workers (PostgreSQL advisory lock)


def lock(s: Session) -> None:
    """Serialise admissions for the rest of this transaction."""
    if s.get_bind().dialect.name == "postgresql":
        s.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _LOCK_KEY})


def servers_in_use(s: Session) -> int:
    """Jobs that hold (or are getting, or still owe the deletion of) a server."""
    owing = select(Resource.job_id).where(Resource.state != ResourceState.DELETED.value)
    return int(
        s.scalar(
            select(func.count())
            .select_from(Job)
            .where(or_(Job.state.in_([st.value for st in HOLDS_SERVER]), Job.id.in_(owing)))
        )
        or 0
    )


def admit_waiting() -> list[str]:
    """Enqueue allocate for as many capacity-waiting jobs as there are free server slots."""
    cap = jobctx.settings().max_servers
    if not cap:
        return []
    with db() as s:
        in_use = (
            s.scalar(
                select(func.count())
                .select_from(Resource)
                .where(Resource.state != ResourceState.DELETED.value)
            )
            or 0
        )
        free = cap - in_use
        if free <= 0:
            return []
        ids = list(
            s.scalars(
                select(Job.id)
                .where(
                    Job.state == JobState.QUEUED.value, Job.queue_reason.startswith(CAPACITY_WAIT)
                )
                .order_by(Job.created_at, Job.id)
                .limit(free)
            )
        )
    for job_id in ids:
        jobctx.next_step(queue.ALLOCATE, job_id)
    return ids
