"""Fair-share admission on a real PostgreSQL: the allocate step's `_admit` and the reconciler's
`admit_waiting`, driven directly (a recorder stands in for the broker, a fake for Nova)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select, update

from service import queue
from service.backends.compute.openstack import ComputeLimits
from service.backends.interfaces import (
    ComputeBackend,
    Flavor,
    ServerRef,
    ServerSpec,
    ServerState,
    ServerStatus,
)
from service.config import QuotaDefaults, Settings
from service.db import jobs as repo
from service.db import quotas
from service.db.migrate import upgrade
from service.db.models import Job, JobEvent, Resource
from service.db.session import session_scope
from service.domain.spec import JobSpec
from service.domain.states import JobState, Phase, ResourceState
from tests.pgutil import recorded_statements, temp_database
from workers import admission, jobctx
from workers.steps import allocate

FLAVORS = [
    Flavor("local.small", 1, 2048, price_per_hour=0.05),
    Flavor("gpu.2", 8, 65536, gpus=2, gpu_type="A100", price_per_hour=4.0),
]


class FakeCloud(ComputeBackend):
    """Flavors, servers that are ACTIVE at once, and optionally Nova's absolute limits."""

    name = "fake"

    def __init__(self) -> None:
        self.created: list[str] = []
        self.limits_now: ComputeLimits | None = None

    def flavors(self) -> list[Flavor]:
        return list(FLAVORS)

    def create_server(self, spec: ServerSpec) -> ServerRef:
        self.created.append(spec.name)
        return ServerRef(id=f"srv-{len(self.created)}", name=spec.name, tags=spec.tags)

    def get_server(self, server_id: str) -> ServerStatus:
        return ServerStatus(
            id=server_id,
            state=ServerState.ACTIVE,
            host="127.0.0.1",
            host_key="ssh-ed25519 AAAAtest",
        )

    def delete_server(self, server_id: str) -> None:
        pass

    def list_servers(self, tag: tuple[str, str] | None = None) -> list[ServerRef]:
        return []

    def console_log(self, server_id: str, tail_bytes: int = 8192) -> str:
        return ""


class Cloud(FakeCloud):
    def limits(self) -> ComputeLimits:
        assert self.limits_now is not None
        return self.limits_now


class Env:
    def __init__(self, url: str, tmp: Path) -> None:
        self.url = url
        self.tmp = tmp
        self.enqueued: list[tuple[str, str]] = []
        self.cloud = Cloud()
        self.settings = self.make_settings()

    def make_settings(self, **kw: Any) -> Settings:
        base: dict[str, Any] = {
            "database_url": self.url,
            "data_dir": self.tmp,
            "secret_key": "admission-test",
            "max_servers": 0,
            "quota_defaults": QuotaDefaults(jobs=10, servers=10, gpus=4),
        }
        base.update(kw)
        return Settings(**base)


@pytest.fixture(scope="module")
def pg() -> Iterator[str]:
    with temp_database("admission") as url:
        upgrade(url)
        yield url


@pytest.fixture
def env(pg: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Env]:
    e = Env(pg, tmp_path)
    with session_scope(pg) as s:  # each test starts from an empty platform
        for table in ("job_events", "job_labels", "resources", "jobs", "quotas", "fair_share"):
            s.execute(Job.metadata.tables[table].delete())
    monkeypatch.setattr(jobctx, "settings", lambda: e.settings)
    monkeypatch.setattr(jobctx, "compute", lambda trust_id=None: e.cloud)
    monkeypatch.setattr(
        jobctx, "next_step", lambda task, job_id, countdown=0.0: e.enqueued.append((task, job_id))
    )
    monkeypatch.setattr(quotas, "flavor_table", lambda settings=None: {f.name: f for f in FLAVORS})
    yield e


_clock = [datetime(2026, 11, 1, 9, 0, tzinfo=UTC)]


def submit(env: Env, project: str, name: str, **extra: Any) -> str:
    """A QUEUED job; created_at strictly increasing so that FIFO is unambiguous."""
    spec = JobSpec.model_validate(
        {
            "name": name,
            "trainer": {"package_uri": "local://p/x.tar.gz", "module": "trainer.task"},
            **extra,
        }
    )
    _clock[0] += timedelta(seconds=1)
    with session_scope(env.url) as s:
        job = repo.create_job(s, project, spec)
        job.created_at = _clock[0]
        return job.id


def set_quota(env: Env, project: str, **values: int) -> None:
    with session_scope(env.url) as s:
        quotas.set_overrides(s, project, values)


def state(env: Env, job_id: str) -> tuple[str, str | None]:
    with session_scope(env.url) as s:
        job = repo.get_job(s, job_id)
        return job.state, job.queue_reason


def finish(env: Env, job_id: str) -> None:
    with session_scope(env.url) as s:
        assert repo.transition(
            s,
            job_id,
            [JobState.ALLOCATING, JobState.PROVISIONING, JobState.RUNNING],
            JobState.FAILED,
            failure=repo.Failure(Phase.TRAIN, "trainer_exit_nonzero", "done"),
        )


def waiting_events(env: Env, job_id: str) -> list[str]:
    with session_scope(env.url) as s:
        return list(
            s.scalars(
                select(JobEvent.message)
                .where(JobEvent.job_id == job_id, JobEvent.kind == "waiting")
                .order_by(JobEvent.id)
            )
        )


def deliver(env: Env) -> list[str]:
    """Run the allocate steps the recorder holds (admission only); the jobs they admitted."""
    admitted = []
    while env.enqueued:
        _, job_id = env.enqueued.pop(0)
        if allocate._admit(job_id):
            admitted.append(job_id)
    return admitted


# -- fair share ---------------------------------------------------------------------------


def test_three_projects_bursting_under_tight_quotas_are_served_round_robin(env: Env) -> None:
    env.settings = env.make_settings(max_servers=3)
    set_quota(env, "p1", jobs=2)
    set_quota(env, "p2", jobs=1)
    set_quota(env, "p3", jobs=1)
    names: dict[str, str] = {}
    for project, n in (("p1", 4), ("p2", 3), ("p3", 2)):
        for i in range(n):
            job_id = submit(env, project, f"{project}-{i}")
            names[job_id] = f"{project}-{i}"
    ids = {v: k for k, v in names.items()}

    # every submission's allocate step arrives, in submission order
    started = [names[j] for j in names if allocate._admit(j)]
    assert started == ["p1-0", "p2-0", "p3-0"]
    assert env.enqueued == []
    capacity = "waiting for capacity: all 3 servers in use"
    assert state(env, ids["p1-1"]) == ("QUEUED", capacity)
    assert state(env, ids["p1-3"]) == ("QUEUED", capacity)
    assert state(env, ids["p2-1"]) == (
        "QUEUED",
        "waiting for quota: project p2 uses 1 of 1 concurrent jobs",
    )
    assert state(env, ids["p2-2"]) == (
        "QUEUED",
        "waiting for quota: project p2 uses 1 of 1 concurrent jobs "
        "(an earlier job of the project is first in line)",
    )
    assert state(env, ids["p3-1"])[1] == (
        "waiting for quota: project p3 uses 1 of 1 concurrent jobs"
    )
    assert waiting_events(env, ids["p2-1"]) == [
        "waiting for quota: project p2 uses 1 of 1 concurrent jobs"
    ]
    assert waiting_events(env, ids["p1-1"]) == [capacity]

    # one server frees at a time (the oldest running job ends): who starts next
    running = [ids[n] for n in started]
    order = list(started)
    while len(order) < len(names):
        finish(env, running.pop(0))
        handed = admission.admit_waiting()
        assert len(handed) == 1, handed
        admitted = deliver(env)
        assert admitted == handed
        running += admitted
        order += [names[j] for j in admitted]
    assert order == [
        "p1-0", "p2-0", "p3-0",
        "p1-1", "p2-1", "p3-1",
        "p1-2", "p2-2",
        "p1-3",
    ]  # fmt: skip
    # a reason that changed got its own event: p1-3 waited for capacity, then behind p1-2
    assert waiting_events(env, ids["p1-3"])[0] == capacity


def test_priority_label_goes_first_within_its_project(env: Env) -> None:
    set_quota(env, "p4", jobs=1)
    first = submit(env, "p4", "first")
    assert allocate._admit(first)
    low = submit(env, "p4", "low")
    high = submit(env, "p4", "high", labels={"priority": "5"})
    other = submit(env, "p5", "other", labels={"priority": "-3"})
    assert not allocate._admit(low)
    assert not allocate._admit(high)
    assert allocate._admit(other)  # another project's quota is its own
    finish(env, first)
    assert admission.admit_waiting() == [high]
    assert deliver(env) == [high]
    finish(env, high)
    assert admission.admit_waiting() == [low]


def test_gpu_and_server_quotas(env: Env) -> None:
    set_quota(env, "g", gpus=2, servers=3)
    a = submit(env, "g", "a", resources={"flavor": "gpu.2"})
    b = submit(env, "g", "b", resources={"gpus": 1})  # booted as gpu.2: needs 2
    c = submit(env, "g", "c", resources={"workers": 3})
    assert allocate._admit(a)
    assert not allocate._admit(b)
    assert state(env, b)[1] == "waiting for quota: project g uses 2 of 2 GPUs; the job needs 2"
    # FIFO within the project: c (no GPUs) does not overtake b
    assert not allocate._admit(c)
    assert state(env, c)[1] == (
        "waiting for quota: project g uses 2 of 2 GPUs; the job needs 2 "
        "(an earlier job of the project is first in line)"
    )
    finish(env, a)
    assert admission.admit_waiting() == [b]
    assert deliver(env) == [b]
    assert not allocate._admit(c)
    assert state(env, c)[1] == "waiting for quota: project g uses 1 of 3 servers; the job needs 3"


def test_a_job_that_can_never_fit_waits_with_its_reason_and_blocks_nobody(env: Env) -> None:
    set_quota(env, "h", gpus=1)
    hopeless = submit(env, "h", "hopeless", resources={"flavor": "gpu.2"})
    after = submit(env, "h", "after")
    assert not allocate._admit(hopeless)
    assert state(env, hopeless)[1] == (
        "waiting for quota: the job needs 2 GPUs but the project's quota allows 1 "
        "(raise the quota or cancel the job)"
    )
    assert allocate._admit(after)
    with session_scope(env.url) as s:
        why = quotas.never_fits(
            s, env.settings, "h", JobSpec.model_validate(repo.get_job(s, hopeless).spec), FLAVORS
        )
    assert why == "the job needs 2 GPUs but the project's quota allows 1 (project h)"


def test_a_job_in_backoff_does_not_hold_a_slot(env: Env) -> None:
    env.settings = env.make_settings(max_servers=1)
    backing_off = submit(env, "p1", "backoff")
    later = submit(env, "p2", "later")
    with session_scope(env.url) as s:
        s.execute(
            update(Job)
            .where(Job.id == backing_off)
            .values(
                not_before=datetime.now(UTC) + timedelta(minutes=5),
                queue_reason="quota exceeded: nova said no; retrying in 300s",
            )
        )
    assert not allocate._admit(backing_off)
    assert env.enqueued and env.enqueued[0][1] == backing_off  # its countdown
    env.enqueued.clear()
    assert allocate._admit(later)


def test_jobs_admitted_on_another_jobs_turn_are_advanced_by_their_own_step(env: Env) -> None:
    env.settings = env.make_settings(max_servers=2)
    a = submit(env, "p1", "a")
    b = submit(env, "p2", "b")
    c = submit(env, "p3", "c")
    # b's step comes first: the decision admits a and b together, in fair order
    assert allocate._admit(b)
    assert state(env, a)[0] == "ALLOCATING"
    assert env.enqueued == []  # a's own (submission) step is on its way
    assert allocate._admit(a)  # ... and finds it admitted: it goes on to boot
    assert not allocate._admit(c)
    with session_scope(env.url) as s:
        order = list(
            s.scalars(
                select(JobEvent.job_id)
                .where(JobEvent.to_state == "ALLOCATING", JobEvent.job_id.in_([a, b, c]))
                .order_by(JobEvent.id)
            )
        )
    assert order == [a, b]
    finish(env, b)
    assert admission.admit_waiting() == [c]
    assert env.enqueued == [(queue.ALLOCATE, c)]  # c was parked: nobody else would advance it


# -- races --------------------------------------------------------------------------------


def _allocating(env: Env) -> dict[str, list[str]]:
    with session_scope(env.url) as s:
        rows = s.execute(
            select(Job.project_id, Job.name).where(Job.state == JobState.ALLOCATING.value)
        ).all()
    out: dict[str, list[str]] = {}
    for p, n in rows:
        out.setdefault(p, []).append(n)
    return {p: sorted(v) for p, v in sorted(out.items())}


def _race(job_ids: list[str], threads: int = 12) -> list[str]:
    barrier = threading.Barrier(threads)
    admitted: list[str] = []
    errors: list[BaseException] = []
    chunks = [job_ids[i::threads] for i in range(threads)]

    def work(mine: list[str]) -> None:
        try:
            barrier.wait()
            for j in reversed(mine):  # latest first: the worst order for fairness
                if allocate._admit(j):
                    admitted.append(j)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    pool = [threading.Thread(target=work, args=(c,)) for c in chunks]
    for t in pool:
        t.start()
    for t in pool:
        t.join(60)
    assert not errors, errors
    return admitted


def test_concurrent_admissions_never_exceed_a_quota_nor_admit_out_of_order(env: Env) -> None:
    env.settings = env.make_settings(max_servers=5)
    set_quota(env, "r1", jobs=2)
    set_quota(env, "r2", jobs=1)
    jobs = [submit(env, p, f"{p}-{i}") for i in range(8) for p in ("r1", "r2", "r3")]
    admitted = _race(jobs)
    assert len(admitted) == 5
    # whatever the threads' order, the five are the first five of the fair order
    assert _allocating(env) == {"r1": ["r1-0", "r1-1"], "r2": ["r2-0"], "r3": ["r3-0", "r3-1"]}

    # free servers a few at a time while steps and reconcilers race: never over a quota
    finished: dict[str, int] = {}
    for _ in range(40):
        with session_scope(env.url) as s:
            running = s.execute(
                select(Job.id, Job.project_id)
                .where(Job.state == JobState.ALLOCATING.value)
                .order_by(Job.created_at)
                .limit(2)
            ).all()
            queued = list(s.scalars(select(Job.id).where(Job.state == JobState.QUEUED.value)))
        if not queued:
            break
        for j, project in running:
            finish(env, j)
            finished[project] = finished.get(project, 0) + 1
        reconcilers = [threading.Thread(target=admission.admit_waiting) for _ in range(3)]
        for t in reconcilers:
            t.start()
        _race(queued, threads=6)
        for t in reconcilers:
            t.join(60)
        env.enqueued.clear()
        now = _allocating(env)
        assert len(now.get("r1", [])) <= 2
        assert len(now.get("r2", [])) <= 1
        assert sum(len(v) for v in now.values()) <= 5
        for project, names in now.items():
            # FIFO within a project: what runs is its oldest jobs not yet finished
            done = finished.get(project, 0)
            assert sorted(int(n.split("-")[1]) for n in names) == list(
                range(done, done + len(names))
            )
    else:
        pytest.fail("the queue never drained")


# -- Nova's own limits --------------------------------------------------------------------


def test_nova_limits_are_consulted_before_booting(env: Env) -> None:
    env.settings = env.make_settings(quota_backoff_min=7, quota_backoff_max=60)
    job_id = submit(env, "n1", "nova", resources={"flavor": "gpu.2"})
    env.cloud.limits_now = ComputeLimits(
        max_instances=10,
        instances_used=3,
        max_cores=20,
        cores_used=16,
        max_ram_mb=-1,
        ram_used_mb=100,
    )
    assert allocate._admit(job_id)
    allocate._advance(job_id)
    assert env.cloud.created == []
    st, reason = state(env, job_id)
    assert st == "QUEUED"
    assert reason == (
        "quota exceeded: the cloud project's limits leave no room "
        "(cores 16 of 20 used, gpu.2 needs 8); retrying in 7s"
    )
    assert env.enqueued[-1] == (queue.ALLOCATE, job_id)
    with session_scope(env.url) as s:
        job = repo.get_job(s, job_id)
        assert job.not_before is not None
        # no server was asked for: no row left (the retry gets a fresh one and boot clock)
        assert list(s.scalars(select(Resource).where(Resource.job_id == job_id))) == []

    # room again: the next attempt boots
    env.cloud.limits_now = ComputeLimits(10, 3, 40, 16, -1, 0)
    with session_scope(env.url) as s:
        s.execute(update(Job).where(Job.id == job_id).values(not_before=None))
    assert allocate._admit(job_id)
    allocate._advance(job_id)
    assert len(env.cloud.created) == 1
    assert state(env, job_id)[0] == "PROVISIONING"


# -- usage on PostgreSQL ------------------------------------------------------------------


def test_usage_arithmetic_with_fixed_timestamps(env: Env) -> None:
    t0 = datetime(2026, 10, 1, 0, 0, tzinfo=UTC)
    h = timedelta(hours=1)
    job_id = submit(env, "u1", "usage", resources={"flavor": "gpu.2"})
    with session_scope(env.url) as s:
        for i, (start, end, flavor) in enumerate(
            [(t0, t0 + 3 * h, "gpu.2"), (t0 + h, None, "local.small"), (None, t0, "gpu.2")]
        ):
            s.add(
                Resource(
                    job_id=job_id,
                    project_id="u1",
                    backend="fake",
                    name=f"usage-{i}",
                    flavor=flavor,
                    state=ResourceState.DELETED.value if end else ResourceState.ACTIVE.value,
                    active_at=start,
                    deleted_at=end,
                )
            )
    table = {f.name: f for f in FLAVORS}
    with session_scope(env.url) as s:
        rows = quotas.usage_report(s, table, t0 + 2 * h, t0 + 4 * h, "u1", now=t0 + 5 * h)
        whole = quotas.job_usage(repo.resources(s, job_id), table, now=t0 + 5 * h)
        none = quotas.usage_report(s, table, t0 + 2 * h, t0 + 4 * h, "u2", now=t0 + 5 * h)
    assert none == []
    [row] = rows
    # gpu.2: 1 h in the window (2 GPUs, 4.0/h); local.small: 2 h (0.05/h)
    assert row.metered.as_dict() == {"vm_seconds": 10800.0, "gpu_hours": 2.0, "cost": 4.1}
    # the whole life: 3 h of gpu.2 and 4 h (until "now") of local.small
    assert whole.as_dict() == {"vm_seconds": 25200.0, "gpu_hours": 6.0, "cost": 12.2}


def test_admins_setting_one_projects_quota_at_once_do_not_collide(env: Env) -> None:
    barrier = threading.Barrier(6)
    errors: list[BaseException] = []

    def put(i: int) -> None:
        try:
            barrier.wait()
            with session_scope(env.url) as s:
                quotas.set_overrides(s, "fresh", {"jobs": i + 1} if i % 2 else {"gpus": i})
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    pool = [threading.Thread(target=put, args=(i,)) for i in range(6)]
    for t in pool:
        t.start()
    for t in pool:
        t.join(30)
    assert not errors, errors
    with session_scope(env.url) as s:
        got = quotas.overrides(s, "fresh")
    assert got["jobs"] in (2, 4, 6) and got["gpus"] in (0, 2, 4)


def test_admission_with_nothing_queued_is_one_read_and_takes_no_lock(env: Env) -> None:
    """Every teardown calls admit_waiting: with an empty queue it costs one indexed read, and
    a job queued right after is admitted by its own step."""
    running = submit(env, "p", "running")
    assert deliver_one(env, running)
    with recorded_statements(env.url) as statements:
        assert admission.admit_waiting() == []
    assert len(statements) == 1 and "pg_advisory" not in statements[0]
    later = submit(env, "p", "later")
    assert deliver_one(env, later)
    assert state(env, later)[0] == JobState.ALLOCATING


def deliver_one(env: Env, job_id: str) -> bool:
    env.enqueued.clear()
    return allocate._admit(job_id)


def test_each_queued_jobs_spec_is_read_once_per_process(env: Env) -> None:
    """Every decision weighs the whole queue: the specs' demand parts are read from the
    database once per job (a committed spec never changes), so a second decision over the same
    queue sends no statement that reads a spec, and still counts each job's demand."""
    set_quota(env, "q", gpus=2)
    first = submit(env, "q", "first", resources={"flavor": "gpu.2"})
    waiting = [submit(env, "q", f"w{i}", resources={"gpus": 1}) for i in range(5)]
    assert deliver_one(env, first)
    for job_id in waiting:
        assert not deliver_one(env, job_id)  # parked, with its reason
    with recorded_statements(env.url) as statements:
        assert admission.admit_waiting() == []
    assert any("pg_advisory" in s for s in statements)  # a whole decision was taken
    assert not [s for s in statements if "jobs.spec" in s]
    assert state(env, waiting[0])[1] == (
        "waiting for quota: project q uses 2 of 2 GPUs; the job needs 2"
    )
    finish(env, first)
    assert admission.admit_waiting() == [waiting[0]]


def test_a_decision_parks_every_job_it_leaves_waiting_and_their_steps_end_at_once(
    env: Env,
) -> None:
    """One decision parks the whole waiting queue, fresh jobs included; each fresh job's own
    allocate step then finds it parked and ends after one read (no lock, no decision), and the
    job is admitted, with an allocate step enqueued, when its turn comes."""
    set_quota(env, "w", servers=1)
    first = submit(env, "w", "first")
    fresh = [submit(env, "w", f"f{i}") for i in range(4)]
    assert deliver_one(env, first)
    why = "waiting for quota: project w uses 1 of 1 servers; the job needs 1"
    assert state(env, fresh[0]) == (JobState.QUEUED, why)
    for job_id in fresh[1:]:
        later = f"{why} (an earlier job of the project is first in line)"
        assert state(env, job_id) == (JobState.QUEUED, later)
    for job_id in fresh:
        assert len(waiting_events(env, job_id)) == 1
    with recorded_statements(env.url) as statements:
        env.enqueued.clear()
        for job_id in fresh:
            allocate.run(job_id)  # each one's own step, arriving after the decision
    assert len(statements) == len(fresh)
    assert not [s for s in statements if "pg_advisory" in s]
    assert env.enqueued == []
    finish(env, first)
    assert admission.admit_waiting() == [fresh[0]]
    assert env.enqueued == [(queue.ALLOCATE, fresh[0])]
    assert state(env, fresh[1])[0] == JobState.QUEUED
