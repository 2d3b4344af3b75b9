"""Quota repository: per-project limits and overrides, what projects hold, the admission queue,
fair-share bookkeeping, and metered usage (VM-seconds, GPU-hours, cost) of jobs and projects."""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import or_, select, text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from service.backends.interfaces import Flavor
from service.config import CONFIG_DIR, Settings, get_settings
from service.db.models import FairShare, Job, ProjectQuota, Resource, utcnow
from service.domain.errors import BackendError
from service.domain.quota import spec_demand
from service.domain.states import JobState, OwnerKind, ResourceState
from service.quota_policy import (
    KEYS,
    Demand,
    Interval,
    Limits,
    Metered,
    Queued,
    Usage,
    meter,
    priority_of,
)
from service.quota_policy import (
    never_fits as policy_never_fits,
)

# jobs that hold (or are getting) servers: what "concurrent jobs" counts
HOLDS_SERVER = (
    JobState.ALLOCATING,
    JobState.PROVISIONING,
    JobState.RUNNING,
    JobState.EXPORTING,
    JobState.CANCELLING,
)
_HOLDING = [st.value for st in HOLDS_SERVER]
_LOCK_KEY = 0x57AC  # one admission decision at a time across workers (PostgreSQL advisory lock)


# -- limits -------------------------------------------------------------------------------


def defaults(settings: Settings) -> Limits:
    d = settings.quota_defaults
    return Limits(jobs=d.jobs, servers=d.servers, gpus=d.gpus)


def overrides(s: Session, project: str) -> dict[str, int | None]:
    row = s.get(ProjectQuota, project)
    return {k: (getattr(row, k) if row is not None else None) for k in KEYS}


def limits_of(s: Session, settings: Settings, projects: Iterable[str]) -> dict[str, Limits]:
    """Each project's limits: its overrides over the configured defaults."""
    base = defaults(settings)
    wanted = sorted(set(projects))
    out = {p: base for p in wanted}
    if not wanted:
        return out
    for row in s.scalars(select(ProjectQuota).where(ProjectQuota.project_id.in_(wanted))):
        out[row.project_id] = Limits(
            jobs=base.jobs if row.jobs is None else row.jobs,
            servers=base.servers if row.servers is None else row.servers,
            gpus=base.gpus if row.gpus is None else row.gpus,
        )
    return out


def limits_for(s: Session, settings: Settings, project: str) -> Limits:
    return limits_of(s, settings, [project])[project]


def set_overrides(s: Session, project: str, values: Mapping[str, int | None]) -> None:
    """Set (an int) or clear (None) some of the project's overrides; others are kept."""
    unknown = set(values) - set(KEYS)
    if unknown:
        raise ValueError(f"unknown quota keys: {sorted(unknown)}")
    row = s.get(ProjectQuota, project, with_for_update=True)
    merged = {k: values[k] if k in values else (getattr(row, k) if row else None) for k in KEYS}
    if all(v is None for v in merged.values()):
        if row is not None:
            s.delete(row)  # nothing overridden: back to the defaults
            s.flush()
        return
    if row is None:
        try:
            with s.begin_nested():  # two admins creating the row at once: the loser updates
                s.add(ProjectQuota(project_id=project, **merged, updated_at=utcnow()))
            return
        except IntegrityError:
            row = s.get_one(ProjectQuota, project, with_for_update=True, populate_existing=True)
    for k in KEYS:
        if k in values:
            setattr(row, k, values[k])
    row.updated_at = utcnow()
    s.flush()


def clear_overrides(s: Session, project: str) -> None:
    row = s.get(ProjectQuota, project)
    if row is not None:
        s.delete(row)
        s.flush()


# -- flavors (GPU counts and prices) ------------------------------------------------------


_CONFIG_FLAVORS: dict[float, dict[str, Flavor]] = {}
CLOUD_RETRY = 30.0  # after the cloud failed to list flavors, use the price table this long
_cloud_quiet_until = [0.0]


def _config_flavors(cfg: Settings) -> dict[str, Flavor]:
    """config/flavors.yaml, read again only when it changes (serialising jobs reads it)."""
    mtime = (CONFIG_DIR / "flavors.yaml").stat().st_mtime
    table = _CONFIG_FLAVORS.get(mtime)
    if table is None:
        table = {f.name: f for f in cfg.flavors()}
        _CONFIG_FLAVORS.clear()
        _CONFIG_FLAVORS[mtime] = table
    return dict(table)


def flavor_table(settings: Settings | None = None) -> dict[str, Flavor]:
    """Flavors by name, for GPU counts and prices: the compute backend's catalogue (the
    openstack one is cached by the backend; its prices come from `openstack_prices`), or the
    configured price table when the cloud does not answer."""
    cfg = settings or get_settings()
    if cfg.compute == "openstack":
        from service.backends import registry

        if time.monotonic() >= _cloud_quiet_until[0]:
            try:
                return {f.name: f for f in registry.compute(cfg).flavors()}
            except BackendError:
                # listing jobs must not wait on a cloud that is down, once per job
                _cloud_quiet_until[0] = time.monotonic() + CLOUD_RETRY
        return {
            n: Flavor(name=n, vcpus=0, ram_mb=0, price_per_hour=float(p))
            for n, p in cfg.openstack_prices.items()
        }
    return _config_flavors(cfg)


# -- what projects hold -------------------------------------------------------------------


def job_demand(
    spec: Mapping[str, Any], flavors: Mapping[str, Flavor], default_flavor: str | None
) -> Demand:
    return spec_demand(spec, flavors, default_flavor)


# -- what admission reads of a job's spec -----------------------------------------------------

_DEMAND_KEYS = ("resources", "prediction", "labels", "tuning")


class _DemandParts:
    """The parts of each job's spec that admission reads (its demand, its priority, whether it
    tunes), read from the database once per job and process: a committed job's spec never
    changes, and every admission decision reads those of the whole queue, so without this each
    decision parsed every queued job's full spec again (O(queue) JSON per decision, with a
    decision after every allocate and teardown). Bounded: the least recently read go first."""

    def __init__(self, size: int = 8192) -> None:
        self.size = size
        self._parts: OrderedDict[str, Mapping[str, Any]] = OrderedDict()
        self._lock = threading.Lock()

    def of(self, s: Session, ids: Iterable[str]) -> dict[str, Mapping[str, Any]]:
        wanted = list(dict.fromkeys(ids))
        out: dict[str, Mapping[str, Any]] = {}
        with self._lock:
            for job_id in wanted:
                parts = self._parts.get(job_id)
                if parts is not None:
                    self._parts.move_to_end(job_id)
                    out[job_id] = parts
        missing = [j for j in wanted if j not in out]
        for start in range(0, len(missing), 1000):
            chunk = missing[start : start + 1000]
            for job_id, spec in s.execute(select(Job.id, Job.spec).where(Job.id.in_(chunk))):
                out[job_id] = {k: spec.get(k) for k in _DEMAND_KEYS if spec.get(k) is not None}
        if missing:
            with self._lock:
                for job_id in missing:
                    if job_id in out:
                        self._parts[job_id] = out[job_id]
                while len(self._parts) > self.size:
                    self._parts.popitem(last=False)
        return out


demand_parts = _DemandParts()


def in_use(
    s: Session,
    flavors: Mapping[str, Flavor],
    default_flavor: str | None,
    projects: Iterable[str] | None = None,
) -> dict[str, Usage]:
    """Per project: jobs holding or getting servers, and the servers and GPUs they hold
    (what they need, by their spec), plus servers that finished jobs have not yet given back."""
    wanted = None if projects is None else sorted(set(projects))
    q = select(Job.id, Job.project_id).where(Job.state.in_(_HOLDING))
    owing = (
        select(Resource.project_id, Resource.flavor)
        .join(Job, Job.id == Resource.job_id)
        .where(Resource.state != ResourceState.DELETED.value, Job.state.not_in(_HOLDING))
    )
    # an endpoint's replica servers are servers the project holds, like a job's
    serving = select(Resource.project_id, Resource.flavor).where(
        Resource.owner_kind == OwnerKind.ENDPOINT.value,
        Resource.state != ResourceState.DELETED.value,
    )
    if wanted is not None:
        q = q.where(Job.project_id.in_(wanted))
        owing = owing.where(Resource.project_id.in_(wanted))
        serving = serving.where(Resource.project_id.in_(wanted))
    out: dict[str, Usage] = {p: Usage() for p in wanted or ()}
    holding = s.execute(q).all()
    specs = demand_parts.of(s, [job_id for job_id, _ in holding])
    for job_id, project in holding:
        spec = specs.get(job_id)
        if spec is None or spec.get("tuning"):  # (None: deleted since the first read)
            continue  # a tuning job boots nothing: its trials hold (and are counted)
        out[project] = out.get(project, Usage()).plus(job_demand(spec, flavors, default_flavor))
    for project, flavor in [*s.execute(owing), *s.execute(serving)]:
        f = flavors.get(flavor)
        out[project] = out.get(project, Usage()).plus(
            Demand(servers=1, gpus=f.gpus if f else 0), jobs=0
        )
    return out


def servers_in_use(usage: Mapping[str, Usage]) -> int:
    return sum(u.servers for u in usage.values())


# -- the admission queue ------------------------------------------------------------------


@dataclass(frozen=True)
class QueueRow:
    queued: Queued
    reason: str | None  # why it waits now (None: fresh, its allocate step on the way)


@dataclass(frozen=True)
class AdmissionView:
    """Everything one admission decision reads, in one transaction."""

    queue: list[QueueRow]
    in_use: dict[str, Usage]
    limits: dict[str, Limits]
    last_admitted: dict[str, datetime]


def lock(s: Session) -> None:
    """Serialise admission decisions for the rest of this transaction: a PostgreSQL advisory
    lock; on SQLite, taking the database's write lock now (a write that changes nothing)."""
    dialect = s.get_bind().dialect.name
    if dialect == "postgresql":
        s.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _LOCK_KEY})
    elif dialect == "sqlite":
        s.execute(text("UPDATE fair_share SET admitted = admitted WHERE 1 = 0"))


def admission_view(
    s: Session, settings: Settings, flavors: Mapping[str, Flavor], now: datetime | None = None
) -> AdmissionView:
    now = now or utcnow()
    rows = s.execute(
        select(Job.id, Job.project_id, Job.created_at, Job.queue_reason, Job.not_before).where(
            Job.state == JobState.QUEUED.value
        )
    ).all()
    # backing off: its own allocate step comes back when the time is up
    rows = [r for r in rows if r.not_before is None or _aware(r.not_before) <= _aware(now)]
    specs = demand_parts.of(s, [r.id for r in rows])
    queue: list[QueueRow] = []
    for job_id, project, created, reason, _ in rows:
        spec = specs.get(job_id)
        if spec is None:
            continue  # deleted since the first read
        q = Queued(
            job_id=job_id,
            project_id=project,
            created_at=_aware(created),
            demand=job_demand(spec, flavors, settings.default_flavor),
            priority=priority_of(spec.get("labels")),
        )
        queue.append(QueueRow(q, reason))
    usage = in_use(s, flavors, settings.default_flavor)
    projects = {r.queued.project_id for r in queue} | set(usage)
    return AdmissionView(
        queue=queue,
        in_use=usage,
        limits=limits_of(s, settings, projects),
        last_admitted=last_admitted(s),
    )


def last_admitted(s: Session) -> dict[str, datetime]:
    rows = s.execute(select(FairShare.project_id, FairShare.last_admitted_at))
    return {p: _aware(at) for p, at in rows}


def record_admission(s: Session, project: str) -> None:
    """The project was served now: round-robin moves it to the back."""
    row = s.get(FairShare, project)
    if row is None:
        s.add(FairShare(project_id=project, last_admitted_at=utcnow(), admitted=1))
    else:
        row.last_admitted_at = utcnow()
        row.admitted += 1
    s.flush()


def never_fits(
    s: Session, settings: Settings, project: str, spec: Any, flavors: Iterable[Flavor]
) -> str | None:
    """Why `spec` can never run in `project` under its quota (submission answers 422)."""
    offered = list(flavors)
    why = policy_never_fits(
        limits_for(s, settings, project), spec, offered, settings.default_flavor
    )
    if why is not None:
        return f"{why} (project {project})"
    data = spec.model_dump(mode="json") if hasattr(spec, "model_dump") else dict(spec)
    need = spec_demand(data, offered, settings.default_flavor)
    if settings.max_servers and need.servers > settings.max_servers:
        return (
            f"the job needs {need.servers} servers at once but the platform runs at most "
            f"{settings.max_servers} (max_servers)"
        )
    return None


# -- usage and cost -----------------------------------------------------------------------


def _interval(r: Resource, flavors: Mapping[str, Flavor]) -> Interval | None:
    if r.active_at is None:
        return None  # never reached ACTIVE: nothing to bill
    # a server not yet deleted is billed up to now (a row reused by a retry may carry an
    # older deleted_at); a deleted one up to its deletion
    end: datetime | None = None
    if r.state == ResourceState.DELETED.value:
        end = r.deleted_at or r.active_at
    f = flavors.get(r.flavor)
    return Interval(
        start=_aware(r.active_at),
        end=_aware(end) if end is not None else None,
        gpus=f.gpus if f else 0,
        price_per_hour=f.price_per_hour if f else 0.0,
    )


def job_usage(
    resources: Sequence[Resource],
    flavors: Mapping[str, Flavor] | None = None,
    now: datetime | None = None,
) -> Metered:
    """A job's whole usage so far (its servers' time from ACTIVE until deleted, or now)."""
    if not any(r.active_at is not None for r in resources):
        return Metered()  # never ran: no need for the flavor catalogue
    table = flavor_table() if flavors is None else flavors
    intervals = [iv for r in resources if (iv := _interval(r, table)) is not None]
    return meter(intervals, now or utcnow())


@dataclass
class UsageRow:
    job_id: str
    name: str
    project_id: str
    state: str
    metered: Metered = field(default_factory=Metered)


def usage_report(
    s: Session,
    flavors: Mapping[str, Flavor],
    since: datetime,
    until: datetime,
    project: str | None,
    now: datetime | None = None,
) -> list[UsageRow]:
    """Per job, the usage inside [since, until) of every server that was up in that window
    (`project` None: every project), oldest job first."""
    q = (
        select(Resource, Job.name, Job.state)
        .join(Job, Job.id == Resource.job_id)
        .where(*_up_in_window(since, until))
        .order_by(Job.created_at, Job.id, Resource.id)
    )
    # joined with its job: res.job_id is never None here
    return _metered_rows(
        s,
        q,
        flavors,
        since,
        until,
        project,
        now,
        lambda res, name, state: (
            res.job_id,
            lambda: UsageRow(res.job_id, name, res.project_id, state),
        ),
    )


def endpoint_usage_report(
    s: Session,
    flavors: Mapping[str, Flavor],
    since: datetime,
    until: datetime,
    project: str | None,
    now: datetime | None = None,
) -> list[UsageRow]:
    """Per endpoint (job_id: its id, name: "<model>/<endpoint name>"), the usage inside
    [since, until) of its replica servers, as `usage_report` counts a job's."""
    from service.db.models import Endpoint, Model

    q = (
        select(Resource, Endpoint.name, Endpoint.state, Model.name)
        .join(Endpoint, Endpoint.id == Resource.owner_id)
        .join(Model, Model.id == Endpoint.model_id)
        .where(Resource.owner_kind == OwnerKind.ENDPOINT.value, *_up_in_window(since, until))
        .order_by(Endpoint.created_at, Endpoint.id, Resource.id)
    )
    return _metered_rows(
        s,
        q,
        flavors,
        since,
        until,
        project,
        now,
        lambda res, name, state, model: (
            res.owner_id,
            lambda: UsageRow(res.owner_id, f"{model}/{name}", res.project_id, state),
        ),
    )


def _up_in_window(since: datetime, until: datetime) -> list[Any]:
    """The conditions "this server was up at some moment of [since, until)"."""
    return [
        Resource.active_at.is_not(None),
        Resource.active_at < until,
        or_(
            Resource.state != ResourceState.DELETED.value,
            Resource.deleted_at.is_(None),
            Resource.deleted_at > since,
        ),
    ]


def _metered_rows(
    s: Session,
    q: Any,
    flavors: Mapping[str, Flavor],
    since: datetime,
    until: datetime,
    project: str | None,
    now: datetime | None,
    owner: Callable[..., tuple[str | None, Callable[[], UsageRow]]],
) -> list[UsageRow]:
    """Meter each (Resource, *columns) row of `q` inside [since, until) and sum the servers of
    one owner into one UsageRow; `owner(res, *columns)` gives the owner's key and how to make
    its row. Servers with no usage in the window, or no owner, are left out; rows come in the
    order of `q`."""
    now = now or utcnow()
    if project is not None:
        q = q.where(Resource.project_id == project)
    rows: dict[str, UsageRow] = {}
    for res, *cols in s.execute(q):
        iv = _interval(res, flavors)
        if iv is None:
            continue
        m = meter([iv], now, since, until)
        if m.vm_seconds <= 0:
            continue
        key, make = owner(res, *cols)
        if key is None:
            continue
        row = rows.get(key)
        if row is None:
            row = rows[key] = make()
        row.metered = row.metered + m
    return list(rows.values())


def _aware(dt: datetime) -> datetime:
    return dt if dt.tzinfo is not None else dt.replace(tzinfo=UTC)
