"""GET /metrics: Prometheus metrics of the whole platform, in the text exposition format.

The API and the workers are separate processes (several of each), so the platform's numbers
are not counted in any one process: a collector computes them at scrape time from the database,
with a handful of aggregate queries whose answers are bounded by the number of states, phases,
projects and buckets, never by the number of jobs. Only the API's request latency is counted
in-process (one histogram per API process). Every app has a registry of its own (no global
state: several apps in one process do not collide).

Who may scrape (docs/operations.md): with `auth=noauth` anyone (the API is loopback-only
then); with `metrics_token` set, a request bearing `Authorization: Bearer <metrics_token>`
(Prometheus' `authorization:` scrape option); with `auth=keystone`, also a Keystone token with
the admin role. Without a metrics token, keystone mode has no anonymous scrapes: the metrics
name every project.
"""

from __future__ import annotations

import hmac
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from flask import Blueprint, Flask, Response, current_app, g, request
from flask.blueprints import BlueprintSetupState
from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4
from prometheus_client.registry import Collector
from sqlalchemy import ColumnElement, Float, and_, case, cast, func, select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from service.api import Context, ctx
from service.api.auth import current, public
from service.db.models import Job, JobEvent, Resource
from service.domain.errors import Forbidden, Unauthorized
from service.domain.states import JobState

log = logging.getLogger("stackml.api.metrics")

bp = Blueprint("metrics", __name__)

EXTENSION = "stackml.metrics"
# seconds: from a fraction of a second (a local sandbox) to a day (a long training run)
DURATION_BUCKETS = (
    0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0, 7200.0,
    21600.0, 86400.0,
)  # fmt: skip
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
UNMATCHED = "<unmatched>"  # any path no route knows: one label value, not one per path
SSH_FAILED_PREFIX = "SSH failed"  # the event workers/jobctx.py records per retried SSH failure


@dataclass(frozen=True)
class _AppMetrics:
    registry: CollectorRegistry
    latency: Histogram
    # the histogram's child of each (method, route, status) seen: labels() costs more than a
    # request's proxying does (its lock, its key check), a dict lookup nothing
    children: dict[tuple[str, str, str], Any] = field(default_factory=dict)

    def observe(self, method: str, route: str, status: str, seconds: float) -> None:
        key = (method, route, status)
        child = self.children.get(key)
        if child is None:
            child = self.children[key] = self.latency.labels(
                method=method, route=route, status=status
            )
        child.observe(seconds)


class PlatformCollector(Collector):
    """The platform's state, read from the database at each scrape."""

    def __init__(self, context: Callable[[], Context]) -> None:
        self._context = context

    def collect(self) -> Iterator[Any]:
        started = time.perf_counter()
        up = GaugeMetricFamily(
            "stackml_database_up", "1 when the scrape could read the database, else 0"
        )
        try:
            with self._context().session() as s:
                families = list(_platform_families(s))
        except SQLAlchemyError as e:
            log.warning("metrics: cannot read the database: %s", e)
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        yield from families
        took = GaugeMetricFamily(
            "stackml_metrics_collect_seconds", "Time this scrape spent reading the database"
        )
        took.add_metric([], time.perf_counter() - started)
        yield took


def _platform_families(s: Session) -> Iterator[Any]:
    yield _jobs_by_state(s)
    queue_wait, phases = _state_durations(s)
    yield queue_wait
    yield phases
    yield _servers(s)
    yield _ssh_failures(s)
    yield _job_failures(s)
    yield _store_bytes(s)


def _jobs_by_state(s: Session) -> GaugeMetricFamily:
    fam = GaugeMetricFamily(
        "stackml_jobs", "Jobs on record, by project and state", labels=["project", "state"]
    )
    counts: dict[str, dict[str, int]] = {}
    rows = s.execute(
        select(Job.project_id, Job.state, func.count()).group_by(Job.project_id, Job.state)
    )
    for project, state, n in rows:
        counts.setdefault(project, {})[state] = n
    for project in sorted(counts):
        for state in JobState:  # every state, 0 included: dashboards need no absent() dance
            fam.add_metric([project, state.value], counts[project].get(state.value, 0))
    return fam


def _epoch(s: Session, at: Any) -> ColumnElement[float]:
    """Seconds since 1970 of a stored timestamp, as a double."""
    if s.get_bind().dialect.name == "postgresql":
        return cast(func.extract("epoch", at), Float)
    return (func.julianday(at) - 2440587.5) * 86400.0  # SQLite stores text; a day is 86400 s


def _state_durations(s: Session) -> tuple[HistogramMetricFamily, HistogramMetricFamily]:
    """How long each finished stay in a state lasted: from the transition into the state to
    the transition out of it, both from job_events. One aggregate query: a window over the
    transitions (each event's time taken once), then counts by state and bucket, so that the
    answer has at most states x buckets rows whatever the number of jobs."""
    ev = JobEvent.__table__
    at = _epoch(s, ev.c.at)
    steps = (
        select(
            ev.c.from_state.label("state"),
            at.label("left_t"),
            func.lag(at).over(partition_by=ev.c.job_id, order_by=ev.c.id).label("entered_t"),
            func.lag(ev.c.to_state)
            .over(partition_by=ev.c.job_id, order_by=ev.c.id)
            .label("entered"),
        )
        .where(ev.c.kind == "transition")
        .subquery()
    )
    seconds: ColumnElement[float] = steps.c.left_t - steps.c.entered_t
    if s.get_bind().dialect.name != "postgresql":
        seconds = func.round(seconds, 3)  # SQLite's day fractions: microseconds of noise
    bucket = case(
        *((seconds <= bound, i) for i, bound in enumerate(DURATION_BUCKETS)),
        else_=len(DURATION_BUCKETS),
    )
    binned = (
        select(steps.c.state, bucket.label("bucket"), seconds.label("seconds"))
        .where(and_(steps.c.entered_t.is_not(None), steps.c.entered == steps.c.state))
        .subquery()
    )
    query = select(
        binned.c.state, binned.c.bucket, func.count(), func.sum(binned.c.seconds)
    ).group_by(binned.c.state, binned.c.bucket)
    counts: dict[str, list[int]] = {}
    sums: dict[str, float] = {}
    for state, index, n, total in s.execute(query):
        if not state:
            continue
        counts.setdefault(state, [0] * (len(DURATION_BUCKETS) + 1))[int(index)] += int(n)
        sums[state] = sums.get(state, 0.0) + float(total or 0.0)
    queue_wait = HistogramMetricFamily(
        "stackml_job_queue_wait_seconds",
        "How long jobs waited in QUEUED (each stay: a job sent back to QUEUED waits again)",
    )
    phases = HistogramMetricFamily(
        "stackml_job_phase_duration_seconds",
        "How long jobs stayed in each state after QUEUED (ALLOCATING: boot; PROVISIONING; "
        "RUNNING: training; EXPORTING; CANCELLING)",
        labels=["state"],
    )
    queued = JobState.QUEUED.value
    queue_wait.add_metric([], _cumulative(counts.get(queued)), sum_value=sums.get(queued, 0.0))
    for state in sorted(counts):
        if state != queued:
            phases.add_metric([state], _cumulative(counts[state]), sum_value=sums[state])
    return queue_wait, phases


def _cumulative(per_bucket: list[int] | None) -> list[tuple[str, float]]:
    """Prometheus buckets (le, count of observations <= le) from counts per bucket."""
    per_bucket = per_bucket or [0] * (len(DURATION_BUCKETS) + 1)
    out: list[tuple[str, float]] = []
    running = 0
    for bound, n in zip((*DURATION_BUCKETS, None), per_bucket, strict=True):
        running += n
        out.append(("+Inf" if bound is None else _bucket_le(bound), running))
    return out


def _bucket_le(bound: float) -> str:
    return repr(float(bound))


def _servers(s: Session) -> GaugeMetricFamily:
    fam = GaugeMetricFamily(
        "stackml_servers",
        "Servers on record, by backend and state (deleted ones until their job is deleted)",
        labels=["backend", "state"],
    )
    rows = s.execute(
        select(Resource.backend, Resource.state, func.count())
        .group_by(Resource.backend, Resource.state)
        .order_by(Resource.backend, Resource.state)
    )
    for backend, state, n in rows:
        fam.add_metric([backend, state], n)
    return fam


def _ssh_failures(s: Session) -> GaugeMetricFamily:
    fam = GaugeMetricFamily(
        "stackml_ssh_failures",
        "SSH failures the workers retried, by phase (from the events of jobs on record)",
        labels=["phase"],
    )
    rows = s.execute(
        select(JobEvent.kind, func.count())
        .where(JobEvent.message.like(f"{SSH_FAILED_PREFIX}%"))
        .group_by(JobEvent.kind)
        .order_by(JobEvent.kind)
    )
    for phase, n in rows:
        fam.add_metric([phase], n)
    return fam


def _job_failures(s: Session) -> GaugeMetricFamily:
    fam = GaugeMetricFamily(
        "stackml_job_failures",
        "FAILED jobs on record, by the phase and reason of their failure (ssh_unreachable, "
        "ssh_error, server_lost, trainer_exit_nonzero, ...)",
        labels=["phase", "reason"],
    )
    rows = s.execute(
        select(Job.failure_phase, Job.failure_reason, func.count())
        .where(Job.state == JobState.FAILED.value)
        .group_by(Job.failure_phase, Job.failure_reason)
    )
    for phase, reason, n in rows:
        fam.add_metric([phase or "", reason or ""], n)
    return fam


def _store_bytes(s: Session) -> GaugeMetricFamily:
    fam = GaugeMetricFamily(
        "stackml_store_model_bytes",
        "Bytes of the models exported to the object store, by project (as recorded by "
        "jobs on record that SUCCEEDED)",
        labels=["project"],
    )
    size = Job.output["size"].as_integer()
    rows = s.execute(
        select(Job.project_id, func.coalesce(func.sum(size), 0))
        .where(Job.state == JobState.SUCCEEDED.value)
        .group_by(Job.project_id)
        .order_by(Job.project_id)
    )
    for project, total in rows:
        fam.add_metric([project], float(total))
    return fam


# -- the API's own latency, and the endpoint -----------------------------------------------------


def _setup(state: BlueprintSetupState) -> None:
    app = state.app
    assert isinstance(app, Flask)
    registry = CollectorRegistry(auto_describe=False)
    latency = Histogram(
        "stackml_api_request_duration_seconds",
        "API requests served by this process: seconds until the response (its headers, for "
        "a streamed log), by method, route template and status",
        ["method", "route", "status"],
        buckets=LATENCY_BUCKETS,
        registry=registry,
    )
    registry.register(PlatformCollector(lambda: app.extensions["stackml"]))
    from service.serving_log import StatsCollector  # the sampled prediction log's counters

    registry.register(StatsCollector(lambda: app.extensions.get("stackml.serving_log")))
    app.extensions[EXTENSION] = _AppMetrics(registry=registry, latency=latency)
    # first of all before-request hooks, so that requests refused early (401, 413) are timed too
    app.before_request_funcs.setdefault(None, []).insert(0, _start_timer)
    app.after_request(_observe)


bp.record_once(_setup)


STARTED_ENV = "stackml.started"  # set by the prediction lane when Flask answers for it


def _start_timer() -> None:
    g.stackml_started = request.environ.get(STARTED_ENV) or time.perf_counter()


def observe(app: Flask, method: str, route: str, status: int, started: float) -> None:
    """One request's latency in the histogram (the prediction lane's, outside Flask)."""
    metrics: _AppMetrics | None = app.extensions.get(EXTENSION)
    if metrics is not None:
        metrics.observe(method, route, str(status), time.perf_counter() - started)


def _observe(response: Response) -> Response:
    started = g.get("stackml_started")
    if started is not None:
        metrics: _AppMetrics = current_app.extensions[EXTENSION]
        rule = request.url_rule
        metrics.observe(
            request.method if request.method in METHODS else "OTHER",
            rule.rule if rule is not None else UNMATCHED,
            str(response.status_code),
            time.perf_counter() - started,
        )
    return response


@bp.get("/metrics")
@public  # the route is open to the auth layer; _authorize_scrape decides (see the docstring)
def metrics() -> Response:
    _authorize_scrape()
    registry = current_app.extensions[EXTENSION].registry
    return Response(generate_latest(registry), content_type=CONTENT_TYPE_PLAIN_0_0_4)


def _authorize_scrape() -> None:
    settings = ctx().settings
    token = settings.metrics_token
    if token and _bearer_matches(token):
        return
    if settings.auth == "keystone":
        if current().is_admin:  # 401 without a valid token
            return
        raise Forbidden(
            "the metrics need the admin role, or the metrics token as a Bearer token",
            details={"required_role": "admin"},
        )
    if token:
        raise Unauthorized(
            "the metrics need `Authorization: Bearer <metrics_token>`",
            details={"header": "Authorization"},
        )


def _bearer_matches(token: str) -> bool:
    scheme, _, given = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not given:
        return False
    return hmac.compare_digest(given.strip().encode(), token.encode())
