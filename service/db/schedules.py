"""Schedule repository: create, find (by id or name, in one project), list, pause/resume,
delete; the slots a schedule handled (schedule_runs) and the claim of one slot, the insert
whose unique key (schedule_id, fire_time) decides who fires it."""

from __future__ import annotations

import re
import secrets
from datetime import datetime
from typing import Any

from sqlalchemy import delete, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from service.db.models import Job, Schedule, ScheduleRun, iso, utcnow
from service.domain import schedules as dom
from service.domain.errors import Conflict, NotFound
from service.domain.spec import NAME_RE, masked_spec
from service.domain.states import TERMINAL

ID_RE = re.compile(r"^sch-[0-9a-f]{1,36}$")
_NAME = re.compile(NAME_RE)
MAX_RUNS_LIMIT = 200


class ScheduleExists(Conflict):
    code = "schedule_exists"


def new_schedule_id() -> str:
    return "sch-" + secrets.token_hex(8)


def _aware(dt: datetime | None) -> datetime | None:
    return None if dt is None else dom._aware(dt)


def create_schedule(
    s: Session,
    project: str,
    *,
    name: str,
    cron: str,
    timezone: str,
    job: dict[str, Any],
    concurrency: dom.Concurrency,
    catchup: dom.Catchup,
    max_catchup: int,
    paused: bool,
    by: str,
    dataset: str | None = None,
    now: datetime | None = None,
) -> Schedule:
    """A new schedule; slots after `now` (its creation) fire. ScheduleExists (409) when the
    project has one of that name."""
    now = now or utcnow()
    sch = Schedule(
        id=new_schedule_id(),
        project_id=project,
        name=name,
        cron=cron,
        timezone=timezone,
        job=job,
        concurrency=concurrency.value,
        catchup=catchup.value,
        max_catchup=max_catchup,
        paused=paused,
        dataset=dataset,
        handled_until=now,
        next_fire_at=None if paused else dom.next_fire_time(cron, timezone, now),
        created_by=by,
        created_at=now,
        updated_at=now,
    )
    exists = ScheduleExists(
        f"a schedule named {name!r} already exists in this project", details={"schedule": name}
    )
    if s.scalar(select(Schedule.id).where(Schedule.project_id == project, Schedule.name == name)):
        raise exists
    try:
        with s.begin_nested():
            s.add(sch)
    except IntegrityError as e:  # a concurrent create of the same name won
        raise exists from e
    return sch


def find(s: Session, project: str | None, ref: str, *, lock: bool = False) -> Schedule:
    """The schedule with id or name `ref` in `project` (None: any project, by id only), or
    NotFound: another project's schedule is not found either."""
    sch = None
    if ID_RE.match(ref):
        q = select(Schedule).where(Schedule.id == ref)
        if project is not None:
            q = q.where(Schedule.project_id == project)
        sch = s.scalars(q.with_for_update() if lock else q).one_or_none()
    if sch is None and project is not None and _NAME.match(ref):
        q = select(Schedule).where(Schedule.project_id == project, Schedule.name == ref)
        sch = s.scalars(q.with_for_update() if lock else q).one_or_none()
    if sch is None:
        raise NotFound(f"no schedule {ref[:64]!r} in this project", details={"schedule": ref[:64]})
    return sch


def list_schedules(s: Session, project: str | None) -> list[Schedule]:
    q = select(Schedule)
    if project is not None:
        q = q.where(Schedule.project_id == project)
    return list(s.scalars(q.order_by(Schedule.project_id, Schedule.name)))


def set_paused(s: Session, sch: Schedule, paused: bool, now: datetime | None = None) -> bool:
    """Pause or resume; False when it already was. A resumed schedule fires the slots after
    the resume: those that passed while it was paused never fire (they are not caught up)."""
    if sch.paused == paused:
        return False
    now = now or utcnow()
    sch.paused = paused
    sch.updated_at = now
    if paused:
        sch.next_fire_at = None
    else:
        sch.handled_until = now
        sch.next_fire_at = dom.next_fire_time(sch.cron, sch.timezone, now)
    s.flush()
    return True


def delete_schedule(s: Session, sch: Schedule) -> None:
    """The schedule and its slot rows; the jobs it started are left as they are."""
    s.execute(delete(ScheduleRun).where(ScheduleRun.schedule_id == sch.id))
    s.delete(sch)
    s.flush()


def runs(s: Session, schedule_id: str, limit: int = 50) -> list[ScheduleRun]:
    """The slots handled, latest fire time first."""
    q = (
        select(ScheduleRun)
        .where(ScheduleRun.schedule_id == schedule_id)
        .order_by(ScheduleRun.fire_time.desc(), ScheduleRun.id.desc())
        .limit(limit)
    )
    return list(s.scalars(q))


def live_jobs(s: Session, schedule_id: str) -> list[str]:
    """The schedule's jobs that are not finished, oldest slot first."""
    q = (
        select(Job.id)
        .join(ScheduleRun, ScheduleRun.job_id == Job.id)
        .where(
            ScheduleRun.schedule_id == schedule_id,
            Job.state.not_in([t.value for t in TERMINAL]),
        )
        .order_by(ScheduleRun.fire_time, Job.id)
    )
    return list(s.scalars(q))


def due(s: Session, now: datetime, limit: int = 100) -> list[str]:
    """Ids of schedules not paused with a slot due at `now`, the most overdue first."""
    q = (
        select(Schedule.id)
        .where(Schedule.paused.is_(False), Schedule.next_fire_at <= now)
        .order_by(Schedule.next_fire_at)
        .limit(limit)
    )
    return list(s.scalars(q))


def lock_for_firing(s: Session, schedule_id: str) -> Schedule | None:
    """The schedule, locked for this transaction; None when it is gone or another firer holds
    it (PostgreSQL: FOR UPDATE SKIP LOCKED; on SQLite the database's write lock serialises
    firers, and the slot key decides in any case)."""
    q = select(Schedule).where(Schedule.id == schedule_id)
    if s.get_bind().dialect.name == "postgresql":
        q = q.with_for_update(skip_locked=True)
    sch = s.scalars(q).one_or_none()
    if sch is not None:
        s.refresh(sch)  # the locked row's latest committed values, not a cached copy
    return sch


def claim_slot(
    s: Session, schedule_id: str, fire_time: datetime, *, outcome: str, reason: str, missed: int
) -> int | None:
    """Insert the slot's row; its id, or None when the slot is already handled (another
    firer's insert holds the key: on PostgreSQL this waits for that firer's transaction and
    answers None if it committed)."""
    values = {
        "schedule_id": schedule_id,
        "fire_time": fire_time,
        "recorded_at": utcnow(),
        "outcome": outcome,
        "reason": reason,
        "missed": missed,
    }
    dialect = s.get_bind().dialect.name
    stmt: Any
    if dialect == "postgresql":
        stmt = postgresql.insert(ScheduleRun).values(**values)
    elif dialect == "sqlite":
        stmt = sqlite.insert(ScheduleRun).values(**values)
    else:  # pragma: no cover - stackml runs on PostgreSQL or SQLite
        raise RuntimeError(f"unsupported database {dialect}")
    stmt = stmt.on_conflict_do_nothing(index_elements=["schedule_id", "fire_time"])
    run_id = s.execute(stmt.returning(ScheduleRun.id)).scalar_one_or_none()
    return None if run_id is None else int(run_id)


def finish_slot(
    s: Session,
    run_id: int,
    *,
    outcome: str,
    reason: str,
    job_id: str | None,
    dataset_version_id: int | None = None,
    dataset_version: int | None = None,
) -> None:
    values: dict[str, Any] = {"outcome": outcome, "reason": reason, "job_id": job_id}
    if dataset_version_id is not None:
        values.update(dataset_version_id=dataset_version_id, dataset_version=dataset_version)
    s.execute(update(ScheduleRun).where(ScheduleRun.id == run_id).values(**values))


def building(s: Session, schedule_id: str) -> list[ScheduleRun]:
    """The schedule's slots whose dataset is still being rebuilt, oldest first."""
    q = (
        select(ScheduleRun)
        .where(
            ScheduleRun.schedule_id == schedule_id,
            ScheduleRun.outcome == dom.Outcome.BUILDING.value,
        )
        .order_by(ScheduleRun.fire_time)
    )
    return list(s.scalars(q))


def building_slots(s: Session, limit: int = 100) -> list[int]:
    """Ids of slots (of every schedule) waiting for their dataset, oldest first."""
    q = (
        select(ScheduleRun.id)
        .where(ScheduleRun.outcome == dom.Outcome.BUILDING.value)
        .order_by(ScheduleRun.recorded_at, ScheduleRun.id)
        .limit(limit)
    )
    return list(s.scalars(q))


def lock_building_slot(s: Session, run_id: int) -> ScheduleRun | None:
    """The slot, locked for this transaction, if it still waits for its dataset; None when
    another firer holds it or has moved it on (the lock and the outcome decide together: a
    slot's job is created once)."""
    q = select(ScheduleRun).where(
        ScheduleRun.id == run_id, ScheduleRun.outcome == dom.Outcome.BUILDING.value
    )
    if s.get_bind().dialect.name == "postgresql":
        q = q.with_for_update(skip_locked=True)
    row = s.scalars(q).one_or_none()
    if row is not None:
        s.refresh(row)
        if row.outcome != dom.Outcome.BUILDING.value:
            return None
    return row


def advance(s: Session, sch: Schedule, through: datetime) -> None:
    """Every slot up to `through` is handled: the next one is the first after it."""
    sch.handled_until = through
    sch.next_fire_at = None if sch.paused else dom.next_fire_time(sch.cron, sch.timezone, through)
    s.flush()


# -- serialisation ----------------------------------------------------------------------------


def serialize_run(r: ScheduleRun) -> dict[str, Any]:
    return {
        "fire_time": iso(r.fire_time),
        "outcome": r.outcome,
        "reason": r.reason,
        "job_id": r.job_id,
        "missed": r.missed,
        "dataset_version": r.dataset_version,
        "recorded_at": iso(r.recorded_at),
    }


def serialize(
    s: Session, sch: Schedule, *, now: datetime | None = None, detail: bool = False
) -> dict[str, Any]:
    now = now or utcnow()
    upcoming: list[str | None] = []
    if not sch.paused:
        start = max(_aware(sch.handled_until) or now, now)
        upcoming = [iso(t) for t in dom.next_fire_times(sch.cron, sch.timezone, start)]
    last = runs(s, sch.id, 1)
    out: dict[str, Any] = {
        "id": sch.id,
        "project_id": sch.project_id,
        "name": sch.name,
        "cron": sch.cron,
        "timezone": sch.timezone,
        "concurrency": sch.concurrency,
        "catchup": sch.catchup,
        "max_catchup": sch.max_catchup,
        "paused": sch.paused,
        "dataset": sch.dataset,
        "next_fire_at": iso(sch.next_fire_at),
        "next_fire_times": upcoming,
        "last_run": serialize_run(last[0]) if last else None,
        "created_by": sch.created_by,
        "created_at": iso(sch.created_at),
        "updated_at": iso(sch.updated_at),
    }
    if detail:
        out["job"] = masked_spec(sch.job)
        out["live_jobs"] = live_jobs(s, sch.id)
    return out
