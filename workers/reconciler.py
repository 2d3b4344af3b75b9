"""The reconciler (beat): re-drives stalled jobs, pays teardown debts (servers, then Keystone
trusts), reaps orphan servers; for endpoints: probes ready replicas, re-drives stalled ones,
reaps their orphan servers (in the service project, and through each live endpoint's trust in
its own project), and deletes the trusts DELETED endpoints still hold.

Safe to run twice at once: every re-drive is a compare-and-set on the job's progress stamp,
so only one reconciler hands a given job on. A job whose step holds a live lease (a long
export or provision, heartbeat-renewed) is never re-driven: see workers/pipeline.py.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from datetime import timedelta

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError

from service import queue
from service.backends.interfaces import ServerState
from service.db import jobs as repo
from service.db.models import Job, Resource, utcnow
from service.domain.errors import BackendError
from service.domain.states import TERMINAL, JobState, ResourceState
from workers import jobctx, pipeline
from workers.jobctx import db, log
from workers.steps import evaluate, register, teardown


@dataclass
class Report:
    redriven: list[str] = field(default_factory=list)
    debts: list[str] = field(default_factory=list)
    reaped: list[str] = field(default_factory=list)
    admitted: list[str] = field(default_factory=list)
    trusts: list[str] = field(default_factory=list)  # jobs whose Keystone trust was deleted
    endpoints: list[str] = field(default_factory=list)  # endpoints re-driven
    endpoint_trusts: list[str] = field(default_factory=list)  # DELETED ones' trusts deleted
    versions: list[int] = field(default_factory=list)  # model versions re-registered
    evaluations: list[int] = field(default_factory=list)  # evaluation gates re-driven


def run() -> Report:
    from workers.admission import admit_waiting

    report = Report()
    report.admitted = admit_waiting()
    _redrive(report)
    _pay_debts(report)
    _reap_orphans(report)
    _endpoints(report)
    stuck = utcnow() - timedelta(seconds=jobctx.settings().stuck_after)
    report.versions = register.redrive_stalled(stuck)  # lost stackml.register_version tasks
    report.evaluations = evaluate.redrive_stalled(stuck)  # lost stackml.evaluate tasks
    return report


def _endpoints(report: Report) -> None:
    """Endpoints: probe every ready replica (a replica failing `serving_health_failures`
    checks in a row, or whose server vanished, gets its endpoint re-driven: replaced), re-drive
    endpoints that stalled (or whose label moved), reap endpoint servers no live row names, and
    delete the Keystone trusts of DELETED endpoints (after sweeping their tags through them)."""
    from workers.steps import serve

    cfg = jobctx.settings()
    for endpoint_id in serve.ready_endpoints():
        try:
            if serve.check_health(endpoint_id):
                with db() as s:
                    from service.db import endpoints as ep_repo
                    from service.domain.endpoints import EndpointState

                    ep_repo.set_state(s, endpoint_id, EndpointState.UPDATING, [EndpointState.READY])
                serve.enqueue(endpoint_id)
                report.endpoints.append(endpoint_id)
        except BackendError as e:
            log.warning("endpoint %s: health check failed: %s", endpoint_id, e)
    for endpoint_id in serve.stalled(utcnow() - timedelta(seconds=cfg.stuck_after)):
        serve.enqueue(endpoint_id)
        report.endpoints.append(endpoint_id)
    _reap_endpoint_servers(report)
    _pay_endpoint_trusts(report)


def _pay_endpoint_trusts(report: Report) -> None:
    """A DELETED endpoint still holding its Keystone trust (Keystone or the sweep failed when
    it was deleted): sweep its tag through the trust, then delete the trust (as jobs' trust
    debts, `_pay_debts`)."""
    from service.db import endpoints as ep_repo
    from workers.steps import serve

    with db() as s:
        owed = ep_repo.trust_debts(s)
    for endpoint_id, trust_id in owed:
        if not serve.release_trust(endpoint_id, trust_id):
            break  # Keystone (or the cloud) does not answer: the next round tries again
        report.endpoint_trusts.append(endpoint_id)


def _reap_endpoint_servers(report: Report) -> None:
    """A server tagged `stackml-endpoint` that no live resource row names, past
    `orphan_grace`: a replica's row is written before its server is booted, so nothing will
    delete such a server (its endpoint is DELETED or unknown, or its create answered an error
    after the cloud had made it). The service project's servers are listed as stackml's own;
    an endpoint acting through a trust has its servers in its project, where only its trust
    sees them: each live one's tag is listed through its trust (a DELETED one's tag is swept
    through its trust before the trust goes: `_pay_endpoint_trusts`)."""
    from service.db import endpoints as ep_repo
    from workers.steps import serve

    backend = jobctx.compute()
    servers = [(backend, r) for r in backend.list_servers() if serve.TAG in dict(r.tags)]
    with db() as s:
        trusted = ep_repo.trusted_live(s)
    for endpoint_id, trust_id in trusted:
        through = jobctx.compute(trust_id)
        try:
            servers += [(through, r) for r in through.list_servers((serve.TAG, endpoint_id))]
        except BackendError as e:  # one endpoint's trust must not keep the others unreaped
            log.warning(
                "endpoint %s: cannot list its servers through its trust: %s", endpoint_id, e
            )
    if not servers:
        return
    with db() as s:
        live = s.execute(
            select(Resource.server_id, Resource.name).where(
                Resource.state != ResourceState.DELETED.value
            )
        ).all()
    covered = {x for row in live for x in row if x}
    grace = jobctx.settings().orphan_grace
    for owner, ref in servers:
        if ref.id in covered or ref.name in covered:
            continue
        tagged = dict(ref.tags).get(serve.TAG)
        try:
            status = owner.get_server(ref.id)
            if status.state is ServerState.DELETED:
                continue
            if status.created_at is not None and time.time() - status.created_at < grace:
                continue
            owner.delete_server(ref.id)
        except BackendError as e:  # the next round tries again; the others go on
            log.warning("endpoint %s: cannot reap server %s: %s", tagged, ref.id, e)
            continue
        report.reaped.append(ref.id)
        log.warning("reaped server %s (%s) of endpoint %s: no record", ref.id, ref.name, tagged)


def _redrive(report: Report) -> None:
    cfg = jobctx.settings()
    before = utcnow() - timedelta(seconds=cfg.stuck_after)
    with db() as s:
        # not a job a step holds (live lease), nor one admission keeps parked
        stalled = [(j.id, j.state, j.last_progress_at) for j in repo.stalled_jobs(s, before)]
    for job_id, state, stamp in stalled:
        with db() as s:
            won = s.execute(
                update(Job)
                .where(Job.id == job_id, Job.last_progress_at == stamp, pipeline.no_live_lease())
                .values(last_progress_at=utcnow())
            ).rowcount  # type: ignore[attr-defined]
            if won:
                repo.add_event(
                    s,
                    job_id,
                    "reconcile",
                    f"no progress in {state} for {cfg.stuck_after:.0f}s; re-driven",
                )
        if won:
            jobctx.next_step(pipeline.next_task(JobState(state)), job_id)
            report.redriven.append(job_id)


def _pay_debts(report: Report) -> None:
    with db() as s:
        owed = sorted({r.job_id for r in repo.debts(s) if r.job_id is not None})
        trusts_owed = repo.trust_debts(s)
    for job_id in owed:
        jobctx.next_step(queue.TEARDOWN, job_id)
        report.debts.append(job_id)
    for job_id, trust_id in trusts_owed:
        # a finished job whose servers are gone still holds its Keystone trust
        if not teardown.release_trust(job_id, trust_id):
            break  # Keystone does not answer: the next round tries again
        report.trusts.append(job_id)


def _reap_orphans(report: Report) -> None:
    """Delete, past `orphan_grace`, servers tagged by stackml that nothing will delete: those
    of jobs the database does not know, and those of finished jobs that no live resource row
    names (a row's teardown deletes the rest)."""
    backend = jobctx.compute()
    servers = backend.list_servers()
    if not servers:
        return
    with db() as s:
        states = dict(s.execute(select(Job.id, Job.state)).all())
        live = s.execute(
            select(Resource.server_id, Resource.name).where(
                Resource.state != ResourceState.DELETED.value
            )
        ).all()
    covered = {x for row in live for x in row if x}
    for ref in servers:
        job_id = dict(ref.tags).get("stackml-job")
        if job_id is None:
            continue
        state = states.get(job_id)
        if state is not None and JobState(state) not in TERMINAL:
            continue
        if state is not None and (ref.id in covered or ref.name in covered):
            continue  # a finished job's recorded servers are teardown debts, paid above
        status = backend.get_server(ref.id)
        if status.state is ServerState.DELETED:
            continue
        grace = jobctx.settings().orphan_grace
        if status.created_at is not None and time.time() - status.created_at < grace:
            continue
        backend.delete_server(ref.id)
        report.reaped.append(ref.id)
        if state is None:
            log.warning("reaped orphan server %s (%s) of unknown job %s", ref.id, ref.name, job_id)
            continue
        log.warning("reaped server %s (%s) of finished job %s: no record", ref.id, ref.name, job_id)
        with contextlib.suppress(IntegrityError), db() as s:  # the job was deleted meanwhile
            repo.add_event(
                s, job_id, "reaper", f"deleted server {ref.id} ({ref.name}): no record named it"
            )
