"""Job repository: create, read, list, compare-and-set transitions, events, logs, metrics."""

from __future__ import annotations

import enum
import functools
import logging
import secrets
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import (
    BindParameter,
    ColumnElement,
    Select,
    and_,
    bindparam,
    delete,
    func,
    or_,
    select,
    update,
)
from sqlalchemy.orm import Session

from service.backends.interfaces import Flavor
from service.db.models import (
    Job,
    JobEvent,
    JobLabel,
    LogChunk,
    MetricRow,
    ReplicaLogChunk,
    ReplicaMetricRow,
    Resource,
    iso,
    utcnow,
)
from service.domain.cluster import replica_name
from service.domain.errors import InvalidRequest, NotFound
from service.domain.metrics import MetricPoint, inspect_metric_line, points_allowed
from service.domain.spec import JobSpec, stored
from service.domain.states import (
    ACTIVE,
    TERMINAL,
    FailureReason,
    JobState,
    OwnerKind,
    Phase,
    QueueWait,
    ResourceState,
    can_transition,
)

MAX_LIMIT = 200
log = logging.getLogger("stackml.db")


@dataclass(frozen=True)
class Failure:
    phase: Phase
    reason: FailureReason
    message: str


def new_job_id() -> str:
    return "job-" + secrets.token_hex(8)


def create_job(
    s: Session,
    project_id: str,
    spec: JobSpec,
    *,
    trust_id: str | None = None,
    job_id: str | None = None,
    stored_spec: dict[str, Any] | None = None,
    output: dict[str, Any] | None = None,
) -> Job:
    """A new QUEUED job with its labels and its first event. `job_id` (new_job_id) and the
    `stored_spec` and `output` it is inserted with, when the caller derives them from the id:
    one INSERT, no UPDATE after it."""
    now = utcnow()
    job = Job(
        id=job_id or new_job_id(),
        project_id=project_id,
        name=spec.name,
        type=spec.type,
        state=JobState.QUEUED.value,
        spec=stored_spec if stored_spec is not None else stored(spec),
        output=output or {},
        created_at=now,
        updated_at=now,
        last_progress_at=now,
        log_offset=0,
        poll_interval=0.0,
        cancel_requested=False,
        trust_id=trust_id,
    )
    s.add(job)
    s.flush()
    for k, v in spec.labels.items():
        s.add(JobLabel(job_id=job.id, key=k, value=v))
    s.add(
        JobEvent(
            job_id=job.id,
            at=now,
            kind="transition",
            from_state=None,
            to_state=JobState.QUEUED.value,
            message="job submitted",
        )
    )
    return job


def get_job(s: Session, job_id: str, project_id: str | None = None) -> Job:
    """The job, or NotFound; with a project, another project's job is NotFound too."""
    q = select(Job).where(Job.id == job_id)
    if project_id is not None:
        q = q.where(Job.project_id == project_id)
    job = s.scalars(q).one_or_none()
    if job is None:
        raise NotFound(f"job {job_id} not found", details={"job_id": job_id})
    return job


def list_jobs(
    s: Session,
    project_id: str | None,
    *,
    states: Iterable[JobState] = (),
    labels: dict[str, str] | None = None,
    limit: int = 50,
    marker: str | None = None,
) -> tuple[list[Job], str | None]:
    """Newest first; `marker` is the id of the last job of the previous page."""
    q = select(Job)
    if project_id is not None:
        q = q.where(Job.project_id == project_id)
    state_list = [s_.value for s_ in states]
    if state_list:
        q = q.where(Job.state.in_(state_list))
    for k, v in (labels or {}).items():
        q = q.where(
            Job.id.in_(select(JobLabel.job_id).where(JobLabel.key == k, JobLabel.value == v))
        )
    if marker:
        ref = s.scalars(select(Job).where(Job.id == marker)).one_or_none()
        if ref is None or (project_id is not None and ref.project_id != project_id):
            raise InvalidRequest(
                "marker does not name a job of this listing", details={"marker": marker}
            )
        q = q.where(
            or_(
                Job.created_at < ref.created_at,
                and_(Job.created_at == ref.created_at, Job.id < ref.id),
            )
        )
    q = q.order_by(Job.created_at.desc(), Job.id.desc()).limit(limit + 1)
    rows = list(s.scalars(q))
    nxt = rows[limit - 1].id if len(rows) > limit else None
    return rows[:limit], nxt


class CancelRequest(enum.Enum):
    """What asking a job to cancel did (request_cancel)."""

    TEARDOWN = "teardown"  # CANCELLING now: a worker must tear its servers down
    CANCELLED = "cancelled"  # it was QUEUED: CANCELLED at once, nothing to tear down
    ASKED_BEFORE = "asked_before"  # already CANCELLING
    FINISHED = "finished"  # already terminal (or gone)
    BUSY = "busy"  # it changed state under us ten times running


def request_cancel(s: Session, job_id: str, why: str = "cancel requested") -> CancelRequest:
    """Move a live job towards CANCELLED: QUEUED ends CANCELLED at once (via CANCELLING, the
    only way the transition table allows; leftover servers are teardown debts), any other
    live state goes CANCELLING for the cancel task. Each lost race means the job moved on:
    look again. What POST /v1/jobs/{id}/cancel and a schedule's Replace both do."""
    for _ in range(10):
        raw = s.scalar(
            select(Job.state).where(Job.id == job_id).execution_options(populate_existing=True)
        )
        if raw is None:
            return CancelRequest.FINISHED
        state = JobState(raw)
        if state.terminal:
            return CancelRequest.FINISHED
        if state is JobState.CANCELLING:
            return CancelRequest.ASKED_BEFORE
        if not transition(s, job_id, state, JobState.CANCELLING, why, cancel_requested=True):
            continue
        if state is JobState.QUEUED:
            transition(
                s, job_id, JobState.CANCELLING, JobState.CANCELLED, "cancelled before allocation"
            )
            return CancelRequest.CANCELLED
        return CancelRequest.TEARDOWN
    return CancelRequest.BUSY


def transition(
    s: Session,
    job_id: str,
    expected: JobState | Iterable[JobState],
    to: JobState,
    message: str = "",
    *,
    failure: Failure | None = None,
    tuning: bool = False,
    **values: Any,
) -> bool:
    """Compare-and-set the job's state; writes one event. False when the job was not in
    `expected` (another worker moved it first): the caller then does nothing. `tuning`: the
    job is a tuning job, which may also take states.TUNING_EDGES."""
    exp = [expected] if isinstance(expected, JobState) else list(expected)
    exp = [e for e in exp if can_transition(e, to, tuning=tuning)]
    if not exp:
        raise ValueError(f"no allowed transition to {to} from {expected}")
    now = utcnow()
    vals: dict[str, Any] = {
        "state": to.value,
        "updated_at": now,
        "last_progress_at": now,
        # the state's control state ends with it: its step's lease, its SSH failures, its wait
        "step_lease_owner": None,
        "step_lease_until": None,
        "ssh_failing_since": None,
        "queue_wait": None,
    }
    if to is JobState.RUNNING:
        # the first start: max_runtime_seconds bounds the whole job, restarts included
        vals["started_at"] = func.coalesce(Job.started_at, now)
    if to in TERMINAL:
        vals["finished_at"] = now
    if failure is not None:
        vals.update(
            failure_phase=failure.phase.value,
            failure_reason=str(failure.reason),
            failure_message=failure.message,
        )
    vals.update(values)
    for src in exp:
        res = s.execute(update(Job).where(Job.id == job_id, Job.state == src.value).values(**vals))
        if res.rowcount == 1:  # type: ignore[attr-defined]
            msg = message or (failure.message if failure else "")
            s.add(
                JobEvent(
                    job_id=job_id,
                    at=now,
                    kind="transition",
                    from_state=src.value,
                    to_state=to.value,
                    message=msg,
                )
            )
            s.flush()
            return True
    return False


def add_event(
    s: Session, job_id: str, kind: str, message: str, *, replica: int | None = None
) -> None:
    """An event of the job's timeline; `replica` (k >= 1): about replica `worker-<k>`."""
    s.add(JobEvent(job_id=job_id, at=utcnow(), kind=kind, message=message, replica=replica))


def touch(s: Session, job_id: str, **values: Any) -> None:
    """Record progress (the reconciler re-drives jobs whose progress stalls)."""
    s.execute(update(Job).where(Job.id == job_id).values(last_progress_at=utcnow(), **values))


def events(s: Session, job_id: str) -> list[JobEvent]:
    return list(s.scalars(select(JobEvent).where(JobEvent.job_id == job_id).order_by(JobEvent.id)))


def append_log(
    s: Session, job_id: str, offset: int, data: bytes, *, max_points: int | None = None
) -> int:
    """Store log bytes pulled from `offset`; each byte once (compare-and-set on log_offset).
    Metric lines among them become points, at most `max_points` per job (None: no cap);
    whatever a metric line holds, the bytes are stored (metrics go in a savepoint).

    Two pulls of one job may overlap: a redelivered poll, or a poll re-driven beside a late
    one. The log file only grows, so the bytes at an offset are the same in every pull: a call
    that finds the offset already moved into its bytes stores the rest past it. (Storing
    nothing there lost the bytes the other pull had not reached, when this pull was the one
    that saw the trainer's exit and moved the job on.)

    Returns the job's log offset after the call: at least `offset + len(data)`."""
    if not data:
        return offset
    end = offset + len(data)
    offset, data = _claim(
        s, Job.log_offset, Job.id == job_id, offset, data, last_progress_at=utcnow()
    )
    if not data:
        return offset  # all of it stored before (or the job is gone)
    s.add(LogChunk(job_id=job_id, offset=offset, data=data))
    s.flush()
    try:
        with s.begin_nested():
            _ingest_metrics(s, job_id, offset, data, max_points)
    except Exception as e:  # noqa: BLE001 - trainer output never costs the log its bytes
        log.warning("job %s: metrics at log offset %d not stored: %s", job_id, offset, e)
        add_event(s, job_id, "metrics", f"metric lines at log offset {offset} skipped: {e!s:.200}")
    return end


def _claim(
    s: Session,
    column: Any,
    row: ColumnElement[bool],
    offset: int,
    data: bytes,
    **values: Any,
) -> tuple[int, bytes]:
    """Move `row`'s log offset `column` from `offset` past `data` (compare-and-set, `values`
    set with it): the (offset, bytes) of `data` this call is to store. Where another pull moved
    the offset into `data` first, the rest past it (a log file only grows: the bytes at an
    offset are the same in every pull); none, at the row's offset, when it stored them all."""
    end = offset + len(data)
    table = column.class_
    while True:
        res = s.execute(
            update(table).where(row, column == offset).values({column.key: end, **values})
        )
        if res.rowcount == 1:  # type: ignore[attr-defined]
            return offset, data
        cur = int(s.scalar(select(column).where(row)) or 0)
        if not offset < cur < end:
            return cur, b""
        data, offset = data[cur - offset :], cur


def _replica_name(s: Session, job_id: str, replica: int) -> str:
    job = s.get(Job, job_id)
    shape = None if job is None else JobSpec.model_validate(job.spec).shape()
    return replica_name(replica, shape)


def _ingest_metrics(
    s: Session, job_id: str, offset: int, data: bytes, max_points: int | None, replica: int = 0
) -> None:
    """The metric lines of log bytes stored at `offset` of the chief's log (`metrics`), or of
    replica k's (`replica_metrics`); at most `max_points` per log."""
    # a line cut between two pulls is completed with the stored bytes before `offset`;
    # the last, unterminated piece waits for the next pull
    prefix = _partial_line_before(s, job_id, offset, replica)
    pos = offset - len(prefix)
    points: list[tuple[int, MetricPoint]] = []
    problems: list[str] = []
    for raw in (prefix + data).split(b"\n")[:-1]:
        line_off = pos
        pos += len(raw) + 1
        parsed = inspect_metric_line(raw)
        points.extend((line_off, p) for p in parsed.points)
        problems.extend(parsed.problems)
    if problems:
        log.info("job %s: %d metric problems, first: %s", job_id, len(problems), problems[0])
    if not points:
        return
    if max_points is not None:
        if replica:
            held = select(func.count()).where(
                ReplicaMetricRow.job_id == job_id, ReplicaMetricRow.replica == replica
            )
        else:
            held = select(func.count()).where(MetricRow.job_id == job_id)
        stored = s.scalar(held) or 0
        room = points_allowed(stored, max_points)
        if len(points) > room:
            if stored < max_points or not _capped(s, job_id, replica):
                whose = (
                    f"replica {_replica_name(s, job_id, replica)}'s log" if replica else "the job"
                )
                add_event(
                    s,
                    job_id,
                    METRICS_CAPPED,
                    f"{whose} holds max_metric_points={max_points} metric points; "
                    "later points are not stored (its log keeps every line)",
                    replica=replica or None,
                )
            points = points[:room]
    now = utcnow()
    for line_off, p in points:
        row = dict(
            job_id=job_id,
            name=p.name,
            value=p.value,
            step=p.step,
            epoch=p.epoch,
            log_offset=line_off,
            at=now,
        )
        s.add(ReplicaMetricRow(replica=replica, **row) if replica else MetricRow(**row))
    s.flush()


METRICS_CAPPED = "metrics_capped"


def _capped(s: Session, job_id: str, replica: int = 0) -> bool:
    q = select(JobEvent.id).where(JobEvent.job_id == job_id, JobEvent.kind == METRICS_CAPPED)
    q = q.where(JobEvent.replica == replica if replica else JobEvent.replica.is_(None))
    return s.scalars(q.limit(1)).first() is not None


def _partial_line_before(s: Session, job_id: str, offset: int, replica: int = 0) -> bytes:
    """The bytes after the last newline before `offset` (a line cut between two pulls) of
    the chief's log, or of replica k's."""
    if offset == 0:
        return b""
    if replica:
        q: Any = select(ReplicaLogChunk).where(
            ReplicaLogChunk.job_id == job_id,
            ReplicaLogChunk.replica == replica,
            ReplicaLogChunk.offset < offset,
        )
        q = q.order_by(ReplicaLogChunk.offset.desc())
    else:
        q = select(LogChunk).where(LogChunk.job_id == job_id, LogChunk.offset < offset)
        q = q.order_by(LogChunk.offset.desc())
    prev = s.scalars(q.limit(1)).one_or_none()
    if prev is None:
        return b""
    nl = prev.data.rfind(b"\n")
    return prev.data[nl + 1 :] if nl >= 0 else b""


def read_log(
    s: Session, job_id: str, offset: int = 0, limit: int = 1 << 20, *, replica: int = 0
) -> tuple[bytes, int]:
    """Stored log bytes from `offset` (at most `limit`), and the offset after them: the
    chief's log (replica 0), or replica k's (append_replica_log)."""
    if replica:
        chunks: Iterable[LogChunk | ReplicaLogChunk] = s.scalars(
            select(ReplicaLogChunk)
            .where(
                ReplicaLogChunk.job_id == job_id,
                ReplicaLogChunk.replica == replica,
                ReplicaLogChunk.offset + func.length(ReplicaLogChunk.data) > offset,
            )
            .order_by(ReplicaLogChunk.offset)
        )
    else:
        chunks = s.scalars(
            select(LogChunk)
            .where(LogChunk.job_id == job_id, LogChunk.offset + func.length(LogChunk.data) > offset)
            .order_by(LogChunk.offset)
        )
    out = bytearray()
    for c in chunks:
        skip = max(0, offset - c.offset)
        out += c.data[skip:]
        if len(out) >= limit:
            break
    data = bytes(out[:limit])
    return data, offset + len(data)


def append_replica_log(
    s: Session,
    job_id: str,
    replica: int,
    resource_id: int,
    file_offset: int,
    data: bytes,
    *,
    max_points: int | None = None,
) -> bool:
    """Store bytes pulled from `file_offset` of the log file on replica `replica`'s server
    (resource `resource_id`) at the end of that replica's log; each byte once (CAS on the
    resource's log_offset; of a pull that overlaps one stored before, the rest past it, as
    append_log does). Its metric lines become that replica's points (as append_log's). False
    when another poll stored them all first."""
    if not data:
        return False
    _, data = _claim(s, Resource.log_offset, Resource.id == resource_id, file_offset, data)
    if not data:
        return False  # another poll stored them all
    end = s.scalar(
        select(func.max(ReplicaLogChunk.offset + func.length(ReplicaLogChunk.data))).where(
            ReplicaLogChunk.job_id == job_id, ReplicaLogChunk.replica == replica
        )
    )
    at = int(end or 0)
    s.add(ReplicaLogChunk(job_id=job_id, replica=replica, offset=at, data=data))
    s.flush()
    try:
        with s.begin_nested():
            _ingest_metrics(s, job_id, at, data, max_points, replica)
    except Exception as e:  # noqa: BLE001 - trainer output never costs the log its bytes
        log.warning(
            "job %s: replica %d's metrics at offset %d not stored: %s", job_id, replica, at, e
        )
    return True


def log_tail(s: Session, job_id: str, lines: int = 20) -> str:
    job = get_job(s, job_id)
    start = max(0, job.log_offset - 16384)
    data, _ = read_log(s, job_id, start)
    text = data.decode("utf-8", "replace")
    return "\n".join(text.rstrip("\n").splitlines()[-lines:])


def metrics(s: Session, job_id: str, replica: int = 0) -> dict[str, list[dict[str, Any]]]:
    """The job's metric series by name: the chief's (the job's own), or replica k's."""
    series: dict[str, list[dict[str, Any]]] = {}
    rows: Iterable[MetricRow | ReplicaMetricRow]
    if replica:
        rows = s.scalars(
            select(ReplicaMetricRow)
            .where(ReplicaMetricRow.job_id == job_id, ReplicaMetricRow.replica == replica)
            .order_by(ReplicaMetricRow.log_offset, ReplicaMetricRow.id)
        )
    else:
        rows = s.scalars(
            select(MetricRow)
            .where(MetricRow.job_id == job_id)
            .order_by(MetricRow.log_offset, MetricRow.id)
        )
    for m in rows:
        series.setdefault(m.name, []).append(
            {"value": m.value, "step": m.step, "epoch": m.epoch, "at": iso(m.at)}
        )
    return series


def latest_metrics(s: Session, job_id: str) -> dict[str, float]:
    """The last value of each metric (what a job's summary shows): one row per name, not the
    whole series (a job may hold max_metric_points of them)."""
    return latest_metrics_of(s, [job_id]).get(job_id, {})


def latest_metrics_of(s: Session, job_ids: Sequence[str]) -> dict[str, dict[str, float]]:
    """latest_metrics of many jobs in one grouped query: per job id (absent when the job has
    no metrics), the value of each metric name at its highest log offset, names sorted.

    (job_id, log_offset, name) is unique, so the highest offset names one row; grouping and
    joining back on it hashes the rows where ranking them with a window sorts them all."""
    if not job_ids:
        return {}
    by_job: dict[str, list[tuple[str, float]]] = {}
    for job_id, name, value in s.execute(_latest_metrics_query(), {"ids": list(job_ids)}):
        by_job.setdefault(job_id, []).append((name, value))
    return {job_id: dict(sorted(pairs)) for job_id, pairs in by_job.items()}


@functools.cache
def _latest_metrics_query() -> Select[str, str, float]:
    """latest_metrics_of's statement, built once (every GET of a job runs it): `ids` is bound
    at execution, expanded to the list's length."""
    ids: BindParameter[list[str]] = bindparam("ids", expanding=True)
    last = (
        select(
            MetricRow.job_id,
            MetricRow.name,
            func.max(MetricRow.log_offset).label("log_offset"),
        )
        .where(MetricRow.job_id.in_(ids))
        .group_by(MetricRow.job_id, MetricRow.name)
        .subquery()
    )
    # the page's ids on the outer side too: PostgreSQL then reads only their rows
    return (
        select(MetricRow.job_id, MetricRow.name, MetricRow.value)
        .join(
            last,
            and_(
                MetricRow.job_id == last.c.job_id,
                MetricRow.name == last.c.name,
                MetricRow.log_offset == last.c.log_offset,
            ),
        )
        .where(MetricRow.job_id.in_(ids))
    )


def resources(s: Session, job_id: str) -> list[Resource]:
    return list(s.scalars(select(Resource).where(Resource.job_id == job_id).order_by(Resource.id)))


def resources_of(s: Session, job_ids: Sequence[str]) -> dict[str, list[Resource]]:
    """resources of many jobs in one query: per job id (absent when it has none), its
    servers in the order `resources` gives them."""
    if not job_ids:
        return {}
    out: dict[str, list[Resource]] = {}
    q = select(Resource).where(Resource.job_id.in_(list(job_ids))).order_by(Resource.id)
    for r in s.scalars(q):
        if r.job_id is not None:
            out.setdefault(r.job_id, []).append(r)
    return out


def owned_resources(s: Session, owner_kind: OwnerKind, owner_id: str) -> list[Resource]:
    """The servers of one owner (a job today; a model-serving endpoint the same way)."""
    q = select(Resource).where(
        Resource.owner_kind == owner_kind.value, Resource.owner_id == owner_id
    )
    return list(s.scalars(q.order_by(Resource.id)))


def trust_debts(s: Session, limit: int = 100) -> list[tuple[str, str]]:
    """(job id, trust id) of terminal jobs whose servers are all gone but whose Keystone trust
    is not yet deleted."""
    live = select(Resource.id).where(
        Resource.job_id == Job.id, Resource.state != ResourceState.DELETED.value
    )
    rows = s.execute(
        select(Job.id, Job.trust_id)
        .where(
            Job.trust_id.is_not(None),
            Job.state.in_([t.value for t in TERMINAL]),
            ~live.exists(),
        )
        # in random order: one trust that keeps failing does not hold up the others
        .order_by(func.random())
        .limit(limit)
    ).all()
    return [(job_id, trust_id) for job_id, trust_id in rows if trust_id is not None]


def debts(s: Session, limit: int = 100) -> list[Resource]:
    """Resources of terminal jobs that are not yet deleted (but an evaluation gate's server
    while its evaluation is not DONE: service/db/evaluations.py)."""
    from service.db import evaluations

    return list(
        s.scalars(
            select(Resource)
            .join(Job, Job.id == Resource.job_id)
            .where(
                Job.state.in_([t.value for t in TERMINAL]),
                Resource.state != ResourceState.DELETED.value,
                ~and_(Resource.role == evaluations.ROLE, evaluations.unfinished_of_job()),
            )
            .order_by(Resource.id)
            .limit(limit)
        )
    )


def stalled_jobs(s: Session, before: datetime, limit: int = 100) -> list[Job]:
    """Active jobs with no progress since `before` that something should move on: not those a
    step holds (a live lease), nor those admission keeps parked (it admits them itself)."""
    now = utcnow()
    return list(
        s.scalars(
            select(Job)
            .where(
                Job.state.in_([a.value for a in ACTIVE]),
                Job.last_progress_at < before,
                or_(Job.step_lease_until.is_(None), Job.step_lease_until < now),
                or_(Job.queue_wait.is_(None), Job.queue_wait != QueueWait.PARKED.value),
            )
            .order_by(Job.last_progress_at)
            .limit(limit)
        )
    )


def delete_job(s: Session, job_id: str) -> None:
    for model in (
        LogChunk,
        ReplicaLogChunk,
        MetricRow,
        ReplicaMetricRow,
        JobEvent,
        JobLabel,
        Resource,
    ):
        s.execute(delete(model).where(model.job_id == job_id))
    s.execute(delete(Job).where(Job.id == job_id))


def serialize_job(
    s: Session, job: Job, *, flavors: Mapping[str, Flavor] | None = None
) -> dict[str, Any]:
    """The job as GET /v1/jobs/{id} returns it (docs/api.md); `usage` prices its servers'
    time with `flavors` (default: the configured catalogue, service.db.quotas.flavor_table)."""
    from service.db import tuning

    out = _serialized(job, resources(s, job.id), latest_metrics(s, job.id), flavors)
    block = tuning.summary(s, job)
    if block is not None:
        out["tuning"] = block
    return out


def serialize_new_job(job: Job) -> dict[str, Any]:
    """A job created in this transaction as serialize_job shows it, without its queries: it
    has no servers, no metrics and (a tuning job) no trials yet."""
    out = _serialized(job, [], {}, {})
    if (job.spec or {}).get("tuning"):
        from service.db import tuning

        out["tuning"] = tuning.empty_summary(job)
    return out


def serialize_jobs(
    s: Session, jobs: Sequence[Job], *, flavors: Mapping[str, Flavor] | None = None
) -> list[dict[str, Any]]:
    """Each job as serialize_job shows it, in a number of queries that does not grow with
    the jobs: their servers in one, their latest metric values in another; the flavor
    catalogue (default as serialize_job's) is read once, and only when a server of one of
    them has run (nothing else needs it)."""
    ids = [j.id for j in jobs]
    servers = resources_of(s, ids)
    latest = latest_metrics_of(s, ids)
    if flavors is None and any(r.active_at is not None for rs in servers.values() for r in rs):
        from service.db import quotas

        flavors = quotas.flavor_table()
    return [_serialized(j, servers.get(j.id, []), latest.get(j.id, {}), flavors) for j in jobs]


def _serialized(
    job: Job,
    servers: Sequence[Resource],
    metrics: dict[str, float],
    flavors: Mapping[str, Flavor] | None,
) -> dict[str, Any]:
    from service.db import quotas

    failure = None
    if job.failure_reason:
        failure = {
            "phase": job.failure_phase,
            "reason": job.failure_reason,
            "message": job.failure_message,
        }
    if flavors is None and any(r.active_at is not None for r in servers):
        flavors = quotas.flavor_table()  # once for the job and each of its servers
    return {
        "id": job.id,
        "name": job.name,
        "project_id": job.project_id,
        "type": job.type,
        "state": job.state,
        "failure": failure,
        "spec": job.spec,
        "created_at": iso(job.created_at),
        "started_at": iso(job.started_at),
        "finished_at": iso(job.finished_at),
        "resources": [
            {
                "name": r.name,
                "server_id": r.server_id,
                "backend": r.backend,
                "role": r.role,
                "flavor": r.flavor,
                "state": r.state,
                "created_at": iso(r.created_at),
                "deleted_at": iso(r.deleted_at),
                "usage": quotas.job_usage([r], flavors).as_dict(),  # this server's share
            }
            for r in servers
        ],
        "output": job.output or {},
        "metrics": metrics,
        "cancel_requested": job.cancel_requested,
        "queue_reason": job.queue_reason,
        "restarts": job.restarts or 0,
        "usage": quotas.job_usage(servers, flavors).as_dict(),
        # a tuning trial: its tuning job and number (None for any other job)
        "parent_id": job.parent_id,
        "trial": job.trial,
    }
