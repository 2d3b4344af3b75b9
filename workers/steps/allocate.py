"""Allocate: admit the job, boot its server, and follow the boot until ACTIVE.

Each run is short: it creates the server (recorded before the call), looks at it once and,
while it builds, hands itself back with a countdown. A flavor that finds no valid host or
builds past `boot_deadline` is deleted and the next (flavor, zone) of the plan is tried; a
quota refusal puts the job back in QUEUED with a backoff instead of failing it.
"""

from __future__ import annotations

import contextlib
import secrets
import time
from datetime import UTC, datetime, timedelta

from sqlalchemy import delete, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from service import queue
from service.backends.interfaces import (
    ComputeBackend,
    Flavor,
    HostKeySource,
    ServerSpec,
    ServerState,
    ServerStatus,
    gpu_candidates,
)
from service.db import jobs as repo
from service.db.models import Job, Resource, utcnow
from service.domain import cluster
from service.domain.errors import BackendError, QuotaExceeded, TransientBackendError
from service.domain.flavors import allocation_plan
from service.domain.spec import JobSpec
from service.domain.states import FailureReason, JobState, Phase, QueueWait, ResourceState
from workers import admission, jobctx, ssh
from workers.jobctx import db, log

BUILD_RECHECK = 0.5  # while another run holds the boot, or the console's host key is awaited
BUILD_RECHECK_MIN = 0.25  # the first looks at a building server: a sandbox is up in ~0.2 s
BUILD_RECHECK_MAX = 5.0  # a Nova boot of 30 s is looked at ~15 times, seen <= 5 s late
CAPACITY_WAIT = admission.CAPACITY_WAIT
DELETE_CONFIRM = 30.0


def build_recheck(age: float, deadline: float) -> float:
    """Seconds until the next look at a server that has been building for `age` s: half its
    age, within [BUILD_RECHECK_MIN, BUILD_RECHECK_MAX], and never past the boot deadline (by
    more than the minimum). Polls thin out as a boot grows long: a 30 s Nova boot costs about
    15 status calls instead of 60, a sub-second sandbox boot is seen as soon as before."""
    wait = min(BUILD_RECHECK_MAX, max(BUILD_RECHECK_MIN, age / 2))
    return max(BUILD_RECHECK_MIN, min(wait, deadline - age))


def plan(spec: JobSpec) -> list[tuple[str, str | None]]:
    """The (flavor, availability zone) pairs to try, in order (service/domain/flavors.py): the
    job's flavor (or the best-fitting GPU flavors) then the configured fallbacks, in every
    configured zone."""
    cfg = jobctx.settings()
    res = spec.resources
    if res.gpus:
        firsts = [
            f.name for f in gpu_candidates(jobctx.compute().flavors(), res.gpus, res.gpu_type)
        ]
    else:
        firsts = [res.flavor or cfg.default_flavor]
    return allocation_plan(firsts, cfg.flavor_fallbacks, cfg.availability_zones, cfg.default_flavor)


def run(job_id: str) -> None:
    with db() as s:
        found = s.execute(select(Job.state, Job.queue_wait).where(Job.id == job_id)).first()
    if found is None:
        return  # deleted (by hand): nothing to allocate
    state, wait = JobState(found[0]), found[1]
    if state is JobState.QUEUED and wait == QueueWait.PARKED:
        return  # parked by a decision: admission enqueues its step when its turn comes
    if state is JobState.QUEUED:
        if not _admit(job_id):
            return
    elif state is not JobState.ALLOCATING:
        return
    _advance(job_id)


def _admit(job_id: str) -> bool:
    """QUEUED -> ALLOCATING when the job's backoff is over and admission chooses it: within
    its project's quota, the platform's server cap, and its fair turn (workers/admission.py).

    True when the job is ALLOCATING (admitted now, or on another job's turn while this step
    was on its way); False when it stays QUEUED, with its reason."""
    with db() as s:
        admission.lock(s)  # first: every admission decision is taken under it, in one order
        job = s.scalars(select(Job).where(Job.id == job_id).with_for_update()).one()
        if job.state != JobState.QUEUED:
            return job.state == JobState.ALLOCATING
        if job.not_before is not None and _aware(job.not_before) > datetime.now(UTC):
            wait = (_aware(job.not_before) - datetime.now(UTC)).total_seconds()
            repo.touch(s, job_id)
            jobctx.next_step(queue.ALLOCATE, job_id, wait)
            return False
        done = admission.admit(s, booting_message)
        admitted = job_id in done.admitted
        if not admitted and job_id not in done.waiting:
            # no re-enqueue: admission admits it when its turn comes (admission.py)
            admission.park(s, job, f"{admission.WAITING} for its turn")
    for other in done.enqueue:
        jobctx.next_step(queue.ALLOCATE, other)
    return admitted


def booting_message(job: Job) -> str:
    """The admission event: what the first allocation attempt boots."""
    spec = JobSpec.model_validate(job.spec)
    steps = plan(spec)
    flavor, zone = steps[min(job.alloc_attempt, len(steps) - 1)]
    where = f" in zone {zone}" if zone else ""
    if not spec.batch and spec.servers() > 1:
        return (
            f"booting the chief's {flavor} server{where} "
            f"(then {spec.servers() - 1} more for its replicas)"
        )
    return f"booting one {flavor} server{where}"


def _advance(job_id: str) -> None:
    with jobctx.open_step(job_id, JobState.ALLOCATING) as ctx:
        if ctx is not None:
            _look(ctx)


def _look(ctx: jobctx.StepContext) -> None:
    """One look at the current attempt: create, wait, accept, or move to the next attempt."""
    cfg = jobctx.settings()
    job_id, spec, project_id = ctx.job_id, ctx.spec, ctx.project_id
    backend = jobctx.compute(ctx.trust_id)
    steps = plan(spec)
    attempt, restarts = ctx.job.alloc_attempt, ctx.job.restarts
    flavor_name, zone = steps[min(attempt, len(steps) - 1)]
    if ctx.job.ssh_key_enc is None:
        # compare-and-set: two allocate runs of one job must agree on one key
        pem, pub = ssh.generate_keypair()
        with db() as s:
            s.execute(
                update(Job)
                .where(Job.id == job_id, Job.ssh_key_enc.is_(None))
                .values(ssh_key_enc=jobctx.encrypt_key(pem), ssh_public_key=pub)
            )
    if restarts:
        retire(backend, job_id)  # an earlier run's server, if its deletion is not confirmed yet
    # a restarted job's servers get new names (workers/steps/restart.py)
    name = f"stackml-{job_id}-chief-{attempt}" + (f"-r{restarts}" if restarts else "")
    with contextlib.suppress(IntegrityError):  # another run recorded it first: use theirs
        with db() as s:
            if not _hold_allocating(s, job_id):
                return  # cancelled (or moved on) while this run looked: record nothing
            if s.scalars(select(Resource.id).where(Resource.name == name)).first() is None:
                # recorded before the boot: a crash after it leaves a row the reconciler pays
                s.add(
                    Resource(
                        job_id=job_id,
                        project_id=project_id,
                        backend=backend.name,
                        role="chief",
                        name=name,
                        flavor=flavor_name,
                        state=ResourceState.BOOTING.value,
                    )
                )
    with db() as s:
        if not _hold_allocating(s, job_id):
            return  # cancelled since: the teardown forgets the unclaimed row
        res = s.scalars(select(Resource).where(Resource.name == name)).one()
        res_id, server_id, created = res.id, res.server_id, _aware(res.created_at)
        public_key = s.scalar(select(Job.ssh_public_key).where(Job.id == job_id)) or ""
        busy = server_id is None and res.creating is not None  # another run claimed it
        if server_id is None and not busy:
            # claim the creation: only the run that wins this compare-and-set boots a server
            won = s.execute(
                update(Resource)
                .where(
                    Resource.id == res_id,
                    Resource.server_id.is_(None),
                    Resource.creating.is_(None),
                )
                .values(creating=secrets.token_hex(4))
            ).rowcount  # type: ignore[attr-defined]
            busy = not won
    if busy:
        # another run is creating this server (or died doing it: adopt it by name later)
        found = [r for r in backend.list_servers(("stackml-job", job_id)) if r.name == name]
        if found:
            server_id = found[0].id
            with db() as s:
                row = s.get_one(Resource, res_id)
                row.server_id, row.creating = server_id, None
        else:
            with db() as s:
                # only while the job is ALLOCATING (its row held first): an unclaimed row of a
                # job that moved on is forgotten by the teardown at once, while a claimed one
                # is looked for by name until the boot that claimed it must be over
                late = (datetime.now(UTC) - created).total_seconds() > cfg.boot_deadline
                if _hold_allocating(s, job_id) and late:
                    # the run that claimed it died before creating anything: claim again
                    s.execute(
                        update(Resource)
                        .where(Resource.id == res_id, Resource.server_id.is_(None))
                        .values(creating=None)
                    )
            jobctx.next_step(queue.ALLOCATE, job_id, BUILD_RECHECK)
            return
    replicas = 1 if spec.batch else spec.servers()
    if server_id is None and replicas > 1 and backend.peer_network is not None:
        _forget(res_id)
        jobctx.fail(
            job_id,
            Phase.ALLOCATE,
            FailureReason.ALLOCATION_FAILED,
            f"a job of {replicas} replicas needs its servers connected: {backend.peer_network}",
        )
        return
    if server_id is None:
        flavor = backend.find_flavor(flavor_name)
        if flavor is None:
            _forget(res_id)
            jobctx.fail(
                job_id,
                Phase.ALLOCATE,
                FailureReason.UNKNOWN_FLAVOR,
                f"flavor {flavor_name!r} is not offered by the {backend.name} backend",
            )
            return
        existing = [r for r in backend.list_servers(("stackml-job", job_id)) if r.name == name]
        refusal = None if existing else _cloud_quota_refuses(backend, flavor)
        if refusal is not None:
            _drop(res_id)  # no server was made: the retry starts with a fresh row and clock
            _back_to_queue(job_id, refusal)
            return
        try:
            ref = (
                existing[0]
                if existing
                else backend.create_server(
                    ServerSpec(
                        name=name,
                        flavor=flavor,
                        image=spec.runtime.key,
                        public_key=public_key,
                        tags=(
                            ("stackml-job", job_id),
                            ("stackml-role", "chief"),
                            ("stackml-project", project_id),
                        ),
                        availability_zone=zone,
                        **cluster.peer_spec(job_id, replicas),
                    )
                )
            )
        except QuotaExceeded as e:
            _drop(res_id)  # no server was made: the retry starts with a fresh row and clock
            _back_to_queue(job_id, str(e))
            return
        except TransientBackendError:
            raise  # the task retries with backoff; the row stays for the next try
        except BackendError as e:
            _forget(res_id)
            jobctx.fail(
                job_id,
                Phase.ALLOCATE,
                FailureReason.of(e.reason),
                f"could not boot the server: {e}",
            )
            return
        server_id = ref.id
        with db() as s:
            repo.touch(s, job_id)  # the job's row first, then the resource's (one lock order)
            row = s.get_one(Resource, res_id)
            row.server_id, row.creating = server_id, None

    status = backend.get_server(server_id)
    age = (datetime.now(UTC) - created).total_seconds()
    if status.state is ServerState.ACTIVE:
        console_key = backend.capabilities.host_key_source is HostKeySource.CONSOLE
        if status.host_key is None and console_key and age <= cfg.boot_deadline:
            # cloud-init prints the host key on the console shortly after ACTIVE: wait for it
            # rather than trusting the first key that answers
            with db() as s:
                repo.touch(s, job_id)
            jobctx.next_step(queue.ALLOCATE, job_id, BUILD_RECHECK)
            return
        _accept(job_id, res_id, server_id, status)
        return
    if status.state is ServerState.BUILD:
        if age <= cfg.boot_deadline:
            with db() as s:
                repo.touch(s, job_id)
            jobctx.next_step(queue.ALLOCATE, job_id, build_recheck(age, cfg.boot_deadline))
            return
        why, reason = f"still building after {cfg.boot_deadline:.0f}s", FailureReason.TIMEOUT
    elif status.state is ServerState.ERROR and status.fault_reason == FailureReason.NO_VALID_HOST:
        why, reason = f"no valid host: {status.fault}", FailureReason.NO_VALID_HOST
    elif status.state is ServerState.ERROR:
        _discard(backend, res_id, server_id)
        jobctx.fail(
            job_id,
            Phase.ALLOCATE,
            FailureReason.BOOT_FAILED,
            f"server {server_id} failed: {status.fault}",
        )
        return
    else:
        _discard(backend, res_id, server_id)
        jobctx.fail(
            job_id,
            Phase.ALLOCATE,
            FailureReason.SERVER_LOST,
            f"server {server_id} vanished while booting",
        )
        return
    _discard(backend, res_id, server_id)
    _next_attempt(job_id, attempt, len(steps), flavor_name, zone, why, reason)


def _cloud_quota_refuses(backend: ComputeBackend, flavor: Flavor) -> str | None:
    """Why the project's own cloud quota (Nova's absolute limits) has no room for one more
    server of `flavor`, or None; backends without limits (the sandbox) never refuse. A cloud
    that cannot say is not a refusal: the boot itself then answers."""
    try:
        lim = backend.limits()
    except BackendError as e:
        log.warning("could not read the cloud's limits (booting anyway): %s", e)
        return None
    if lim is None or lim.fits(flavor, 1):
        return None
    parts = []
    for what, limit, used, more in (
        ("instances", lim.max_instances, lim.instances_used, 1),
        ("cores", lim.max_cores, lim.cores_used, flavor.vcpus),
        ("RAM MB", lim.max_ram_mb, lim.ram_used_mb, flavor.ram_mb),
    ):
        if limit >= 0 and used + more > limit:
            parts.append(f"{what} {used} of {limit} used, {flavor.name} needs {more}")
    return f"the cloud project's limits leave no room ({'; '.join(parts)})"


def _next_attempt(
    job_id: str,
    attempt: int,
    total: int,
    flavor: str,
    zone: str | None,
    why: str,
    reason: FailureReason,
) -> None:
    where = f" in zone {zone}" if zone else ""
    if attempt + 1 >= total:
        tried = f" (tried {total} flavor/zone choices)" if total > 1 else ""
        jobctx.fail(job_id, Phase.ALLOCATE, reason, f"{flavor}{where}: {why}{tried}")
        return
    with db() as s:
        job = repo.get_job(s, job_id)
        if job.state != JobState.ALLOCATING or job.alloc_attempt != attempt:
            return
        job.alloc_attempt = attempt + 1
        nxt = plan(JobSpec.model_validate(job.spec))[attempt + 1]
        repo.add_event(
            s,
            job_id,
            "retry",
            f"{flavor}{where}: {why}; trying {nxt[0]}" + (f" in zone {nxt[1]}" if nxt[1] else ""),
        )
        repo.touch(s, job_id)
    jobctx.next_step(queue.ALLOCATE, job_id)


def _back_to_queue(job_id: str, message: str) -> None:
    """Quota refusals are the cloud saying 'later': wait in QUEUED with a growing backoff."""
    cfg = jobctx.settings()
    with db() as s:
        waits = sum(
            1
            for e in repo.events(s, job_id)
            if e.kind == "transition"
            and e.from_state == JobState.ALLOCATING
            and e.to_state == JobState.QUEUED
        )
        backoff = min(cfg.quota_backoff_max, cfg.quota_backoff_min * 2**waits)
        reason = f"quota exceeded: {message}; retrying in {backoff:.0f}s"
        moved = repo.transition(
            s,
            job_id,
            JobState.ALLOCATING,
            JobState.QUEUED,
            reason,
            queue_reason=reason,
            queue_wait=QueueWait.BACKOFF.value,
            not_before=utcnow() + timedelta(seconds=backoff),
        )
    if moved:
        log.info("job %s back in QUEUED: %s", job_id, reason)
        jobctx.next_step(queue.ALLOCATE, job_id, backoff)


def _hold_allocating(s: Session, job_id: str) -> bool:
    """Whether the job is still ALLOCATING, holding its row until `s` commits.

    A write, so that it locks on every database (PostgreSQL: the row; SQLite: the database):
    a cancel moves the job on with an UPDATE of the same row, so it waits for this transaction
    or this transaction sees it. No server row is recorded or claimed for a cancelled job, and
    a row left unclaimed when the job moves on can never be claimed (the teardown forgets it).
    """
    held = s.execute(
        update(Job)
        .where(Job.id == job_id, Job.state == JobState.ALLOCATING.value)
        .values(last_progress_at=utcnow())
    ).rowcount  # type: ignore[attr-defined]
    return bool(held)


def _accept(job_id: str, res_id: int, server_id: str, status: ServerStatus) -> None:
    with db() as s:
        # the job's row first, as the claim does (one lock order: job, then resource)
        _hold_allocating(s, job_id)
        res = s.get_one(Resource, res_id)
        if res.state == ResourceState.BOOTING.value:  # (else a teardown has it already)
            res.state = ResourceState.ACTIVE.value
            res.active_at = utcnow()
        res.host, res.port, res.username = status.host, status.port, status.username
        res.host_key = status.host_key
        moved = repo.transition(
            s,
            job_id,
            JobState.ALLOCATING,
            JobState.PROVISIONING,
            f"server {server_id} is ACTIVE at {status.host}",
        )
    if moved:
        jobctx.next_step(queue.PROVISION, job_id)
    else:
        # cancelled or failed while booting: the server must not outlive the job
        log.info("job %s left ALLOCATING while its server booted; tearing down", job_id)
        jobctx.next_step(queue.TEARDOWN, job_id)


def _forget(res_id: int) -> None:
    """A resource row whose server was never created."""
    with db() as s:
        r = s.get_one(Resource, res_id)
        r.state, r.deleted_at = ResourceState.DELETED.value, utcnow()


def _drop(res_id: int) -> None:
    """Remove the row of a server that was never asked for (unclaimed, or claimed by this
    run, which then decided not to boot it)."""
    with db() as s:
        s.execute(delete(Resource).where(Resource.id == res_id, Resource.server_id.is_(None)))


def _discard(backend: ComputeBackend, res_id: int, server_id: str) -> None:
    """Delete a failed attempt's server; unconfirmed deletions are paid by the teardown."""
    with db() as s:
        s.get_one(Resource, res_id).state = ResourceState.DELETING.value
    try:
        backend.delete_server(server_id)
    except BackendError as e:
        log.warning("deleting failed server %s: %s (teardown retries)", server_id, e)
        return
    deadline = time.monotonic() + DELETE_CONFIRM
    while backend.get_server(server_id).state is not ServerState.DELETED:
        if time.monotonic() > deadline:
            return
        time.sleep(0.2)
    _forget(res_id)


def retire(backend: ComputeBackend, job_id: str) -> None:
    """Delete the servers of the job's earlier runs (rows DELETING while the job is active: a
    restart marked them, workers/steps/restart.py). Each deletion is confirmed for up to
    DELETE_CONFIRM; one not confirmed stays DELETING, for the next allocate run or the
    teardown."""
    with db() as s:
        rows = [
            (r.id, r.server_id, r.host, r.port)
            for r in repo.resources(s, job_id)
            if r.state == ResourceState.DELETING.value
        ]
    for res_id, server_id, host, port in rows:
        if host:
            ssh.drop_host(host, port or 22)
        if server_id is None:
            _forget(res_id)
        else:
            _discard(backend, res_id, server_id)


def _aware(dt: datetime) -> datetime:
    return dt if dt.tzinfo is not None else dt.replace(tzinfo=UTC)
