"""What every job step needs: settings, backends, the job's SSH key, failing and enqueueing."""

from __future__ import annotations

import base64
import functools
import hashlib
import logging
import py_compile
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from cryptography.fernet import Fernet, InvalidToken
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from service import queue
from service.backends import registry
from service.backends.interfaces import ComputeBackend, ObjectStore, ServerState
from service.config import Settings, get_settings
from service.db import jobs as repo
from service.db.models import Job, Resource, utcnow
from service.db.session import session_scope
from service.domain.errors import BackendError, TransientBackendError
from service.domain.spec import JobSpec
from service.domain.states import FailureReason, JobState, Phase
from workers import chaos, pipeline
from workers.ssh import SSHConnection, SSHTarget

log = logging.getLogger("stackml.worker")

JOB_DIR = ".stackml/job"
RUNNER = ".stackml/runner.py"
# The runner is started as a module, not a script: its bytecode is cached beside it after the
# first command (a script is compiled again at every start), and with -S (it is stdlib only)
# the runtime's site-packages are not scanned. -I: no PYTHON* variables, no user site.
_RUN_MODULE = (
    "import runpy,sys;sys.path.insert(0,sys.argv.pop(1));"
    "runpy.run_module('runner',run_name='__main__',alter_sys=True)"
)


RUNNER_SRC = Path(__file__).resolve().parent / "vm" / "runner.py"


@functools.cache
def _runner_bytecode() -> tuple[str, bytes]:
    """runner.py compiled by this worker's Python, checked against the source by hash (an mtime
    would not survive the upload): where it goes in the server's __pycache__, and its bytes."""
    with tempfile.TemporaryDirectory() as tmp:
        cfile = Path(tmp) / "runner.pyc"
        py_compile.compile(
            str(RUNNER_SRC),
            cfile=str(cfile),
            doraise=True,
            optimize=0,  # what the server's python loads under that name, whatever runs here
            invalidation_mode=py_compile.PycInvalidationMode.CHECKED_HASH,
        )
        return f"runner.{sys.implementation.cache_tag}.pyc", cfile.read_bytes()


def warm() -> None:
    """Work every worker process does once, done before the pool forks (celery_app)."""
    cfg = settings()
    _runner_bytecode()
    registry.capabilities(cfg.compute)  # imports the backend's module
    from workers import admission  # noqa: F401 - imported by teardown on its first run


def ship_runner(conn: SSHConnection, *dirs: str) -> None:
    """Make `dirs` (and the runner's own) and put runner.py and its bytecode on the server: the
    first command does not compile it (~9 ms of CPU). A runtime whose Python differs looks for
    another file name and compiles the source, as before."""
    where = RUNNER.rsplit("/", 1)[0]
    for d in (*dirs, f"{where}/__pycache__"):
        conn.makedirs(d)
    conn.put_bytes(RUNNER_SRC.read_bytes(), RUNNER, 0o644)
    name, code = _runner_bytecode()
    conn.put_bytes(code, f"{where}/__pycache__/{name}", 0o644)


def runner_argv(python: str, command: str, job_dir: str, runner: str = RUNNER) -> list[str]:
    """The remote command line of `runner.py <command> <job_dir>` run by `python`."""
    where, name = runner.rsplit("/", 1)
    assert name == "runner.py", runner
    return [python, "-I", "-S", "-c", _RUN_MODULE, where, command, job_dir]


def settings() -> Settings:
    return get_settings()


def compute(trust_id: str | None = None) -> ComputeBackend:
    """The compute backend; for a job with a Keystone trust (Job.trust_id), the one acting
    through it in the job's project."""
    return registry.compute(trust_id=trust_id)


def store(project_id: str | None = None, trust_id: str | None = None) -> ObjectStore:
    """The object store; for a job's project and trust, that project's own (service/trusts.py)."""
    return registry.store(project_id=project_id, trust_id=trust_id)


@contextmanager
def db() -> Iterator[Session]:
    with session_scope(settings().db_url) as s:
        yield s


def _fernet() -> Fernet:
    key = hashlib.sha256(b"stackml-ssh-keys:" + settings().signing_key()).digest()
    return Fernet(base64.urlsafe_b64encode(key))


def encrypt_key(pem: str) -> bytes:
    return _fernet().encrypt(pem.encode())


def decrypt_key(blob: bytes) -> str:
    try:
        return _fernet().decrypt(blob).decode()
    except InvalidToken as e:
        raise BackendError(
            "the job's SSH key cannot be decrypted with the configured secret",
            reason=FailureReason.SECRET_MISMATCH,
        ) from e


def ssh_target(job: Job, res: Resource) -> SSHTarget:
    if job.ssh_key_enc is None or res.host is None:
        raise BackendError(
            f"job {job.id} has no reachable server", reason=FailureReason.SERVER_LOST
        )
    return SSHTarget(
        host=res.host,
        port=res.port or 22,
        username=res.username or "root",
        private_key_pem=decrypt_key(job.ssh_key_enc),
        host_key=res.host_key,
    )


def chief(s: Session, job_id: str) -> Resource | None:
    rows = [r for r in repo.resources(s, job_id) if r.role == "chief"]
    return rows[-1] if rows else None


@dataclass(frozen=True)
class StepContext:
    """What a step knows about its job once `open_step` let it in: read once, typed."""

    job_id: str
    state: JobState
    step: pipeline.Step
    project_id: str
    trust_id: str | None
    spec: JobSpec
    server_id: str | None  # the chief server (None: no server row)
    backend: str | None  # the name of the backend that booted it
    target: SSHTarget | None  # how to reach it (None: no server row, or a step without one)
    lease: pipeline.Lease | None  # held while the step runs (leased steps)
    # the job's row as the step found it (detached): what the step reads of it once, not the
    # fields other steps write while it runs (read those again)
    job: Job

    @property
    def phase(self) -> Phase:
        return self.step.phase


# reasons of errors that say "not now" rather than "never": a step failing with one of them is
# left to the reconciler (re-driven after stuck_after) instead of failing the job
LATER = frozenset({FailureReason.STORE_UNAVAILABLE, FailureReason.KEYSTONE_UNAVAILABLE})


@contextmanager
def open_step(
    job_id: str, state: JobState, *, leased: bool | None = None
) -> Iterator[StepContext | None]:
    """The one prologue of the job steps (allocate, provision, poll, export): None when the job is
    not in `state` (moved on, or a cancel was asked while it runs) or when another run of a
    leased step holds the job; else its context, with the lease held (and renewed by a
    heartbeat) until the block ends. A BackendError that is not transient escaping the block
    fails the job with its reason (a transient one propagates: the task retries). `leased`
    overrides the step's own (a task beside the state's step that must not run twice)."""
    step = pipeline.PIPELINE[state]
    cfg = settings()
    lease = None
    if step.leased if leased is None else leased:
        # compare-and-set on the state: a job that moved on takes no lease
        lease = pipeline.take_lease(cfg.db_url, job_id, state, pipeline.lease_ttl(cfg))
        if lease is None:
            log.info("job %s: moved on, or another %s step holds it", job_id, step.step)
            yield None
            return
    with pipeline.heartbeat(cfg.db_url, lease) if lease else nullcontext():
        if lease is not None:
            chaos.pause(step.step)
        with db() as s:  # one read: the check and the context
            job = repo.get_job(s, job_id)
            moved_on = job.state != state or job.cancel_requested
            res = None if moved_on else chief(s, job_id)
        if moved_on:
            yield None
            return
        ctx = StepContext(
            job_id=job_id,
            state=state,
            step=step,
            project_id=job.project_id,
            trust_id=job.trust_id,
            spec=JobSpec.model_validate(job.spec),
            server_id=res.server_id if res else None,
            backend=res.backend if res else None,
            target=ssh_target(job, res) if res and step.server else None,
            lease=lease,
            job=job,
        )
        if lease is None:
            chaos.pause(step.step)
        try:
            yield ctx
        except TransientBackendError:
            raise  # the task retries with backoff
        except BackendError as e:
            if FailureReason.of(e.reason) in LATER:
                raise  # a service that does not answer now: the reconciler re-drives the step
            # a backend refused for good (a store that will not list, a key that will not
            # decrypt): the job fails with the error's reason, never sits in its state
            log.warning("job %s: %s failed: %s", job_id, step.step, e)
            fail(job_id, step.phase, FailureReason.of(e.reason), f"{step.step} failed: {e}")


def again(ctx: StepContext, countdown: float) -> None:
    """Hand the step back to the queue (the lease goes first: the next run must find it free)."""
    if ctx.lease is not None:
        pipeline.release_lease(settings().db_url, ctx.lease)
    next_step(ctx.step.task, ctx.job_id, countdown)


def retry_after_ssh_failure(ctx: StepContext, error: BackendError) -> bool:
    """The one SSH-failure policy of the server steps. SSH to the job's server failed in a step
    that may simply run again: when the server is still ACTIVE and SSH has been failing in this
    state for less than `heartbeat_timeout` (counted from the first failure since the job
    entered its state: jobs.ssh_failing_since, which a transition clears and no re-drive
    resets), record it, hand the step back and say True (a loaded sshd may drop a handshake or
    refuse a key for a while); False when the step should fail the job."""
    cfg = settings()
    if ctx.server_id is None:
        return False
    with db() as s:
        s.execute(
            update(Job)
            .where(Job.id == ctx.job_id, Job.ssh_failing_since.is_(None))
            .values(ssh_failing_since=utcnow())
        )
        since = s.scalar(select(Job.ssh_failing_since).where(Job.id == ctx.job_id))
    if since is not None and since.tzinfo is None:
        since = since.replace(tzinfo=UTC)
    if since is not None and (datetime.now(UTC) - since).total_seconds() > cfg.heartbeat_timeout:
        return False
    try:
        state = compute(ctx.trust_id).get_server(ctx.server_id).state
    except BackendError as e:
        log.warning("job %s: cannot look up server %s: %s", ctx.job_id, ctx.server_id, e)
        return False
    if state is not ServerState.ACTIVE:
        return False
    with db() as s:
        repo.add_event(s, ctx.job_id, ctx.step.step, f"SSH failed ({error.reason}); retrying")
    again(ctx, cfg.poll_max)
    return True


def ssh_failing_for(job_id: str) -> float:
    """Seconds SSH has been failing in the job's state (0 when it is not)."""
    with db() as s:
        since = s.scalar(select(Job.ssh_failing_since).where(Job.id == job_id))
    if since is None:
        return 0.0
    if since.tzinfo is None:
        since = since.replace(tzinfo=UTC)
    return (datetime.now(UTC) - since).total_seconds()


def next_step(task: str, job_id: str, countdown: float = 0.0) -> None:
    """Enqueue; a lost message is re-driven by the reconciler, so a broker error only logs."""
    try:
        queue.enqueue(task, job_id, countdown)
    except Exception as e:  # noqa: BLE001 - any broker failure is recoverable by the reconciler
        log.warning(
            "could not enqueue %s for %s (the reconciler will re-drive it): %s", task, job_id, e
        )


def fail(job_id: str, phase: Phase, reason: FailureReason, message: str) -> bool:
    """Fail an active job (not one being cancelled) and start its teardown."""
    expected = [s_ for s_ in JobState if not s_.terminal and s_ is not JobState.CANCELLING]
    with db() as s:
        moved = repo.transition(
            s, job_id, expected, JobState.FAILED, failure=repo.Failure(phase, reason, message)
        )
    if moved:
        log.info("job %s failed in %s: %s: %s", job_id, phase, reason, message)
    next_step(queue.TEARDOWN, job_id)
    return moved
