"""The other servers of a job spread over W > 1 servers: a batch prediction job's
`prediction.max_workers`, or a distributed training job's `resources.workers` (its replicas:
the chief is replica 0, these are `worker-1`..`worker-<W-1>`, role `worker`, named
`stackml-<job>-worker-<k>`, booted in the job's peer group so that they reach each other on
the TensorFlow port; after a restart, `stackml-<job>-r<n>-worker-<k>`; its parameter servers
follow as replicas W..W+P-1, role `ps`, `stackml-<job>-ps-<j>`). What follows says
"batch worker"; a training replica goes through the same steps.

Admission counts all W servers of such a job against the quota and the platform's server cap
(service/domain/quota.py `spec_demand`: gang admission, all or none). The allocate step boots
the job's first server (role chief) as for any job: it is worker 0. The provision step boots
workers 1..W-1 here, with the chief's flavor and the job's SSH key:

- `boot`: for each worker without a row, records its `resources` row (role `batch-worker`,
  named `stackml-<job>-batch-<k>`, claimed with `creating`) while the job is still
  PROVISIONING, then creates the server. A teardown that runs meanwhile finds the claimed row
  and looks the server up by name (workers/steps/teardown.py), and the job's tag sweep finds
  any server no row names: a worker's server never outlives the job.
- `wait_active`: one look per server at a time until every one is ACTIVE (with its host key,
  where the cloud gives it on the console), past `boot_deadline` or in ERROR the job fails.
- the provision step prepares each like the chief (runner, predictor, runtime, a job.json that
  says "worker k of W") and starts them all (workers/steps/provision.py).

The poll step reads every worker's exit status and heartbeat (`look`): the job leaves RUNNING
when all exited 0, and fails with the worker's last log lines when one did not. Each worker's
log stays on its server; the job's log is the chief's, and every other worker's last lines are
an event of the job when it ends.

A re-drive of the provision step (a worker killed, a lease lapsed) finds the rows and servers
it made and goes on with them: every step here is idempotent.
"""

from __future__ import annotations

import itertools
import secrets
import time
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import select
from sqlalchemy.orm import Session

from service.backends.interfaces import ComputeBackend, HostKeySource, ServerSpec, ServerState
from service.db import jobs as repo
from service.db.models import Job, Resource, utcnow
from service.domain import cluster
from service.domain.errors import BackendError, TransientBackendError
from service.domain.spec import JobSpec
from service.domain.states import FailureReason, JobState, ResourceState
from workers import jobctx, ssh
from workers.base import TRANSIENT
from workers.jobctx import db, log
from workers.steps.allocate import build_recheck

ROLE = "batch-worker"
REPLICA_ROLE = "worker"  # a distributed training job's replicas 1..W-1
PS_ROLE = "ps"  # its parameter servers, replicas W..W+P-1
EVALUATOR_ROLE = "tf-evaluator"  # its side-car evaluator, replica W+P (not a gate's "evaluator")
ROLES = (ROLE, REPLICA_ROLE, PS_ROLE, EVALUATOR_ROLE)


def shape_of(spec: JobSpec) -> cluster.Shape | None:
    """A training job's replicas by kind (what rows() needs to read a `ps-<j>` or evaluator
    name); None for a batch job, whose servers are all batch workers."""
    return None if spec.batch else spec.shape()


def role_of(spec: JobSpec, worker: int = 1) -> str:
    """The `resources.role` of the job's server `worker` (1..servers-1)."""
    if spec.batch:
        return ROLE
    kind = cluster.role(worker, spec.shape())
    return {"worker": REPLICA_ROLE, "ps": PS_ROLE}.get(kind, EVALUATOR_ROLE)


def name_of(
    job_id: str,
    worker: int,
    *,
    batch: bool = True,
    restarts: int = 0,
    shape: cluster.Shape | None = None,
) -> str:
    """Server `worker`'s name: `stackml-<job>[-r<restarts>]-batch-<k>`, or a replica's
    `...-worker-<k>`, `...-ps-<j>` (a parameter server) or `...-evaluator-0`."""
    run = f"r{restarts}-" if restarts else ""
    tail = f"batch-{worker}" if batch else cluster.replica_name(worker, shape)
    if tail == cluster.EVALUATOR:
        tail += "-0"
    return f"stackml-{job_id}-{run}{tail}"


def label(spec: JobSpec, worker: int) -> str:
    """How messages name server `worker` of the job."""
    if spec.batch:
        return f"batch worker {worker}"
    return f"replica {cluster.replica_name(worker, spec.shape())}"


def count(spec: JobSpec) -> int:
    """The job's servers, the chief included."""
    return spec.servers()


def worker_of(name: str, shape: cluster.Shape | None = None) -> int | None:
    """The worker index a `batch-worker` (or replica) row's name carries: a parameter
    server's `ps-<j>` is replica W + j, the evaluator's replica W + P (`shape`)."""
    parts = name.rsplit("-", 2)
    if not parts[-1].isdigit():
        return None
    kind = parts[1] if len(parts) == 3 else ""
    if kind == cluster.EVALUATOR:
        return None if shape is None else shape.evaluator_index
    if kind == "ps":
        return None if shape is None else shape.workers + int(parts[-1])
    return int(parts[-1])


@dataclass(frozen=True)
class Worker:
    """One of the job's other servers, once ACTIVE."""

    index: int
    server_id: str
    target: ssh.SSHTarget
    resource_id: int = 0
    log_offset: int = 0  # the bytes of its log file stored so far (per-replica logs)


def workers_of(spec_workers: int) -> range:
    """The indexes of the servers this module boots (the chief is worker 0)."""
    return range(1, max(1, spec_workers))


def rows(job_id: str, shape: cluster.Shape | None = None) -> dict[int, Resource]:
    """The job's live `batch-worker` (or replica `worker`, `ps` and evaluator) rows by worker
    index (detached copies; `shape`: the job's replicas by kind, shape_of()); a row being
    deleted is an earlier run's (a restart: workers/steps/restart.py) or a lost replica's."""
    gone = (ResourceState.DELETED.value, ResourceState.DELETING.value)
    with db() as s:
        out = {}
        for r in repo.resources(s, job_id):
            k = worker_of(r.name, shape) if r.role in ROLES else None
            if k is not None and r.state not in gone:
                s.expunge(r)
                out[k] = r
        return out


REPLACING = "replacing"  # resources.replica_state of a replica's replacement until it starts


def boot(
    ctx: jobctx.StepContext, workers: int, state: JobState = JobState.PROVISIONING
) -> list[int]:
    """Create the servers of workers 1..W-1 that have no row yet; returns the worker indexes
    it booted. Raises Cancelled when the job left `state` (cancelled) before all were
    recorded: nothing more is booted. Booted while the job is RUNNING (a replica replaced
    alone: workers/steps/replace.py), a server gets a name no earlier one had (`-x<n>-`) and
    its row says `replacing` until it is started."""
    job_id, spec = ctx.job_id, ctx.spec
    backend = jobctx.compute(ctx.trust_id)
    with db() as s:
        chief = jobctx.chief(s, job_id)
        if chief is None:
            raise BackendError(
                f"job {job_id} has no chief server", reason=FailureReason.SERVER_LOST
            )
        flavor_name = chief.flavor
        job = repo.get_job(s, job_id)
        public_key, restarts = job.ssh_public_key or "", job.restarts
    have = rows(job_id, shape_of(spec))
    missing = [k for k in workers_of(workers) if k not in have]
    if not missing:
        return []
    replacing = state is not JobState.PROVISIONING
    flavor = backend.find_flavor(flavor_name)
    if flavor is None:
        raise BackendError(
            f"flavor {flavor_name!r} is not offered by the {backend.name} backend",
            reason=FailureReason.UNKNOWN_FLAVOR,
        )
    for k in missing:
        role = role_of(spec, k)
        token = secrets.token_hex(4)
        with db() as s:
            job = s.scalars(select(Job).where(Job.id == job_id).with_for_update()).one()
            if job.state != state or job.cancel_requested:
                raise Cancelled(f"job {job_id} left {state.value} while its servers booted")
            name = name_of(job_id, k, batch=spec.batch, restarts=restarts, shape=shape_of(spec))
            if replacing:
                name = _unused(s, name)
            elif s.scalars(select(Resource.id).where(Resource.name == name)).first() is not None:
                continue  # another run of this step recorded it (its lease lapsed)
            s.add(
                Resource(
                    job_id=job_id,
                    project_id=ctx.project_id,
                    backend=backend.name,
                    role=role,
                    name=name,
                    flavor=flavor_name,
                    state=ResourceState.BOOTING.value,
                    creating=token,
                    replica_state=REPLACING if replacing else None,
                )
            )
        try:
            ref = backend.create_server(
                ServerSpec(
                    name=name,
                    flavor=flavor,
                    image=ctx.spec.runtime.key,
                    public_key=public_key,
                    tags=(
                        ("stackml-job", job_id),
                        ("stackml-role", role),
                        ("stackml-project", ctx.project_id),
                    ),
                    **cluster.peer_spec(job_id, 1 if spec.batch else spec.servers(), k),
                )
            )
        except TransientBackendError:
            raise  # the claimed row stays: the next run (or the teardown) adopts it by name
        except BackendError as e:
            raise BackendError(
                f"could not boot the server of {label(spec, k)} of {workers}: {e}",
                reason=e.reason or FailureReason.BOOT_FAILED,
            ) from e
        with db() as s:
            r = s.scalars(select(Resource).where(Resource.name == name)).one()
            r.server_id, r.creating = ref.id, None
    names = [str(k) if spec.batch else cluster.replica_name(k, spec.shape()) for k in missing]
    with db() as s:
        repo.add_event(
            s,
            job_id,
            "provision",
            f"booting {len(missing)} more {flavor_name} server(s) for "
            f"{'batch workers' if spec.batch else 'replicas'} {', '.join(names)} of {workers}",
        )
    return missing


class Cancelled(Exception):
    """The job left the state its servers were being booted in (a cancel): boot no more."""


def _unused(s: Session, name: str) -> str:
    """A replacement's server name: `name` with `-x<n>-` before its replica, the first n that
    no row of any run has."""
    head, kind, k = name.rsplit("-", 2)
    for n in itertools.count(1):
        candidate = f"{head}-x{n}-{kind}-{k}"
        if s.scalars(select(Resource.id).where(Resource.name == candidate)).first() is None:
            return candidate
    raise AssertionError("unreachable")


def wait_active(ctx: jobctx.StepContext, workers: int) -> list[Worker]:
    """Every other worker's server ACTIVE and reachable, in worker order. Raises BackendError
    (the job fails with it) for a server in ERROR, gone, or still building past boot_deadline."""
    cfg = jobctx.settings()
    backend = jobctx.compute(ctx.trust_id)
    console_key = backend.capabilities.host_key_source is HostKeySource.CONSOLE
    while True:
        pending = 0
        oldest = 0.0
        for k, r in sorted(rows(ctx.job_id, shape_of(ctx.spec)).items()):
            if r.state == ResourceState.ACTIVE.value and r.host is not None:
                continue
            age = (datetime.now(UTC) - _aware(r.created_at)).total_seconds()
            server_id = r.server_id or _adopt(backend, ctx.job_id, r)
            if server_id is None:
                if age > cfg.boot_deadline:
                    raise BackendError(
                        f"the server of {label(ctx.spec, k)} was never created",
                        reason=FailureReason.BOOT_FAILED,
                    )
                pending += 1
                oldest = max(oldest, age)
                continue
            status = backend.get_server(server_id)
            awaiting_key = status.host_key is None and console_key
            if status.state is ServerState.ACTIVE and not awaiting_key:
                with db() as s:
                    row = s.get_one(Resource, r.id)
                    if row.state == ResourceState.BOOTING.value:
                        row.state = ResourceState.ACTIVE.value
                        row.active_at = utcnow()
                    row.host, row.port, row.username = status.host, status.port, status.username
                    row.host_key = status.host_key
                continue
            if status.state in (ServerState.ACTIVE, ServerState.BUILD) and (
                age <= cfg.boot_deadline
            ):  # building, or ACTIVE with its host key not yet on the console
                pending += 1
                oldest = max(oldest, age)
                continue
            what = (
                f"still building after {cfg.boot_deadline:.0f}s"
                if status.state in (ServerState.ACTIVE, ServerState.BUILD)
                else f"{status.state.value}: {status.fault or 'no fault given'}"
            )
            raise BackendError(
                f"the server {server_id} of {label(ctx.spec, k)} is {what}",
                reason=FailureReason.BOOT_FAILED,
            )
        if not pending:
            break
        with db() as s:
            repo.touch(s, ctx.job_id)
        time.sleep(build_recheck(oldest, cfg.boot_deadline))
    out = []
    with db() as s:
        job = repo.get_job(s, ctx.job_id)
        for k, r in sorted(rows(ctx.job_id, shape_of(ctx.spec)).items()):
            out.append(Worker(k, str(r.server_id), jobctx.ssh_target(job, r)))
    side = None if ctx.spec.batch else ctx.spec.shape().evaluator_index  # may be lost: optional
    if [w.index for w in out if w.index != side] != [k for k in workers_of(workers) if k != side]:
        raise BackendError(
            f"the job has servers {[w.index for w in out]} beside its chief, not 1..{workers - 1}",
            reason=FailureReason.SERVER_LOST,
        )
    return out


def _adopt(backend: ComputeBackend, job_id: str, r: Resource) -> str | None:
    """A claimed row without a server id (the run that created it died before recording the
    id): the server by its name, recorded on the row; None when there is none (yet)."""
    found = [x for x in backend.list_servers(("stackml-job", job_id)) if x.name == r.name]
    if not found:
        return None
    with db() as s:
        row = s.get_one(Resource, r.id)
        row.server_id, row.creating = found[0].id, None
    log.info("job %s: adopted server %s of %s by name", job_id, found[0].id, r.name)
    return found[0].id


def targets(job_id: str, shape: cluster.Shape | None = None) -> list[Worker]:
    """The job's other workers as they were recorded ACTIVE (for the poll step); `shape` as
    for rows()."""
    out = []
    with db() as s:
        job = repo.get_job(s, job_id)
        for k, r in sorted(rows(job_id, shape).items()):
            if r.host is not None and r.server_id is not None:
                out.append(
                    Worker(k, r.server_id, jobctx.ssh_target(job, r), r.id, r.log_offset or 0)
                )
    return out


def _aware(dt: datetime) -> datetime:
    return dt if dt.tzinfo is not None else dt.replace(tzinfo=UTC)


# -- the poll step's look at the other workers ----------------------------------------------

TAIL_BYTES = 4096
MAX_PULL = 1 << 20


class WorkerLost(BackendError):
    """A batch worker's (or replica's) server is gone (not ACTIVE): the job cannot go on
    (unless the replica is replaced alone: workers/steps/replace.py)."""

    reason: str = FailureReason.SERVER_LOST

    def __init__(self, message: str, index: int = 0, server_id: str = "") -> None:
        super().__init__(message)
        self.index, self.server_id = index, server_id


@dataclass(frozen=True)
class Look:
    """One look at a worker: its exit status text (None while it runs), its heartbeat's mtime
    (None when absent) and, once it exited, the last lines of its log."""

    index: int
    server_id: str
    exit_text: str | None
    heartbeat: float | None
    tail: str
    more: bool = False  # log bytes are left to pull (the poll comes back for them)


def read_small(conn: ssh.SSHConnection, path: str) -> str | None:
    """A small file's text on a job's server, None when it is not there (the trainer or the
    model's graph may write anything in it, or remove it): the exit status the poll reads."""
    try:
        return conn.read_file_from(path, 0, 64).decode("utf-8", "replace")
    except FileNotFoundError:
        return None


def look(ctx: jobctx.StepContext, timeout: float, *, spare: bool = False) -> list[Look]:
    """Every other worker's state, over SSH, and the new bytes of its log, stored as that
    replica's log (GET /v1/jobs/{id}/logs?replica=worker-<k>). A worker whose server is no
    longer ACTIVE raises WorkerLost; an SSH failure to a server still ACTIVE propagates (the
    poll's SSH policy).

    Replicas that decide nothing are let go instead: the side-car evaluator always (lost: its
    row DELETING and one event; not answering SSH: a look as of one still running, so a wait
    for its last evaluation stays bounded by its grace), and with `spare` (the chief exited 0
    under ParameterServerStrategy: training is over) every other replica too (lost: let go;
    not answering: left out of this poll)."""
    out = []
    side = None if ctx.spec.batch else ctx.spec.shape().evaluator_index
    for w in targets(ctx.job_id, shape_of(ctx.spec)):
        try:
            conn = ssh.connection(w.target, timeout=timeout)
            exit_text = read_small(conn, f"{jobctx.JOB_DIR}/exit_code")
            beat = conn.stat(f"{jobctx.JOB_DIR}/heartbeat")
            data = _pull(conn, w.log_offset)  # after exit_code: the log is whole once it is
            tail = _tail(conn) if exit_text is not None else ""
        except ssh.SSHError as e:
            ssh.drop(w.target)
            state = jobctx.compute(ctx.trust_id).get_server(w.server_id).state
            decides = w.index != side and not spare
            if state is not ServerState.ACTIVE and not decides:
                why = f"its server {w.server_id} is {state.value} ({e})"
                _let_go(ctx, w, why if w.index == side else f"{why}, after the chief exited 0")
                continue  # the job goes on without it
            if not decides:
                jobctx.log.warning(
                    "job %s: %s not looked at: %s", ctx.job_id, label(ctx.spec, w.index), e
                )
                if w.index == side:
                    out.append(Look(w.index, w.server_id, None, None, ""))
                continue
            if state is not ServerState.ACTIVE:
                raise WorkerLost(
                    f"the server {w.server_id} of {label(ctx.spec, w.index)} is "
                    f"{state.value} ({e})",
                    w.index,
                    w.server_id,
                ) from e
            raise
        _store_log(ctx.job_id, w, data)
        beat_at = beat.st_mtime if beat else None
        out.append(Look(w.index, w.server_id, exit_text, beat_at, tail, more=len(data) >= MAX_PULL))
    return out


def _let_go(ctx: jobctx.StepContext, w: Worker, why: str) -> None:
    """The server of a replica that decides nothing (look()'s) is gone: its row DELETING (no
    look goes there again; the teardown deletes the server), one event; the job goes on
    without it."""
    with db() as s:
        row = s.get_one(Resource, w.resource_id)
        if row.state in (ResourceState.DELETING.value, ResourceState.DELETED.value):
            return
        row.state = ResourceState.DELETING.value
        repo.add_event(
            s,
            ctx.job_id,
            "poll",
            f"{label(ctx.spec, w.index)} is lost: {why}; the job goes on without it",
            replica=w.index,
        )


def _pull(conn: ssh.SSHConnection, offset: int) -> bytes:
    try:
        return conn.read_file_from(f"{jobctx.JOB_DIR}/log", offset, MAX_PULL)
    except FileNotFoundError:
        return b""


def _store_log(job_id: str, w: Worker, data: bytes) -> None:
    """Store a replica's pulled bytes; a failure (whatever it printed) is logged and never
    keeps the poll from its exit and heartbeat checks."""
    if not data:
        return
    try:
        with db() as s:
            repo.append_replica_log(
                s,
                job_id,
                w.index,
                w.resource_id,
                w.log_offset,
                data,
                max_points=jobctx.settings().max_metric_points,
            )
    except TRANSIENT:
        raise  # the database is down: the task retries, as for any step
    except Exception:  # noqa: BLE001 - a replica's output must never break the poll
        log.exception(
            "job %s: could not store %d log bytes of replica %d", job_id, len(data), w.index
        )


def _tail(conn: ssh.SSHConnection, lines: int = 20) -> str:
    path = f"{jobctx.JOB_DIR}/log"
    try:
        st = conn.stat(path)
        if st is None:
            return ""
        data = conn.read_file_from(path, max(0, st.st_size - TAIL_BYTES), TAIL_BYTES)
    except FileNotFoundError:
        return ""
    return "\n".join(data.decode("utf-8", "replace").splitlines()[-lines:])
