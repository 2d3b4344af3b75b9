"""/v1/jobs: submit, list, read, cancel, delete; logs (by offset or followed), events, metrics."""

from __future__ import annotations

import logging
import re
import time
import zlib
from collections.abc import Iterator
from typing import Any

from flask import Blueprint, Response, current_app, jsonify, request, url_for
from sqlalchemy import or_, select, text
from sqlalchemy.orm import Session

from service import queue, trusts
from service.api import Context, batch, bool_arg, ctx, json_body
from service.api.auth import (
    all_projects_arg,
    current_project,
    delegate_trust,
    drop_trust_quietly,
    job_scope,
    list_scope,
)
from service.api.errors import (
    JobNotTerminal,
    JobTerminal,
    TeardownPending,
    field_error,
    fields_failed,
)
from service.backends import registry
from service.backends.interfaces import ObjectStore, gpu_candidates
from service.backends.storage.local import LocalStore, check_key
from service.db import evaluations, quotas
from service.db import jobs as repo
from service.db import tuning as tuning_repo
from service.db.models import Job, iso
from service.domain import cluster, outputs
from service.domain.errors import (
    BackendError,
    Conflict,
    InvalidRequest,
    NotFound,
    ServiceUnavailable,
    ValidationFailed,
)
from service.domain.spec import NAME_RE, JobSpec, masked_spec, stored, unbuilt_fields
from service.domain.states import JobState, ResourceState

bp = Blueprint("jobs", __name__)
log = logging.getLogger("stackml.api.jobs")

DEFAULT_LIMIT = 50
LOG_CHUNK = 1 << 20
MAX_LOG_LIMIT = 8 << 20
MAX_FOLLOW_SECONDS = 24 * 3600
DEFAULT_FOLLOW_SECONDS = 3600.0
# ids stackml hands out (job-<hex>), with room to spare; anything else names no job
JOB_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
LABEL_KEY_RE = re.compile(NAME_RE)
MAX_LABEL_VALUE = 256
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
# jobs that hold their output prefix: those that may still write to it, and those whose
# model is there (a failed or cancelled job's upload is removed when it fails)
HOLDS_OUTPUT = [s.value for s in JobState if not s.terminal] + [JobState.SUCCEEDED.value]
_OUTPUT_LOCK = 0x57AD  # PostgreSQL advisory lock namespace: output reservations per project


class NotImplementedYet(ValidationFailed):
    """The spec asks for something stackml does not do yet."""

    code = "not_implemented"


class OutputExists(Conflict):
    """The output prefix is not new: something is stored there, or another job holds it."""

    code = "output_exists"


# -- submission ---------------------------------------------------------------------------


@bp.post("/v1/jobs")
def submit() -> tuple[Response, int, dict[str, str]]:
    c = ctx()
    project = current_project()
    spec = JobSpec.model_validate(json_body())
    _refuse_unbuilt(spec)
    if spec.tuning is not None and trusts.enabled(c.settings):
        raise NotImplementedYet(
            "not available yet: tuning with per-project tenancy (Keystone trusts)",
            details={
                "fields": [
                    field_error(
                        "tuning", "a tuning job's trials cannot share its Keystone trust yet"
                    )
                ]
            },
        )
    spec, batch_record = _resolve_job(spec, project, c)
    store = c.store_for(project)
    trust_id = _create_trust(c, project)
    try:
        with c.session() as s:
            reserved = spec.predicting().output_prefix if spec.batch else spec.output.model_uri
            if reserved is not None:
                # the row is the reservation: check and insert under one lock, so two
                # submissions naming one new prefix cannot both pass the check
                _lock_outputs(s, project)
                _refuse_held_output(s, store, project, reserved)
            # the id first: the default output prefix names it, and the row is inserted
            # whole (one INSERT, no UPDATE after it)
            job_id = repo.new_job_id()
            data = stored(spec)
            if spec.batch:
                output: dict[str, Any] = {"output_prefix": reserved, "prediction": batch_record}
            elif spec.tuning is not None:
                output = {}  # the best trial's model, once there is one
            else:
                if spec.output.model_uri is None:
                    default = outputs.default_prefix(store.project_prefix(project), job_id)
                    data["output"]["model_uri"] = store.uri(default)
                output = {"model_uri": data["output"]["model_uri"]}
            job = repo.create_job(
                s,
                project,
                spec,
                trust_id=trust_id,
                job_id=job_id,
                stored_spec=data,
                output=output,
            )
            if spec.batch and batch_record and batch_record.get("resumed"):
                repo.add_event(
                    s,
                    job.id,
                    "submit",
                    f"resuming the batch run under {reserved}: only missing shards run",
                )
            if spec.tuning is not None:
                tuning_repo.start(s, job, spec.tuning)
            s.flush()
            body = _public(repo.serialize_new_job(job))
    except BaseException:
        if trust_id is not None:
            # no job row holds it: it must not outlive this request
            drop_trust_quietly(c.settings, trust_id, "a submission")
        raise
    c.enqueue_quietly(queue.POLL if spec.tuning is not None else queue.ALLOCATE, job.id)
    return jsonify(body), 202, {"Location": url_for("jobs.get", job_id=job.id)}


def _public(job: dict[str, Any]) -> dict[str, Any]:
    """A serialized job as responses show it: env values masked (the workers read the real
    ones from the database row)."""
    if isinstance(job.get("spec"), dict):
        job["spec"] = masked_spec(job["spec"])
    return job


def _refuse_unbuilt(spec: JobSpec) -> None:
    """422 not_implemented for fields stackml accepts in its schema but does not act on yet,
    before anything is checked, charged or stored."""
    unbuilt = unbuilt_fields(spec)
    if unbuilt:
        names = ", ".join(f for f, _ in unbuilt)
        raise NotImplementedYet(
            f"not available yet: {names}",
            details={"fields": [field_error(f, m) for f, m in unbuilt]},
        )


def _lock_outputs(s: Session, project: str) -> None:
    """Serialise output reservations of one project for the rest of this transaction: a
    PostgreSQL advisory lock; on SQLite, the database's write lock (a write that changes
    nothing), which also makes the check below read the latest committed rows."""
    dialect = s.get_bind().dialect.name
    if dialect == "postgresql":
        key = zlib.crc32(project.encode()) - (1 << 31)  # into int4
        s.execute(text("SELECT pg_advisory_xact_lock(:ns, :k)"), {"ns": _OUTPUT_LOCK, "k": key})
    elif dialect == "sqlite":
        s.execute(text("UPDATE jobs SET id = id WHERE 1 = 0"))


def _output_holder(s: Session, store: ObjectStore, project: str, prefix: str) -> str | None:
    """The id of a job of `project` that holds `prefix` (a key prefix ending in '/'), a
    prefix above it or one below it; None when no job does. A training job holds its
    `output.model_uri`, a batch prediction job its `output.output_prefix`."""
    above = [store.uri(a) for a in outputs.ancestors(prefix)]
    above += [u.rstrip("/") for u in above]  # a model_uri stored without its slash
    overlapping = []
    for key in ("model_uri", "output_prefix"):
        col = Job.output[key].as_string()
        overlapping += [col.in_(above), col.startswith(store.uri(prefix), autoescape=True)]
    q = (
        select(Job.id)
        .where(Job.project_id == project, Job.state.in_(HOLDS_OUTPUT), or_(*overlapping))
        .limit(1)
    )
    return s.scalar(q)


def _refuse_held_output(
    s: Session, store: ObjectStore, project: str, uri: str, field: str = "output.model_uri"
) -> None:
    holder = _output_holder(s, store, project, outputs.as_prefix(store.key_of(uri)))
    if holder is not None:
        raise OutputExists(
            f"{field} {uri} overlaps the output of job {holder}; name a new prefix",
            details={"field": field, "model_uri": uri, "job_id": holder},
        )


def _refuse_existing_output(store: ObjectStore, uri: str) -> None:
    prefix = outputs.as_prefix(store.key_of(uri))
    try:
        found = store.list(prefix)
    except BackendError as e:
        raise ServiceUnavailable(f"the object store cannot list {uri}: {e}") from e
    if found:
        raise OutputExists(
            f"output.model_uri {uri} already holds {len(found)} object(s); a job writes only "
            "to a new prefix",
            details={"field": "output.model_uri", "model_uri": uri, "objects": len(found)},
        )


def _create_trust(c: Context, project: str) -> str | None:
    """With keystone auth and per-project tenancy: the trust the job's workers act through."""
    return delegate_trust(c.settings, project) if trusts.enabled(c.settings) else None


def _resolve(spec: JobSpec, project: str, c: Context, *, holdout_later: bool = False) -> JobSpec:
    """`_resolve_job`'s spec (schedules use it; `holdout_later`: a template whose gate may
    leave holdout_uri to the dataset each slot rebuilds)."""
    return _resolve_job(spec, project, c, holdout_later=holdout_later)[0]


def _resolve_job(
    spec: JobSpec, project: str, c: Context, *, holdout_later: bool = False
) -> tuple[JobSpec, dict[str, Any] | None]:
    """Check what the schema cannot (catalogues, the store, the model registry) and fill
    defaults; one 422 lists every problem. For a batch prediction job, also what its output
    records at submission (the resolved model version)."""
    settings = c.settings
    problems: list[dict[str, str]] = []
    runtimes = settings.runtimes()
    if spec.runtime.key not in runtimes:
        problems.append(
            field_error(
                "runtime", f"unknown runtime {spec.runtime.key!r}; known: {sorted(runtimes)}"
            )
        )
    try:
        offered = registry.compute(settings).flavors()
    except BackendError as e:
        raise ServiceUnavailable(f"the compute backend cannot list its flavors: {e}") from e
    flavors = {f.name for f in offered}
    res = spec.resources
    flavor = res.flavor
    if flavor is None and res.gpus is None:
        flavor = settings.default_flavor
    if flavor is not None and flavor not in flavors:
        problems.append(
            field_error("resources.flavor", f"unknown flavor {flavor!r}; known: {sorted(flavors)}")
        )
    if res.gpus and not gpu_candidates(offered, res.gpus, res.gpu_type):
        kind = f" {res.gpu_type}" if res.gpu_type else ""
        problems.append(
            field_error(
                "resources.gpus",
                f"no flavor of the {settings.compute} backend offers {res.gpus}{kind} GPU(s)",
            )
        )
    with c.session() as s:
        why = quotas.never_fits(s, settings, project, spec, offered)
    if why:
        problems.append(field_error("resources", why))
    if spec.batch:
        return _resolve_batch(spec, project, c, problems, flavor)
    model_uri = spec.output.model_uri
    if model_uri is not None:
        model_uri = outputs.as_prefix(model_uri)
    store = c.store_for(project)
    gate = spec.output.gate
    holdout = None
    if gate is not None and gate.holdout_uri is not None:
        holdout = outputs.as_prefix(gate.holdout_uri)
    elif gate is not None and not holdout_later:
        problems.append(
            field_error(
                "output.gate.holdout_uri",
                "required: the prefix of the CSV rows both versions are scored on (only a "
                "schedule that rebuilds a dataset may leave it out)",
            )
        )
    checks = (
        ("trainer.package_uri", spec.training().package_uri, "object"),
        ("inputs.data_uri", spec.inputs.data_uri, "prefix"),
        ("output.model_uri", model_uri, None),
        ("output.gate.holdout_uri", holdout, "prefix"),
    )
    for field, uri, must_exist in checks:
        if uri is None:
            continue
        problem = _check_uri(store, project, uri, must_exist)
        if problem is None and must_exist is None:
            problem = outputs.prefix_problem(store.key_of(uri), store.project_prefix(project))
        if problem is None and uri is holdout:
            problem = outputs.holdout_problem(store.key_of(uri), store.project_prefix(project))
        if problem:
            problems.append(field_error(field, problem))
    if problems:
        raise fields_failed(problems)
    if model_uri is not None:
        # 409s, once the request is otherwise valid (checked again under the lock on insert)
        _refuse_existing_output(store, model_uri)
        with c.session() as s:
            _refuse_held_output(s, store, project, model_uri)
    data = stored(spec)
    if res.flavor is None and res.gpus is None:
        data["resources"]["flavor"] = flavor
    data["output"]["model_uri"] = model_uri
    if holdout is not None:
        data["output"]["gate"]["holdout_uri"] = holdout
    return JobSpec.model_validate(data), None


def _resolve_batch(
    spec: JobSpec, project: str, c: Context, problems: list[dict[str, str]], flavor: str | None
) -> tuple[JobSpec, dict[str, Any]]:
    """The batch part of `_resolve_job` (service/api/batch.py): the version, inputs, format
    and output prefix; 422 for every problem, then 409 output_exists for a prefix in use."""
    store = c.store_for(project)
    with c.session() as s:
        got = batch.resolve(s, store, project, spec.predicting(), problems, _check_uri)
    if problems or got is None:
        raise fields_failed(problems)
    out = got.prediction.output_prefix
    record = dict(got.record)
    if batch.check_output(store, out, got.request):
        record["resumed"] = True
    with c.session() as s:
        _refuse_held_output(s, store, project, out, "prediction.output_prefix")
    data = stored(spec)
    if spec.resources.flavor is None and spec.resources.gpus is None:
        data["resources"]["flavor"] = flavor
    data["prediction"] = got.prediction.model_dump(mode="json")
    if got.prediction.version is None:
        data["prediction"]["label"] = record["label"]
    record["request"] = got.request
    return JobSpec.model_validate(data), record


def _check_uri(store: ObjectStore, project: str, uri: str, must_exist: str | None) -> str | None:
    try:
        key = store.key_of(uri)
    except ValueError:
        return f"must be a {store.scheme}:// URI on this platform's object store"
    area = store.project_prefix(project)
    if not key.startswith(area) or key == area:
        return f"must be inside this project's area, {store.scheme}://{area}"
    try:
        if must_exist == "object" and not _object_exists(store, key):
            return f"no object {uri} in the store"
        if must_exist == "prefix" and not _prefix_exists(store, key):
            return f"nothing stored at {uri}"
        if must_exist is None:
            check_key(key, prefix=True)  # the key rules of both stores (Swift splits with it)
    except ValueError as e:  # the store's own key rules (e.g. empty segments)
        return str(e)
    return None


def _object_exists(store: ObjectStore, key: str) -> bool:
    if isinstance(store, LocalStore):
        return store.exists(key)
    return any(i.key == key for i in store.list(key))


def _prefix_exists(store: ObjectStore, key: str) -> bool:
    if not key.endswith("/") and _object_exists(store, key):
        return True
    under = key if key.endswith("/") else key + "/"
    return bool(store.list(under))


# -- reads --------------------------------------------------------------------------------


@bp.get("/v1/jobs")
def list_() -> Response:
    c = ctx()
    project = list_scope(all_projects_arg())
    states = _states(request.args.getlist("state"))
    labels = _labels(request.args.getlist("label"))
    limit = _int_arg("limit", DEFAULT_LIMIT, 1, repo.MAX_LIMIT)
    marker = request.args.get("marker") or None
    if marker is not None and not JOB_ID_RE.match(marker):
        raise InvalidRequest(
            "marker must be the `next` of a previous page", details={"parameter": "marker"}
        )
    with c.session() as s:
        rows, nxt = repo.list_jobs(
            s, project, states=states, labels=labels, limit=limit, marker=marker
        )
        # the same few queries whatever the page holds; the flavor catalogue (prices, GPUs)
        # read once for the page: openstack's from its backend's cache, never once a job
        body = {"jobs": [_public(j) for j in repo.serialize_jobs(s, rows)], "next": nxt}
    return jsonify(body)


def _states(values: list[str]) -> list[JobState]:
    out = []
    for v in (p.strip() for raw in values for p in raw.split(",")):
        if not v:
            continue
        try:
            out.append(JobState(v.upper()))
        except ValueError as e:
            raise InvalidRequest(
                f"unknown state {v!r}",
                details={"parameter": "state", "allowed": [s.value for s in JobState]},
            ) from e
    return out


def _labels(values: list[str]) -> dict[str, str]:
    out = {}
    for v in values:
        k, sep, val = v.partition("=")
        if not sep or not k:
            raise InvalidRequest(
                "label filters are written key=value",
                details={"parameter": "label", "value": v[:300]},
            )
        if not LABEL_KEY_RE.match(k) or len(val) > MAX_LABEL_VALUE or _CONTROL.search(val):
            raise InvalidRequest(
                f"a label filter is key=value with a label name (letters, digits, '.', '_', '-') "
                f"and a value of at most {MAX_LABEL_VALUE} printable characters",
                details={"parameter": "label"},
            )
        out[k] = val
    return out


def _int_arg(name: str, default: int, lo: int, hi: int) -> int:
    raw = request.args.get(name)
    if raw is None or raw == "":
        return default
    try:
        val = int(raw)
    except ValueError as e:
        raise InvalidRequest(f"{name} must be an integer", details={"parameter": name}) from e
    if not lo <= val <= hi:
        raise InvalidRequest(f"{name} must be between {lo} and {hi}", details={"parameter": name})
    return val


def _float_arg(name: str, default: float, lo: float, hi: float) -> float:
    raw = request.args.get(name)
    if raw is None or raw == "":
        return default
    try:
        val = float(raw)
    except ValueError as e:
        raise InvalidRequest(f"{name} must be a number", details={"parameter": name}) from e
    if not lo < val <= hi:  # also false for NaN
        raise InvalidRequest(
            f"{name} must be above {lo} and at most {hi}", details={"parameter": name}
        )
    return val


@bp.get("/v1/jobs/<job_id>")
def get(job_id: str) -> Response:
    c = ctx()
    with c.session() as s:
        job = _job(s, job_id)
        return jsonify(_public(repo.serialize_job(s, job)))


def _job(s: Session, job_id: str) -> Job:
    """The job if the caller may see it; another project's job is NotFound (never 403), as is
    an id that cannot be one."""
    if not JOB_ID_RE.match(job_id):
        raise NotFound("no such job", details={"job_id": job_id[:64]})
    return repo.get_job(s, job_id, job_scope())


# -- cancel and delete --------------------------------------------------------------------


@bp.post("/v1/jobs/<job_id>/cancel")
def cancel(job_id: str) -> tuple[Response, int]:
    c = ctx()
    with c.session() as s:
        job = _job(s, job_id)
        needs_worker = _request_cancel(s, job)
        s.expire(job)
        body = _public(repo.serialize_job(s, job))
    if needs_worker:
        c.enqueue_quietly(queue.CANCEL, job_id)
    return jsonify(body), 202


def _request_cancel(s: Session, job: Job) -> bool:
    """Move the job towards CANCELLED; True when a worker must tear servers down."""
    outcome = repo.request_cancel(s, job.id)
    if outcome is repo.CancelRequest.FINISHED:
        s.expire(job)
        raise JobTerminal(
            f"job {job.id} already finished ({job.state})", details={"state": job.state}
        )
    if outcome is repo.CancelRequest.BUSY:
        raise InvalidRequest(f"job {job.id} is changing state too fast to cancel; retry")
    return outcome is repo.CancelRequest.TEARDOWN


@bp.delete("/v1/jobs/<job_id>")
def delete(job_id: str) -> tuple[str, int]:
    c = ctx()
    with c.session() as s:
        job = _job(s, job_id)
        state = JobState(job.state)
        if not state.terminal:
            raise JobNotTerminal(
                f"job {job_id} is {state.value}; cancel it first", details={"state": state.value}
            )
        pending = [
            r.name for r in repo.resources(s, job_id) if r.state != ResourceState.DELETED.value
        ]
        if pending:
            raise TeardownPending(
                f"job {job_id} still has servers being deleted; retry later",
                details={"resources": pending},
            )
        if evaluations.holds_teardown(s, job_id):
            raise TeardownPending(
                f"job {job_id}'s evaluation gate has not decided yet (its evaluator's server "
                "is deleted once it has); retry later",
                details={"evaluation_pending": True},
            )
        if job.trust_id is not None:
            # the job finished moments ago: its teardown has yet to look for servers under its
            # tag and let the trust go (only it may: after the trust nothing can see them)
            c.enqueue_quietly(queue.TEARDOWN, job_id)
            raise TeardownPending(
                f"job {job_id}'s teardown is finishing (its Keystone trust is still held); "
                "retry later",
                details={"trust_held": True},
            )
        repo.delete_job(s, job_id)
    return "", 204


# -- logs, events, metrics ----------------------------------------------------------------


@bp.get("/v1/jobs/<job_id>/logs")
def logs(job_id: str) -> Response:
    c = ctx()
    offset = _int_arg("offset", 0, 0, 1 << 62)
    follow = bool_arg("follow")
    limit = _int_arg("limit", LOG_CHUNK, 1, MAX_LOG_LIMIT)
    with c.session() as s:
        job = _job(s, job_id)
        state = job.state
        replica = _replica_arg(job) or 0
        if not follow:
            data, nxt = repo.read_log(s, job_id, offset, limit, replica=replica)
    headers = {"X-Job-State": state, "Cache-Control": "no-store"}
    if not follow:
        headers["X-Next-Offset"] = str(nxt)
        return Response(data, mimetype="text/plain", headers=headers)
    timeout = _float_arg("timeout", DEFAULT_FOLLOW_SECONDS, 0, MAX_FOLLOW_SECONDS)
    gen = _follow(c, job_id, offset, timeout, _follow_interval(), replica)
    headers["X-Accel-Buffering"] = "no"  # proxies must not buffer a followed log
    return Response(gen, mimetype="text/plain", headers=headers)


def _replica_arg(job: Job) -> int | None:
    """The replica `?replica=` names (`chief`: 0, `worker-<k>`: k); None when not given; 400
    naming the job's replicas for one it does not have."""
    name = request.args.get("replica")
    if name is None:
        return None
    try:
        spec = JobSpec.model_validate(job.spec)
        return cluster.replica_index(name, spec.shape())
    except ValueError as e:
        raise InvalidRequest(str(e), details={"parameter": "replica"}) from e


def _follow_interval() -> float:
    return float(current_app.config["LOG_FOLLOW_INTERVAL"])


def _follow(
    c: Context, job_id: str, offset: int, timeout: float, interval: float, replica: int = 0
) -> Iterator[bytes]:
    """New log bytes as they are stored, until the job is terminal and all is sent."""
    deadline = time.monotonic() + timeout
    pos = offset
    while True:
        with c.session() as s:
            try:
                # state first, then bytes, in one transaction: whatever was stored before
                # the job became terminal is in this read
                state = JobState(repo.get_job(s, job_id).state)
            except NotFound:
                return  # deleted while followed
            data, pos_after = repo.read_log(s, job_id, pos, LOG_CHUNK, replica=replica)
        if data:
            pos = pos_after
            yield data
            continue
        if state.terminal or time.monotonic() >= deadline:
            return
        time.sleep(min(interval, max(0.0, deadline - time.monotonic())))


@bp.get("/v1/jobs/<job_id>/events")
def events(job_id: str) -> Response:
    c = ctx()
    with c.session() as s:
        job = _job(s, job_id)
        replica = _replica_arg(job)
        shape = JobSpec.model_validate(job.spec).shape()
        rows = repo.events(s, job_id)
        if replica is not None:  # the replica's own events (chief: those of the job)
            rows = [e for e in rows if (e.replica or 0) == replica]
        body = {
            "events": [
                {
                    "at": iso(e.at),
                    "kind": e.kind,
                    "from": e.from_state,
                    "to": e.to_state,
                    "message": e.message,
                    "replica": None
                    if e.replica is None
                    else cluster.replica_name(e.replica, shape),
                }
                for e in rows
            ]
        }
    return jsonify(body)


@bp.get("/v1/jobs/<job_id>/metrics")
def metrics(job_id: str) -> Response:
    c = ctx()
    with c.session() as s:
        replica = _replica_arg(_job(s, job_id)) or 0
        body: dict[str, Any] = {"metrics": repo.metrics(s, job_id, replica)}
    return jsonify(body)
