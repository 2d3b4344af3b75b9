"""A worker of a ParameterServerStrategy job replaced alone (workers/steps/replace.py), on a
real SQLite database: which replica is replaced alone and which ends the run; the poll's
hand-over (the lost row DELETING, one `replace` event, the task enqueued, a second look at
the same loss a no-op, no replacement past max_restarts); a replacement that stopped half-way
handed over again only once no task holds the job's lease."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest

from service.backends.interfaces import Capabilities, HostKeySource
from service.config import Settings
from service.db import jobs as repo
from service.db.models import Job, Resource, utcnow
from service.db.session import session_scope
from service.domain.spec import JobSpec
from service.domain.states import JobState, ResourceState
from tests.unit.test_api_jobs import advance
from workers import jobctx, pipeline
from workers.steps import batch_servers, replace


class Backend:
    def __init__(self, stable: bool) -> None:
        self.capabilities = Capabilities(HostKeySource.RECORD, stable_peer_addresses=stable)


class Env:
    def __init__(self, url: str, steps: list[tuple[str, str]], backend: Backend) -> None:
        self.url, self.steps, self.backend = url, steps, backend

    def job(self, **resources: Any) -> jobctx.StepContext:
        spec = JobSpec.model_validate(
            {
                "name": "ps",
                "trainer": {"package_uri": "local://projects/p/staging/x/t.tar.gz", "module": "t"},
                "resources": {"workers": 3, "parameter_servers": 1} | resources,
                "restart_policy": "OnFailure",
                "max_restarts": 2,
            }
        )
        with session_scope(self.url) as s:
            job_id = repo.create_job(s, "p", spec).id
        advance(self.url, job_id, JobState.ALLOCATING, JobState.PROVISIONING, JobState.RUNNING)
        servers = spec.resources.workers + spec.resources.parameter_servers
        with session_scope(self.url) as s:
            for k in range(servers):
                name = (
                    f"stackml-{job_id}-chief-0"
                    if k == 0
                    else batch_servers.name_of(job_id, k, batch=False, shape=spec.shape())
                )
                s.add(
                    Resource(
                        job_id=job_id,
                        project_id="p",
                        backend="sandbox",
                        role="chief" if k == 0 else batch_servers.role_of(spec, k),
                        name=name,
                        flavor="local.small",
                        state=ResourceState.ACTIVE.value,
                        server_id=f"srv-{k}",
                        host="127.0.0.1",
                    )
                )
        return jobctx.StepContext(
            job_id=job_id,
            state=JobState.RUNNING,
            step=pipeline.PIPELINE[JobState.RUNNING],
            project_id="p",
            trust_id=None,
            spec=spec,
            server_id="srv-0",
            backend="sandbox",
            target=None,
            lease=None,
            job=self.row(job_id),
        )

    def row(self, job_id: str) -> Job:
        with session_scope(self.url) as s:
            return repo.get_job(s, job_id)

    def replace_events(self, job_id: str) -> list[tuple[str, int | None]]:
        with session_scope(self.url) as s:
            return [(e.message, e.replica) for e in repo.events(s, job_id) if e.kind == "replace"]

    def state_of(self, server_id: str) -> str:
        with session_scope(self.url) as s:
            return next(r.state for r in s.query(Resource) if r.server_id == server_id)


@pytest.fixture
def env(settings: Settings, db_url: str, monkeypatch: pytest.MonkeyPatch) -> Env:
    steps: list[tuple[str, str]] = []
    backend = Backend(stable=True)
    monkeypatch.setattr(jobctx, "settings", lambda: settings)
    monkeypatch.setattr(jobctx, "compute", lambda trust_id=None: backend)
    monkeypatch.setattr(
        jobctx, "next_step", lambda task, job_id, countdown=0.0: steps.append((task, job_id))
    )
    return Env(db_url, steps, backend)


def test_only_a_worker_of_a_parameter_server_job_on_stable_addresses_is_replaced_alone(
    env: Env,
) -> None:
    ctx = env.job()
    # the chief and the parameter server end the run; the workers are replaced alone
    assert [replace.alone(ctx, k) for k in range(4)] == [False, True, True, False]
    mwms = env.job(workers=3, parameter_servers=0)
    assert not any(replace.alone(mwms, k) for k in range(3))  # all replicas in sync: restart
    never = ctx.spec.model_copy(update={"restart_policy": "Never"})
    assert not replace.alone(_with(ctx, spec=never), 1)  # no policy: a lost server fails it
    env.backend.capabilities = Capabilities(HostKeySource.CONSOLE, stable_peer_addresses=False)
    assert not replace.alone(ctx, 1)  # a replacement would get another address: restart


def test_begin_hands_the_replica_over_once_and_counts_against_max_restarts(env: Env) -> None:
    ctx = env.job()
    assert replace.begin(ctx, 1, "srv-1", "its server is DELETED")
    assert env.state_of("srv-1") == ResourceState.DELETING.value
    assert env.steps == [(replace.TASK, ctx.job_id)]
    (message, replica), *_ = env.replace_events(ctx.job_id)
    assert replica == 1
    assert message == (
        "replacing replica worker-1 alone (ParameterServerStrategy; replacement 1 of 2): "
        "its server is DELETED"
    )
    # a second poll that saw the same loss changes nothing
    assert replace.begin(ctx, 1, "srv-1", "its server is DELETED")
    assert len(env.replace_events(ctx.job_id)) == 1 and len(env.steps) == 1
    assert replace.begin(ctx, 2, "srv-2", "its heartbeat stopped")
    # max_restarts 2 used: the next loss restarts or fails the job instead (the caller's)
    assert not replace.begin(ctx, 1, "srv-9", "lost again")
    assert len(env.replace_events(ctx.job_id)) == 2 and len(env.steps) == 2
    assert env.state_of("srv-0") == env.state_of("srv-3") == ResourceState.ACTIVE.value


def test_a_stalled_replacement_is_handed_over_again_once_no_task_holds_the_lease(
    env: Env,
) -> None:
    ctx = env.job()
    replace.resume(ctx)
    assert env.steps == []  # every worker has its live row
    with session_scope(env.url) as s:
        row = next(r for r in s.query(Resource) if r.server_id == "srv-2")
        row.state = ResourceState.DELETED.value  # retired, its replacement not yet booted
        job = s.get_one(Job, ctx.job_id)
        job.step_lease_owner, job.step_lease_until = "x", utcnow() + timedelta(seconds=60)
    replace.resume(ctx)
    assert env.steps == []  # a replace task holds the job: it is at work
    with session_scope(env.url) as s:
        s.get_one(Job, ctx.job_id).step_lease_until = utcnow() - timedelta(seconds=1)
    replace.resume(ctx)
    assert env.steps == [(replace.TASK, ctx.job_id)]


def _with(ctx: jobctx.StepContext, **changes: Any) -> jobctx.StepContext:
    from dataclasses import replace as copy

    return copy(ctx, **changes)
