"""Quota policy, no I/O: what a job needs, fair-share admission order, never-fits, metering.

Admission is round-robin between projects and first in, first out within one (a job's
integer `priority` label, higher first, reorders its own project's queue, never another's).
The project served longest ago goes first, so a project that keeps submitting cannot starve
one that submits rarely; a project over its quota is skipped without losing its turn. Within
a project the queue is strict: a job that does not fit its project's quota holds back the
jobs behind it (unless it can never fit, which would block the project for good).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from service.domain.flavors import Flavor, gpu_candidates

KEYS = ("jobs", "servers", "gpus")
QUOTA_WAIT = "waiting for quota"
CAPACITY_WAIT = "waiting for capacity"
PRIORITY_LABEL = "priority"
MAX_PRIORITY = 1_000_000
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


@dataclass(frozen=True)
class Limits:
    """A project's quota: concurrent jobs, servers (VMs) and GPUs."""

    jobs: int
    servers: int
    gpus: int

    def as_dict(self) -> dict[str, int]:
        return {"jobs": self.jobs, "servers": self.servers, "gpus": self.gpus}


@dataclass(frozen=True)
class Demand:
    """What one job holds while it runs."""

    servers: int = 1
    gpus: int = 0


@dataclass(frozen=True)
class Usage:
    """What a project holds now."""

    jobs: int = 0
    servers: int = 0
    gpus: int = 0

    def plus(self, d: Demand, jobs: int = 1) -> Usage:
        return Usage(self.jobs + jobs, self.servers + d.servers, self.gpus + d.gpus)

    def as_dict(self) -> dict[str, int]:
        return {"jobs": self.jobs, "servers": self.servers, "gpus": self.gpus}


@dataclass(frozen=True)
class Queued:
    """A QUEUED job as admission sees it."""

    job_id: str
    project_id: str
    created_at: datetime
    demand: Demand = field(default_factory=Demand)
    priority: int = 0


@dataclass(frozen=True)
class Decision:
    """`admit`: the jobs that may start now, in fair order; `waiting`: why each other waits."""

    admit: tuple[str, ...]
    waiting: dict[str, str]


# -- what a job needs ---------------------------------------------------------------------


def _flavor_map(flavors: Iterable[Flavor] | Mapping[str, Flavor]) -> dict[str, Flavor]:
    if isinstance(flavors, Mapping):
        return dict(flavors)
    return {f.name: f for f in flavors}


def demand(
    resources: Mapping[str, Any],
    flavors: Iterable[Flavor] | Mapping[str, Flavor],
    default_flavor: str | None = None,
) -> Demand:
    """Servers and GPUs of a job from its spec's `resources` (JSON form): one server per
    worker, parameter server and evaluator; GPUs per server from the named flavor, or from the
    best-fitting GPU flavor when the spec asks for `gpus` (at least what it asked for)."""
    workers = _int(resources.get("workers"), 1)
    servers = max(1, workers) + max(0, _int(resources.get("parameter_servers"), 0))
    servers += 1 if resources.get("evaluator") is True else 0
    asked = _int(resources.get("gpus"), 0)
    table = _flavor_map(flavors)
    per_server = 0
    if asked:
        gpu_type = resources.get("gpu_type")
        fits = gpu_candidates(list(table.values()), asked, gpu_type if gpu_type else None)
        per_server = max(asked, fits[0].gpus) if fits else asked
    else:
        name = resources.get("flavor") or default_flavor
        f = table.get(name) if isinstance(name, str) else None
        per_server = f.gpus if f is not None else 0
    # every server of the job boots with the same flavor (the chief's: parameter servers and
    # the evaluator included), so each holds the flavor's GPUs
    return Demand(servers=servers, gpus=per_server * servers)


def priority_of(labels: Mapping[str, Any] | None) -> int:
    """The job's `priority` label as an integer (0 when absent or not an integer)."""
    raw = (labels or {}).get(PRIORITY_LABEL)
    try:
        value = int(str(raw).strip())
    except (TypeError, ValueError):
        return 0
    return max(-MAX_PRIORITY, min(MAX_PRIORITY, value))


def _int(v: Any, default: int) -> int:
    return v if isinstance(v, int) and not isinstance(v, bool) else default


# -- quota checks -------------------------------------------------------------------------


def over_quota(project: str, limits: Limits, used: Usage, need: Demand) -> str | None:
    """Why one more job needing `need` does not fit now, or None when it does."""
    if used.jobs + 1 > limits.jobs:
        return f"project {project} uses {used.jobs} of {limits.jobs} concurrent jobs"
    if used.servers + need.servers > limits.servers:
        return (
            f"project {project} uses {used.servers} of {limits.servers} servers; "
            f"the job needs {need.servers}"
        )
    if need.gpus and used.gpus + need.gpus > limits.gpus:
        return (
            f"project {project} uses {used.gpus} of {limits.gpus} GPUs; the job needs {need.gpus}"
        )
    return None


def exceeds(limits: Limits, need: Demand) -> str | None:
    """Why a job needing `need` can never run under `limits` (even with nothing else running)."""
    if limits.jobs < 1:
        return "the project's quota allows no concurrent jobs"
    if need.servers > limits.servers:
        return (
            f"the job needs {need.servers} servers but the project's quota allows {limits.servers}"
        )
    if need.gpus > limits.gpus:
        return f"the job needs {need.gpus} GPUs but the project's quota allows {limits.gpus}"
    return None


def never_fits(
    limits: Limits,
    spec: Any,
    flavors: Iterable[Flavor] | Mapping[str, Flavor],
    default_flavor: str | None = None,
) -> str | None:
    """Why the job `spec` (a JobSpec or its JSON form) can never run under the project's
    `limits`, or None. Submission answers 422 with this reason."""
    data = spec.model_dump(mode="json") if hasattr(spec, "model_dump") else dict(spec)
    return exceeds(limits, spec_demand(data, flavors, default_flavor))


def spec_demand(
    data: Mapping[str, Any],
    flavors: Iterable[Flavor] | Mapping[str, Flavor],
    default_flavor: str | None = None,
) -> Demand:
    """What a job (its spec's JSON form) holds while it runs: `demand` of its resources, and a
    batch prediction job one such server per `prediction.max_workers` (gang: all or none)."""
    one = demand(data.get("resources") or {}, flavors, default_flavor)
    pred = data.get("prediction")
    workers = _int(pred.get("max_workers"), 1) if isinstance(pred, Mapping) else 1
    if workers <= 1:
        return one
    return Demand(servers=one.servers * workers, gpus=one.gpus * workers)


# -- fair order and admission -------------------------------------------------------------


def _aware(dt: datetime) -> datetime:
    return dt if dt.tzinfo is not None else dt.replace(tzinfo=UTC)


def project_queue(jobs: Iterable[Queued]) -> list[Queued]:
    """One project's queue: higher priority first, then first in, first out."""
    return sorted(jobs, key=lambda q: (-q.priority, _aware(q.created_at), q.job_id))


def fair_order(
    queued: Sequence[Queued], last_admitted: Mapping[str, datetime] | None = None
) -> list[Queued]:
    """Every queued job in admission order: rounds over the projects, each round taking the
    next job of each project; projects in the order of their last admission (never admitted
    first), then by the age of their first job."""
    served = last_admitted or {}
    by_project: dict[str, list[Queued]] = {}
    for q in queued:
        by_project.setdefault(q.project_id, []).append(q)
    queues = {p: project_queue(js) for p, js in by_project.items()}
    projects = sorted(
        queues,
        key=lambda p: (
            _aware(served[p]) if p in served else _EPOCH,
            _aware(queues[p][0].created_at),
            p,
        ),
    )
    out: list[Queued] = []
    depth = max((len(q) for q in queues.values()), default=0)
    for i in range(depth):
        out.extend(queues[p][i] for p in projects if i < len(queues[p]))
    return out


def decide(
    queued: Sequence[Queued],
    in_use: Mapping[str, Usage],
    limits: Callable[[str], Limits],
    *,
    last_admitted: Mapping[str, datetime] | None = None,
    capacity: int | None = None,
    servers_in_use: int = 0,
) -> Decision:
    """Which queued jobs start now and why the others wait.

    `capacity` is the platform's cap on servers (None: no cap), `servers_in_use` what all
    projects hold of it. Walks the fair order: a job over its project's quota waits and holds
    back the rest of its project's queue; the first job that fits its quota but not the
    platform's free servers stops admission for everyone behind it (no overtaking)."""
    used = {p: in_use.get(p, Usage()) for p in {q.project_id for q in queued}}
    blocked: dict[str, str] = {}  # project -> why its queue is held back
    free = None if capacity is None else capacity - servers_in_use
    full = False
    admit: list[str] = []
    waiting: dict[str, str] = {}
    for q in fair_order(queued, last_admitted):
        lim = limits(q.project_id)
        hopeless = exceeds(lim, q.demand)
        if hopeless is not None:
            waiting[q.job_id] = f"{QUOTA_WAIT}: {hopeless} (raise the quota or cancel the job)"
            continue
        if q.project_id in blocked:
            waiting[q.job_id] = f"{QUOTA_WAIT}: {blocked[q.project_id]}"
            continue
        why = over_quota(q.project_id, lim, used[q.project_id], q.demand)
        if why is not None:
            waiting[q.job_id] = f"{QUOTA_WAIT}: {why}"
            # the same words whichever job is first: a reason that names it would change (and
            # add an event to every waiting job of the project) each time the first one starts
            blocked[q.project_id] = f"{why} (an earlier job of the project is first in line)"
            continue
        if full or (free is not None and q.demand.servers > free):
            full = True
            waiting[q.job_id] = f"{CAPACITY_WAIT}: all {capacity} servers in use"
            continue
        admit.append(q.job_id)
        used[q.project_id] = used[q.project_id].plus(q.demand)
        if free is not None:
            free -= q.demand.servers
    return Decision(tuple(admit), waiting)


# -- metering -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Interval:
    """One server's billable life: from ACTIVE until deleted (None: still running)."""

    start: datetime
    end: datetime | None
    gpus: int = 0
    price_per_hour: float = 0.0


@dataclass(frozen=True)
class Metered:
    vm_seconds: float = 0.0
    gpu_hours: float = 0.0
    cost: float = 0.0

    def __add__(self, other: Metered) -> Metered:
        return Metered(
            self.vm_seconds + other.vm_seconds,
            self.gpu_hours + other.gpu_hours,
            self.cost + other.cost,
        )

    def rounded(self) -> Metered:
        """To the precision reports show (ms, micro-GPU-hours, micro-units of cost).

        Reports add up rounded rows, so a total always equals the sum of the rows shown."""
        return Metered(round(self.vm_seconds, 3), round(self.gpu_hours, 6), round(self.cost, 6))

    def as_dict(self) -> dict[str, float]:
        r = self.rounded()
        return {"vm_seconds": r.vm_seconds, "gpu_hours": r.gpu_hours, "cost": r.cost}


def meter(
    intervals: Iterable[Interval],
    now: datetime,
    since: datetime | None = None,
    until: datetime | None = None,
) -> Metered:
    """VM-seconds, GPU-hours and cost of `intervals`, each clipped to [since, until)."""
    total = Metered()
    for iv in intervals:
        start = _aware(iv.start)
        end = _aware(iv.end) if iv.end is not None else _aware(now)
        if since is not None:
            start = max(start, _aware(since))
        if until is not None:
            end = min(end, _aware(until))
        seconds = (end - start).total_seconds()
        if seconds <= 0:
            continue
        hours = seconds / 3600.0
        total = total + Metered(seconds, hours * iv.gpus, hours * iv.price_per_hour)
    return total
