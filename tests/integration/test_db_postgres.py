"""The repository on a real PostgreSQL: migrations, compare-and-set under contention, logs."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest
from sqlalchemy import func, select

from service.db import jobs as repo
from service.db.migrate import upgrade
from service.db.models import JobEvent, MetricRow, Resource
from service.db.session import session_scope
from service.domain.spec import JobSpec
from service.domain.states import JobState, Phase
from tests.pgutil import temp_database

SPEC = JobSpec.model_validate(
    {
        "name": "t",
        "trainer": {"package_uri": "local://p/x.tar.gz", "module": "trainer.task"},
        "labels": {"team": "a"},
    }
)


@pytest.fixture(scope="module")
def pg() -> Iterator[str]:
    with temp_database("db") as url:
        upgrade(url)
        yield url


def _new_job(url: str, project: str = "p1") -> str:
    with session_scope(url) as s:
        return repo.create_job(s, project, SPEC).id


def test_migrations_are_idempotent(pg: str) -> None:
    upgrade(pg)  # a second upgrade is a no-op, not an error


def test_only_one_of_many_concurrent_transitions_wins(pg: str) -> None:
    job_id = _new_job(pg)
    wins: list[bool] = []
    barrier = threading.Barrier(8)

    def attempt() -> None:
        barrier.wait()
        with session_scope(pg) as s:
            wins.append(repo.transition(s, job_id, JobState.QUEUED, JobState.ALLOCATING, "go"))

    threads = [threading.Thread(target=attempt) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert sorted(wins) == [False] * 7 + [True]
    with session_scope(pg) as s:
        n = s.scalar(
            select(func.count())
            .select_from(JobEvent)
            .where(JobEvent.job_id == job_id, JobEvent.to_state == "ALLOCATING")
        )
        assert n == 1
        assert repo.get_job(s, job_id).state == "ALLOCATING"


def test_failure_is_recorded_with_phase_and_reason(pg: str) -> None:
    job_id = _new_job(pg)
    with session_scope(pg) as s:
        assert repo.transition(
            s,
            job_id,
            JobState.QUEUED,
            JobState.FAILED,
            failure=repo.Failure(Phase.ALLOCATE, "no_valid_host", "none"),
        )
        assert not repo.transition(s, job_id, JobState.QUEUED, JobState.ALLOCATING)
    with session_scope(pg) as s:
        job = repo.serialize_job(s, repo.get_job(s, job_id))
    assert job["failure"] == {"phase": "allocate", "reason": "no_valid_host", "message": "none"}
    assert job["finished_at"] is not None


def test_append_log_is_idempotent_and_metrics_straddling_chunks_are_parsed(pg: str) -> None:
    job_id = _new_job(pg)
    line = b'{"stackml_metric": 1, "epoch": 1, "loss": 0.25}\n'
    first, second = b"hello\n" + line[:10], line[10:] + b"bye\n"
    with session_scope(pg) as s:
        off = repo.append_log(s, job_id, 0, first)
    with session_scope(pg) as s:
        assert repo.append_log(s, job_id, 0, first) == off  # redelivered pull: no-op
        end = repo.append_log(s, job_id, off, second)
    with session_scope(pg) as s:
        data, nxt = repo.read_log(s, job_id, 0)
        assert data == first + second and nxt == end
        assert repo.read_log(s, job_id, 6)[0].startswith(b'{"stackml_metric"')
        assert repo.metrics(s, job_id)["loss"][0]["value"] == 0.25
        assert (
            s.scalar(select(func.count()).select_from(MetricRow).where(MetricRow.job_id == job_id))
            == 1
        )


def test_overlapping_pulls_store_each_byte_once(pg: str) -> None:
    """Two polls of one job pulled from the same offset, one further than the other (a
    re-driven poll beside a late one): whichever stores second stores the rest past the first,
    so the job's log holds every byte once, and the metric lines past it become points."""
    job_id = _new_job(pg)
    line = b'{"stackml_metric": 1, "epoch": 2, "loss": 0.5}\n'
    short, long = b"epoch 1\n", b"epoch 1\n" + line + b"done\n"
    with session_scope(pg) as s:
        assert repo.append_log(s, job_id, 0, short) == len(short)
    with session_scope(pg) as s:
        assert repo.append_log(s, job_id, 0, long) == len(long)
    with session_scope(pg) as s:
        assert repo.append_log(s, job_id, 0, short) == len(long)  # inside what is stored: no-op
        assert repo.append_log(s, job_id, 0, long) == len(long)
        assert repo.read_log(s, job_id, 0) == (long, len(long))
        assert [p["value"] for p in repo.metrics(s, job_id)["loss"]] == [0.5]
    # a replica's log (workers of a distributed job) the same way
    with session_scope(pg) as s:
        res = Resource(
            job_id=job_id, project_id="p1", backend="sandbox", role="worker",
            name=f"overlap-{job_id}", flavor="small", state="active",
        )  # fmt: skip
        s.add(res)
        s.flush()
        rid = res.id
    with session_scope(pg) as s:
        assert repo.append_replica_log(s, job_id, 1, rid, 0, short)
    with session_scope(pg) as s:
        assert repo.append_replica_log(s, job_id, 1, rid, 0, long)
        assert not repo.append_replica_log(s, job_id, 1, rid, 0, long)
        assert repo.read_log(s, job_id, 0, replica=1) == (long, len(long))


def test_list_filters_and_paginates_within_a_project(pg: str) -> None:
    ids = [_new_job(pg, "p-list") for _ in range(5)]
    _new_job(pg, "p-other")
    seen: list[str] = []
    marker = None
    with session_scope(pg) as s:
        while True:
            rows, marker = repo.list_jobs(s, "p-list", limit=2, marker=marker)
            seen += [r.id for r in rows]
            if marker is None:
                break
        assert sorted(seen) == sorted(ids)
        rows, _ = repo.list_jobs(s, "p-list", labels={"team": "a"}, states=[JobState.QUEUED])
        assert len(rows) == 5
        rows, _ = repo.list_jobs(s, "p-list", labels={"team": "b"})
        assert rows == []
