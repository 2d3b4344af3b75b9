"""What every job step needs: settings, backends, the job's SSH key, failing and enqueueing."""

from __future__ import annotations

import base64
import hashlib
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime

from cryptography.fernet import Fernet, InvalidToken
from sqlalchemy.orm import Session

from service import queue
from service.backends import registry
from service.backends.interfaces import ComputeBackend, ObjectStore, ServerState
from service.config import Settings, get_settings
from service.db import jobs as repo
from service.db.models import Job, Resource
from service.db.session import session_scope
from service.domain.errors import BackendError
from service.domain.states import FailureReason, JobState, Phase
from workers.ssh import SSHTarget

log = logging.getLogger("stackml.worker")

JOB_DIR = ".stackml/job"
RUNNER = ".stackml/runner.py"


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


def retry_after_ssh_failure(
    job_id: str, task: str, trust_id: str | None, server_id: str | None, error: BackendError
) -> bool:
    """SSH to the job's server failed in a step that may simply run again: when the server is
    still ACTIVE and SSH has been failing in this phase for less than `heartbeat_timeout`
    (counted from the first failure since the job entered its state, which no re-drive
    resets), record it, re-enqueue `task` and say True (a loaded sshd may drop a handshake
    or refuse a key for a while); False when the step should fail the job."""
    cfg = settings()
    if server_id is None:
        return False
    with db() as s:
        since = _failing_since(s, job_id, task)
    if since is not None and (datetime.now(UTC) - since).total_seconds() > cfg.heartbeat_timeout:
        return False
    try:
        state = compute(trust_id).get_server(server_id).state
    except BackendError as e:
        log.warning("job %s: cannot look up server %s: %s", job_id, server_id, e)
        return False
    if state is not ServerState.ACTIVE:
        return False
    with db() as s:
        repo.add_event(s, job_id, _phase(task), f"SSH failed ({error.reason}); retrying")
    next_step(task, job_id, cfg.poll_max)
    return True


def _phase(task: str) -> str:
    return task.removeprefix("stackml.")  # the event kind: provision, export


def _failing_since(s: Session, job_id: str, task: str) -> datetime | None:
    """When the first "SSH failed" event of `task` since the job's last transition was."""
    since = None
    for e in repo.events(s, job_id):
        if e.kind == "transition":
            since = None
        elif e.kind == _phase(task) and since is None and e.message.startswith("SSH failed"):
            since = e.at
    if since is not None and since.tzinfo is None:
        since = since.replace(tzinfo=UTC)
    return since


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
