"""Teardown: delete every server of a finished or cancelled job until the backend confirms."""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, cast

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from service import queue, trusts
from service.backends import registry
from service.backends.interfaces import ComputeBackend, ServerState
from service.db import evaluations
from service.db import jobs as repo
from service.db.models import Job, Resource, utcnow
from service.domain.errors import BackendError
from service.domain.states import FailureReason, JobState, ResourceState
from workers import chaos, jobctx, ssh
from workers.jobctx import db, log

if TYPE_CHECKING:
    from openstack.connection import Connection

DELETE_DEADLINE = 60.0


class TeardownIncomplete(BackendError):
    """Some server is not confirmed deleted yet; the task retries (and the reconciler too)."""

    reason: str = FailureReason.TEARDOWN_INCOMPLETE


def run(job_id: str) -> None:
    cfg = jobctx.settings()
    with db() as s:
        job = repo.get_job(s, job_id)
        if not (job.state in (JobState.CANCELLING.value,) or JobState(job.state).terminal):
            return
        trust_id = job.trust_id
        if (job.spec or {}).get("tuning"):
            _cancel_trials(s, job_id)  # a tuning job's trials end with it
        backend = jobctx.compute(trust_id)
        # an evaluation gate not yet DONE keeps its server, the job's tag and its trust (its
        # own step enqueues this teardown again when it is done: workers/steps/evaluate.py)
        held = evaluations.holds_teardown(s, job_id)
        spec = job.spec or {}
        recorded = [
            r
            for r in repo.resources(s, job_id)
            if r.state != ResourceState.DELETED and not (held and r.role == evaluations.ROLE)
        ]
        rows = [
            (r.id, r.server_id, r.creating, r.name, r.created_at, r.host, r.port) for r in recorded
        ]
        if held and not rows:
            return
        if not rows and job.state != JobState.CANCELLING:
            if trust_id is not None:
                release_trust(job_id, trust_id)  # (sweeps first)
            else:
                _sweep(backend, job_id, spec)
            return  # already paid
        chaos.pause("teardown")
        for r in recorded:
            r.state = ResourceState.DELETING.value
    pending = []
    for res_id, server_id, creating, name, created_at, host, port in rows:
        if server_id is None and creating is None:
            # recorded, never claimed, and never will be: a claim needs the job ALLOCATING
            # (allocate.py holds the job's row for it), and it has moved on
            _deleted(res_id)
            continue
        if server_id is None:
            # claimed: the boot may still be under way in another task: look it up by name
            found = [r for r in backend.list_servers(("stackml-job", job_id)) if r.name == name]
            if found:
                server_id = found[0].id
            elif _age(created_at) < cfg.boot_deadline + 30:
                pending.append(name)
                continue
        if server_id is not None:
            backend.delete_server(server_id)
            deadline = time.monotonic() + DELETE_DEADLINE
            while backend.get_server(server_id).state != ServerState.DELETED:
                if time.monotonic() > deadline:
                    pending.append(name)
                    break
                time.sleep(0.2)
            else:
                _deleted(res_id)
        else:
            _deleted(res_id)
        if host:
            ssh.drop_host(host, port or 22)
    if pending:
        with db() as s:
            for r in repo.resources(s, job_id):
                if r.name in pending:
                    r.delete_attempts += 1
        raise TeardownIncomplete(f"servers not yet deleted: {', '.join(pending)}")
    if held:
        from workers.admission import admit_waiting

        with db() as s:
            repo.add_event(s, job_id, "teardown", "servers deleted; the gate's evaluator is kept")
        admit_waiting()
        return  # the sweep and the trust wait for the evaluation
    _sweep(backend, job_id, spec)
    if rows:
        from workers.admission import admit_waiting

        admit_waiting()
    with db() as s:
        # the key dies with the servers it opened
        s.execute(update(Job).where(Job.id == job_id).values(ssh_key_enc=None))
        if repo.transition(
            s, job_id, JobState.CANCELLING, JobState.CANCELLED, "cancelled; servers deleted"
        ):
            log.info("job %s cancelled", job_id)
        else:
            repo.add_event(s, job_id, "teardown", "all servers deleted")
    if trust_id is not None:
        release_trust(job_id, trust_id, swept=True)


def _cancel_trials(s: Session, job_id: str) -> None:
    """Cancel the active trials of a tuning job that is cancelled or ended (each trial's own
    cancel task tears its servers down)."""
    from service.db.tuning import trial_rows

    for child in trial_rows(s, job_id):
        if JobState(child.state).terminal:
            continue
        asked = repo.request_cancel(s, child.id, f"its tuning job {job_id} ended")
        if asked is repo.CancelRequest.TEARDOWN:
            repo.add_event(s, job_id, "trial", f"trial {child.trial} ({child.id}) cancelled")
            s.commit()  # before the cancel task looks
            jobctx.next_step(queue.CANCEL, child.id)


def _sweep(backend: ComputeBackend, job_id: str, spec: Mapping[str, Any] | None = None) -> None:
    """Delete what the backend still lists under the job's tag once every recorded server is
    gone: a server no row names (a create that answered an error after the cloud had made it);
    then, for a distributed job, what connected its replicas (`release_peer_group`: the
    OpenStack backend's security group of the job). Done through the job's own backend (its
    trust, in its project) before the trust goes: after that nothing of stackml can see that
    project any more."""
    for ref in backend.list_servers(("stackml-job", job_id)):
        if backend.get_server(ref.id).state is ServerState.DELETED:
            continue  # listed while on its way out (a cloud that soft-deletes)
        backend.delete_server(ref.id)
        deadline = time.monotonic() + DELETE_DEADLINE
        while backend.get_server(ref.id).state != ServerState.DELETED:
            if time.monotonic() > deadline:
                raise TeardownIncomplete(f"server {ref.id} ({ref.name}) not yet deleted")
            time.sleep(0.2)
        log.warning("job %s: deleted server %s (%s) that no record named", job_id, ref.id, ref.name)
        with db() as s:
            repo.add_event(
                s, job_id, "teardown", f"deleted server {ref.id} ({ref.name}): no record named it"
            )
    if spec is None:
        with db() as s:
            spec = s.scalar(select(Job.spec).where(Job.id == job_id)) or {}
    if (
        spec.get("type") != "batch_prediction"
        and int((spec.get("resources") or {}).get("workers") or 1) > 1
    ):
        backend.release_peer_group(job_id)


def release_trust(job_id: str, trust_id: str, *, swept: bool = False) -> bool:
    """Delete the job's Keystone trust once its servers are gone: first sweeps the job's tag
    through the trust (unless the caller has just done so), since after the trust nothing can.
    False when that or Keystone failed: the reconciler retries every finished job's trust until
    it is gone."""
    if not swept:
        try:
            _sweep(jobctx.compute(trust_id), job_id)
        except BackendError as e:
            if not trusts.refused(e):
                log.warning("job %s: trust kept until its tag is swept (retried): %s", job_id, e)
                return False
            # the trust no longer logs in: nothing can be seen through it; `delete` says why
    try:
        outcome = trusts.delete(jobctx.settings(), trust_id, _logged_in(trust_id))
    except trusts.TrustUnavailable as e:
        log.warning("job %s: trust not deleted yet (the reconciler retries): %s", job_id, e)
        return False
    registry.forget_trust(trust_id)
    with db() as s:
        cleared = s.execute(
            update(Job).where(Job.id == job_id, Job.trust_id == trust_id).values(trust_id=None)
        ).rowcount  # type: ignore[attr-defined]
        if cleared:
            repo.add_event(
                s,
                job_id,
                "teardown",
                "Keystone trust deleted"
                if outcome == "deleted"
                else "Keystone trust already gone (deleted by its user, or no longer usable)",
            )
    return True


def _logged_in(trust_id: str) -> Connection | None:
    """The connection of the job's backend, which has (as a rule) logged in through the trust
    already, so deleting the trust costs no second Keystone login; None when it cannot be
    made (then `delete` makes its own, and tells a trust that is gone from a Keystone that does
    not answer)."""
    connection = getattr(jobctx.compute(trust_id), "connection", None)
    if connection is None:
        return None
    try:
        return cast("Connection", connection())
    except BackendError as e:
        log.info("trust %s: the job's backend cannot log in (%s)", trust_id, e)
        return None


def _deleted(res_id: int) -> None:
    with db() as s:
        r = s.get_one(Resource, res_id)
        r.state = ResourceState.DELETED.value
        r.deleted_at = utcnow()


def _age(dt: object) -> float:
    from datetime import UTC, datetime

    assert isinstance(dt, datetime)
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return (datetime.now(UTC) - dt).total_seconds()
