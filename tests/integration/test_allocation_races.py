"""A cancel racing the allocate step, and the reaper's view of finished jobs, on a real
PostgreSQL: the steps are driven directly (a recorder stands in for the broker, a fake for
Nova) with the cancel made at the worst moments.

What must hold: no server is booted or recorded for a job cancelled before its boot was
claimed; a server booted just before the cancel is deleted by the teardown; a recorded row that
nobody claimed does not hold the teardown up; and a finished job's server that no row names is
reaped, with an event.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from keystoneauth1 import exceptions as ksa_exc
from sqlalchemy import select, update

from service import queue
from service.backends.interfaces import (
    ComputeBackend,
    Flavor,
    ServerRef,
    ServerSpec,
    ServerState,
    ServerStatus,
)
from service.db import jobs as repo
from service.db.migrate import upgrade
from service.db.models import Job, JobEvent, Resource, utcnow
from service.db.session import session_scope
from service.domain.errors import CloudError
from service.domain.states import JobState, OwnerKind, QueueWait, ResourceState
from tests.integration.test_admission import FLAVORS, Env, submit
from tests.pgutil import temp_database
from workers import admission, chaos, jobctx, reconciler
from workers.steps import allocate, teardown


class Cloud(ComputeBackend):
    """Servers that are ACTIVE at once (an hour old), listed by tag, deleted on request;
    `on_create` runs once a server exists (where a test cancels)."""

    name = "fake"

    def __init__(self) -> None:
        self.servers: dict[str, ServerRef] = {}
        self.deleted: list[str] = []
        self.listed = 0
        self.on_create: Callable[[], None] = lambda: None

    def flavors(self) -> list[Flavor]:
        return list(FLAVORS)

    def create_server(self, spec: ServerSpec) -> ServerRef:
        ref = ServerRef(id=f"srv-{len(self.servers) + len(self.deleted) + 1}", name=spec.name)
        self.servers[ref.id] = ServerRef(ref.id, spec.name, spec.tags)
        self.on_create()
        return ref

    def get_server(self, server_id: str) -> ServerStatus:
        if server_id not in self.servers:
            return ServerStatus(id=server_id, state=ServerState.DELETED)
        return ServerStatus(
            id=server_id,
            state=ServerState.ACTIVE,
            host="127.0.0.1",
            host_key="ssh-ed25519 AAAAtest",
            created_at=time.time() - 3600,
        )

    def delete_server(self, server_id: str) -> None:
        if self.servers.pop(server_id, None) is not None:
            self.deleted.append(server_id)

    def list_servers(self, tag: tuple[str, str] | None = None) -> list[ServerRef]:
        self.listed += 1
        return [r for r in self.servers.values() if tag is None or tag in r.tags]

    def console_log(self, server_id: str, tail_bytes: int = 8192) -> str:
        return ""


@pytest.fixture(scope="module")
def pg() -> Iterator[str]:
    with temp_database("allocation_races") as url:
        upgrade(url)
        yield url


@pytest.fixture
def env(pg: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Env]:
    e = Env(pg, tmp_path)
    e.settings = e.make_settings(orphan_grace=60.0)
    cloud = Cloud()
    e.cloud = cloud  # type: ignore[assignment]
    with session_scope(pg) as s:
        for table in ("job_events", "job_labels", "resources", "jobs", "quotas", "fair_share"):
            s.execute(Job.metadata.tables[table].delete())
    monkeypatch.setattr(jobctx, "settings", lambda: e.settings)
    monkeypatch.setattr(jobctx, "compute", lambda trust_id=None: cloud)
    monkeypatch.setattr(
        jobctx, "next_step", lambda task, job_id, countdown=0.0: e.enqueued.append((task, job_id))
    )
    yield e


def cloud_of(env: Env) -> Cloud:
    assert isinstance(env.cloud, Cloud)
    return env.cloud


def cancel(env: Env, job_id: str) -> None:
    """What `POST /v1/jobs/{id}/cancel` does to an ALLOCATING job."""
    with session_scope(env.url) as s:
        assert repo.transition(
            s, job_id, JobState.ALLOCATING, JobState.CANCELLING, "cancel requested"
        )


def rows(env: Env, job_id: str) -> list[tuple[str | None, str]]:
    with session_scope(env.url) as s:
        return [
            (r.server_id, r.state)
            for r in s.scalars(select(Resource).where(Resource.job_id == job_id))
        ]


def job_state(env: Env, job_id: str) -> str:
    with session_scope(env.url) as s:
        return repo.get_job(s, job_id).state


def test_cancel_while_allocate_looks_boots_and_records_nothing(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The cancel lands after the step saw ALLOCATING and before it recorded the server (a slow
    login through the job's trust, here the chaos pause): nothing is recorded or booted, and
    the teardown finishes the cancel at once."""
    job = submit(env, "p1", "a")
    monkeypatch.setattr(
        chaos, "pause", lambda step: cancel(env, job) if step == "allocate" else None
    )
    allocate.run(job)
    assert job_state(env, job) == "CANCELLING"
    assert cloud_of(env).servers == {} and cloud_of(env).deleted == []
    assert rows(env, job) == []
    teardown.run(job)
    assert job_state(env, job) == "CANCELLED"


def test_cancel_right_after_the_boot_deletes_the_server(env: Env) -> None:
    """The cancel lands while Nova creates the server: the step does not take the job on, and
    the teardown deletes the server it recorded."""
    job = submit(env, "p1", "a")
    cloud_of(env).on_create = lambda: cancel(env, job)
    allocate.run(job)
    assert job_state(env, job) == "CANCELLING"  # not PROVISIONING
    assert list(cloud_of(env).servers) == ["srv-1"]
    assert rows(env, job) == [("srv-1", ResourceState.ACTIVE.value)]
    assert env.enqueued[-1] == (queue.TEARDOWN, job)
    teardown.run(job)
    assert job_state(env, job) == "CANCELLED"
    assert cloud_of(env).servers == {} and cloud_of(env).deleted == ["srv-1"]
    assert rows(env, job) == [("srv-1", ResourceState.DELETED.value)]


def test_a_recorded_row_nobody_claimed_does_not_hold_the_teardown_up(env: Env) -> None:
    """A run recorded the server row and then lost the job to a cancel before claiming the
    boot: no run can claim it any more, so the teardown forgets it without waiting for a boot
    that cannot come, and a late allocate run does not boot it either."""
    job = submit(env, "p1", "a")
    with session_scope(env.url) as s:
        j = repo.get_job(s, job)
        j.state = JobState.ALLOCATING.value
        s.add(
            Resource(
                job_id=job,
                project_id="p1",
                backend="fake",
                role="chief",
                name=f"stackml-{job}-chief-0",
                flavor="local.small",
                state=ResourceState.BOOTING.value,
            )
        )
    cancel(env, job)
    teardown.run(job)
    assert job_state(env, job) == "CANCELLED"
    assert rows(env, job) == [(None, ResourceState.DELETED.value)]
    assert cloud_of(env).listed == 1  # the final sweep only: no looking for the row's server
    allocate.run(job)
    assert cloud_of(env).servers == {}


def _tagged(cloud: Cloud, job_id: str, name: str) -> str:
    return cloud.create_server(
        ServerSpec(
            name=name,
            flavor=FLAVORS[0],
            image="tf",
            public_key="",
            tags=(("stackml-job", job_id), ("stackml-role", "chief")),
        )
    ).id


def test_reaper_deletes_a_finished_jobs_server_that_no_row_names(env: Env) -> None:
    cloud = cloud_of(env)
    done = submit(env, "p1", "done")
    debt = submit(env, "p1", "debt")
    running = submit(env, "p1", "running")
    with session_scope(env.url) as s:
        for j, st in ((done, "SUCCEEDED"), (debt, "FAILED"), (running, "RUNNING")):
            repo.get_job(s, j).state = st
    unnamed = _tagged(cloud, done, f"stackml-{done}-chief-0")  # e.g. a boot no row recorded
    owed = _tagged(cloud, debt, f"stackml-{debt}-chief-0")
    live = _tagged(cloud, running, f"stackml-{running}-chief-0")
    stranger = _tagged(cloud, "job-unknown", "stackml-job-unknown-chief-0")
    with session_scope(env.url) as s:
        s.add(  # the failed job's server is a recorded teardown debt: the teardown's to pay
            Resource(
                job_id=debt,
                project_id="p1",
                backend="fake",
                role="chief",
                name=f"stackml-{debt}-chief-0",
                server_id=owed,
                flavor="local.small",
                state=ResourceState.DELETING.value,
            )
        )
    report = reconciler.Report()
    reconciler._reap_orphans(report)
    assert sorted(report.reaped) == sorted([unnamed, stranger])
    assert set(cloud.servers) == {owed, live}
    with session_scope(env.url) as s:
        events = list(
            s.scalars(
                select(JobEvent.message).where(JobEvent.job_id == done, JobEvent.kind == "reaper")
            )
        )
    assert events == [f"deleted server {unnamed} (stackml-{done}-chief-0): no record named it"]


def test_reaper_leaves_young_servers_alone(env: Env) -> None:
    env.settings = env.make_settings(orphan_grace=7200.0)  # the fake's servers are 1 h old
    _tagged(cloud_of(env), "job-unknown", "stackml-job-unknown-chief-0")
    report = reconciler.Report()
    reconciler._reap_orphans(report)
    assert report.reaped == [] and len(cloud_of(env).servers) == 1


def test_teardown_deletes_a_server_of_the_job_that_no_row_names(env: Env) -> None:
    """A create that answered an error after the cloud had made the server leaves the row
    forgotten and the server up; the job's teardown finds it by the job's tag (through the
    job's own backend: its trust, in its project) before the trust goes."""
    cloud = cloud_of(env)
    job = submit(env, "p1", "a")
    with session_scope(env.url) as s:
        repo.get_job(s, job).state = JobState.FAILED.value
    stray = _tagged(cloud, job, f"stackml-{job}-chief-0")
    other = _tagged(cloud, "job-other", "stackml-job-other-chief-0")
    teardown.run(job)
    assert set(cloud.servers) == {other}
    assert cloud.deleted == [stray]
    with session_scope(env.url) as s:
        events = list(
            s.scalars(
                select(JobEvent.message).where(JobEvent.job_id == job, JobEvent.kind == "teardown")
            )
        )
    assert events == [f"deleted server {stray} (stackml-{job}-chief-0): no record named it"]
    teardown.run(job)  # again: nothing left, nothing said
    assert cloud.deleted == [stray]


# -- the trust goes only after the job's tag was swept ------------------------------------


@pytest.fixture
def keystone(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Stands in for Keystone's trust deletion; records the trusts deleted."""
    deleted: list[str] = []

    def delete(settings: object, trust_id: str, conn: object = None) -> str:
        deleted.append(trust_id)
        return "deleted"

    monkeypatch.setattr(teardown.trusts, "delete", delete)
    return deleted


def _with_trust(env: Env, job_id: str, state: JobState) -> None:
    with session_scope(env.url) as s:
        job = repo.get_job(s, job_id)
        job.state, job.trust_id = state.value, "trust-1"


def test_a_trust_debt_is_paid_only_after_the_jobs_tag_was_swept(
    env: Env, keystone: list[str]
) -> None:
    """The reconciler pays a finished job's trust (no live rows) before its teardown ran: the
    stray server a failed create left in the job's project is deleted first, through the
    trust, and only then the trust."""
    cloud = cloud_of(env)
    job = submit(env, "p1", "a")
    _with_trust(env, job, JobState.FAILED)
    stray = _tagged(cloud, job, f"stackml-{job}-chief-0")
    order: list[str] = []
    cloud.delete_server = lambda sid, d=cloud.delete_server: (order.append("server"), d(sid))[1]  # type: ignore[method-assign]
    keystone_delete = teardown.trusts.delete
    teardown.trusts.delete = lambda *a, **k: (order.append("trust"), keystone_delete(*a, **k))[1]  # type: ignore[assignment]
    report = reconciler.Report()
    reconciler._pay_debts(report)
    assert report.trusts == [job]
    assert order == ["server", "trust"] and cloud.deleted == [stray]
    assert keystone == ["trust-1"]
    with session_scope(env.url) as s:
        assert repo.get_job(s, job).trust_id is None


def test_a_trust_is_kept_while_its_tag_cannot_be_swept(
    env: Env, keystone: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    cloud = cloud_of(env)
    job = submit(env, "p1", "a")
    _with_trust(env, job, JobState.SUCCEEDED)

    def nova_down(tag: object = None) -> list[ServerRef]:
        raise CloudError("listing servers: 503 Service Unavailable")

    monkeypatch.setattr(cloud, "list_servers", nova_down)
    assert teardown.release_trust(job, "trust-1") is False
    assert keystone == []  # kept: the next round tries again
    with session_scope(env.url) as s:
        assert repo.get_job(s, job).trust_id == "trust-1"

    def trust_refused(tag: object = None) -> list[ServerRef]:
        try:
            raise ksa_exc.Unauthorized("The request you have made requires authentication.")
        except ksa_exc.Unauthorized as e:
            raise CloudError("connecting to the cloud: 401") from e

    monkeypatch.setattr(cloud, "list_servers", trust_refused)
    # the trust no longer logs in (its user deleted it): nothing to sweep through it; `delete`
    # is asked and says what became of it
    assert teardown.release_trust(job, "trust-1") is True
    assert keystone == ["trust-1"]


def _stale(env: Env, job_id: str) -> None:
    with session_scope(env.url) as s:
        s.execute(
            update(Job)
            .where(Job.id == job_id)
            .values(last_progress_at=utcnow() - timedelta(minutes=5))
        )


def test_the_reconciler_reads_the_queue_wait_column_not_the_prose(env: Env) -> None:
    """A job admission parked is admission's to advance; one in a quota backoff, or one whose
    message was lost, is re-driven. Decided by jobs.queue_wait, whatever queue_reason says."""
    parked, backoff = submit(env, "p1", "parked"), submit(env, "p1", "backoff")
    with session_scope(env.url) as s:
        admission.park(s, repo.get_job(s, parked), "quota exceeded, as a person reads it")
        s.execute(
            update(Job)
            .where(Job.id == backoff)
            .values(queue_reason="waiting (prose only)", queue_wait=QueueWait.BACKOFF.value)
        )
    _stale(env, parked)
    _stale(env, backoff)
    report = reconciler.Report()
    reconciler._redrive(report)
    assert report.redriven == [backoff]


def test_a_claimed_boot_is_not_booted_again_and_is_adopted_by_name(env: Env) -> None:
    """The claim is a column: a second allocate run finds the row claimed (creating set, no
    server id), boots nothing, and adopts the server by name once the first run created it."""
    job = submit(env, "p1", "a")
    second: list[list[tuple[str | None, str]]] = []

    def during_create() -> None:
        # inside the first run's create_server: the row is claimed, its server not recorded
        with session_scope(env.url) as s:
            (res,) = s.scalars(select(Resource).where(Resource.job_id == job))
            assert (res.server_id, res.creating is not None) == (None, True)
        allocate.run(job)  # a second run (a redelivery) while the boot is under way
        second.append(rows(env, job))

    cloud_of(env).on_create = during_create
    allocate.run(job)
    assert len(cloud_of(env).servers) == 1  # booted once
    (server_id,) = cloud_of(env).servers
    assert second == [[(server_id, ResourceState.ACTIVE.value)]]  # adopted, not booted
    with session_scope(env.url) as s:
        (res,) = s.scalars(select(Resource).where(Resource.job_id == job))
        assert (res.server_id, res.creating, res.owner_kind, res.owner_id) == (
            server_id,
            None,
            "job",
            job,
        )
        assert repo.owned_resources(s, OwnerKind.JOB, job) == [res]
    assert job_state(env, job) == "PROVISIONING"
