"""A tuning job's step on a real PostgreSQL, driven directly (a recorder stands in for the
broker, a fake for the compute backend): passes that run at once submit each trial once with
the same parameters; the trials wait for the project's quota like any job while the tuning job
holds none; a cancelled tuning job submits nothing more and its teardown cancels its trials."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from service import queue
from service.backends.storage.local import LocalStore
from service.db import jobs as repo
from service.db import quotas
from service.db import tuning as tuning_repo
from service.db.models import Job
from service.db.session import session_scope
from service.domain.spec import JobSpec, Tuning
from service.domain.states import JobState
from service.domain.tuning import suggest
from tests.integration.test_admission import FLAVORS, Env, FakeCloud, set_quota, submit
from tests.pgutil import temp_database
from workers import jobctx
from workers.steps import allocate, poll, teardown

TUNING = {
    "metric": "loss",
    "goal": "minimize",
    "algorithm": "random",
    "seed": 5,
    "parameters": [{"name": "lr", "type": "double", "min": 0.001, "max": 1, "scale": "log"}],
    "max_trials": 6,
    "max_parallel_trials": 3,
}


@pytest.fixture(scope="module")
def pg() -> Iterator[str]:
    from service.db.migrate import upgrade

    with temp_database("tuning_races") as url:
        upgrade(url)
        yield url


@pytest.fixture
def env(pg: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Env]:
    e = Env(pg, tmp_path)
    e.cloud = FakeCloud()  # no cloud quota: only the project's own counts
    with session_scope(pg) as s:
        for table in ("job_events", "job_labels", "resources", "jobs", "quotas", "fair_share"):
            s.execute(Job.metadata.tables[table].delete())
    store = LocalStore(tmp_path / "store", "http://127.0.0.1:1", b"k" * 32)
    monkeypatch.setattr(jobctx, "settings", lambda: e.settings)
    monkeypatch.setattr(jobctx, "compute", lambda trust_id=None: e.cloud)
    monkeypatch.setattr(jobctx, "store", lambda project_id=None, trust_id=None: store)
    lock = threading.Lock()

    def record(task: str, job_id: str, countdown: float = 0.0) -> None:
        with lock:
            e.enqueued.append((task, job_id))

    monkeypatch.setattr(jobctx, "next_step", record)
    monkeypatch.setattr(quotas, "flavor_table", lambda settings=None: {f.name: f for f in FLAVORS})
    yield e


def tuning_job(env: Env, project: str = "p1", **over: Any) -> str:
    """A tuning job as POST /v1/jobs leaves it: RUNNING, nothing booted."""
    spec = JobSpec.model_validate(
        {
            "name": "sweep",
            "trainer": {"package_uri": "local://p/x.tar.gz", "module": "trainer.task"},
            "tuning": {**TUNING, **over},
        }
    )
    with session_scope(env.url) as s:
        job = repo.create_job(s, project, spec)
        assert repo.transition(s, job.id, JobState.QUEUED, JobState.RUNNING, "tuning", tuning=True)
        return job.id


def trials(env: Env, parent: str) -> list[Job]:
    with session_scope(env.url) as s:
        rows = tuning_repo.trial_rows(s, parent)
        s.expunge_all()
        return rows


def test_passes_at_once_submit_each_trial_once_with_the_same_parameters(env: Env) -> None:
    parent = tuning_job(env)
    barrier = threading.Barrier(4)
    errors: list[BaseException] = []

    def one_pass() -> None:
        try:
            barrier.wait(10)
            poll.run(parent)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=one_pass) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors, errors
    got = trials(env, parent)
    assert [t.trial for t in got] == [1, 2, 3]  # max_parallel_trials, each once
    tuning = Tuning.model_validate(TUNING)
    for t in got:
        assert t.parent_id == parent and t.state == JobState.QUEUED.value
        assert t.spec["hyperparameters"] == suggest(tuning, t.trial or 0, [])
    allocates = [j for task, j in env.enqueued if task == queue.ALLOCATE]
    assert sorted(allocates) == sorted(t.id for t in got)  # each enqueued once
    poll.run(parent)  # three trials hold their places: nothing more
    assert len(trials(env, parent)) == 3


def test_trials_wait_for_the_projects_quota_and_the_tuning_job_holds_none(env: Env) -> None:
    set_quota(env, "p1", servers=2)
    other = submit(env, "p1", "before")  # a job of the same project, queued first
    parent = tuning_job(env)
    poll.run(parent)
    got = trials(env, parent)
    assert len(got) == 3
    for job_id in [other, *(t.id for t in got)]:
        allocate.run(job_id)
    with session_scope(env.url) as s:
        states = {j.id: (j.state, j.queue_reason) for j in s.scalars(select(Job))}
    admitted = (JobState.ALLOCATING.value, JobState.PROVISIONING.value)
    assert states[other][0] in admitted  # first come, first served
    assert states[got[0].id][0] in admitted
    for t in got[1:]:  # the quota (2 servers) is full: they wait, saying why
        state, why = states[t.id]
        assert state == JobState.QUEUED.value and "quota" in (why or ""), (state, why)
    assert states[parent][0] == JobState.RUNNING.value
    with session_scope(env.url) as s:
        used = quotas.in_use(s, {f.name: f for f in FLAVORS}, "local.small", ["p1"])["p1"]
    assert used.servers == 2 and used.jobs == 2  # the tuning job counts for nothing


def test_a_cancelled_tuning_job_submits_nothing_more_and_cancels_its_trials(env: Env) -> None:
    set_quota(env, "p1", servers=1)
    parent = tuning_job(env)
    poll.run(parent)
    got = trials(env, parent)
    allocate.run(got[0].id)  # one trial has its server, two wait for the quota
    with session_scope(env.url) as s:
        assert repo.request_cancel(s, parent) is repo.CancelRequest.TEARDOWN
    poll.run(parent)  # a pass already on its way: the tuning job is no longer RUNNING
    assert len(trials(env, parent)) == 3
    teardown.run(parent)
    with session_scope(env.url) as s:
        assert repo.get_job(s, parent).state == JobState.CANCELLED.value
        states = [repo.get_job(s, t.id).state for t in got]
    # the queued ones are cancelled at once, the one with a server goes through its teardown
    assert states == [JobState.CANCELLING.value] + [JobState.CANCELLED.value] * 2
    assert (queue.CANCEL, got[0].id) in env.enqueued
