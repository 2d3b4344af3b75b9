"""A real Celery worker process on real Redis and PostgreSQL: tasks by name, the reconciler."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import update

from service import queue
from service.config import reset_settings
from service.db import jobs as repo
from service.db.migrate import upgrade
from service.db.models import Job, utcnow
from service.db.session import session_scope
from service.domain.spec import JobSpec
from service.domain.states import JobState
from tests.pgutil import temp_database
from workers import pipeline

REDIS_URL = os.environ.get("STACKML_TEST_REDIS_WORKER", "redis://127.0.0.1:6379/8")
QUEUE = f"stackml-worker-{os.getpid()}"  # apart from any other run sharing this Redis
SPEC = JobSpec.model_validate(
    {"name": "w", "trainer": {"package_uri": "local://p/x.tar.gz", "module": "trainer.task"}}
)


@pytest.fixture(scope="module")
def worker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, subprocess.Popen]]:
    data = tmp_path_factory.mktemp("worker-data")
    with temp_database("worker") as url:
        upgrade(url)
        env = {
            **os.environ,
            "STACKML_DATABASE_URL": url,
            "STACKML_REDIS_URL": REDIS_URL,
            "STACKML_QUEUE": QUEUE,
            "STACKML_DATA_DIR": str(data),
            "STACKML_RECONCILE_INTERVAL": "1",
            "STACKML_STUCK_AFTER": "2",
        }
        saved = {k: os.environ.get(k) for k in ("STACKML_REDIS_URL", "STACKML_QUEUE")}
        os.environ["STACKML_REDIS_URL"] = REDIS_URL
        os.environ["STACKML_QUEUE"] = QUEUE
        reset_settings()
        queue._producer.cache_clear()
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "celery",
                "-A",
                "workers.celery_app:app",
                "worker",
                "-B",
                "--schedule",
                str(Path(data) / "beat"),
                "--concurrency=2",
                "--loglevel=INFO",
                "--without-gossip",
                "--without-mingle",
            ],
            env=env,
            stdout=open(Path(data) / "worker.log", "wb"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            yield url, proc
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
            reset_settings()
            queue._producer.cache_clear()


def _wait_state(url: str, job_id: str, state: JobState, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while True:
        with session_scope(url) as s:
            current = repo.get_job(s, job_id).state
        if current == state:
            return
        assert time.monotonic() < deadline, f"{job_id} is {current}, wanted {state}"
        time.sleep(0.1)


def test_cancel_task_by_name_finishes_a_cancelling_job(
    worker: tuple[str, subprocess.Popen],
) -> None:
    url, _ = worker
    with session_scope(url) as s:
        job_id = repo.create_job(s, "p", SPEC).id
        assert repo.transition(s, job_id, JobState.QUEUED, JobState.CANCELLING, "user asked")
    queue.enqueue(queue.CANCEL, job_id)
    _wait_state(url, job_id, JobState.CANCELLED)


def test_reconciler_redrives_a_job_whose_task_was_lost(
    worker: tuple[str, subprocess.Popen],
) -> None:
    url, _ = worker
    with session_scope(url) as s:
        job_id = repo.create_job(s, "p", SPEC).id
        assert repo.transition(s, job_id, JobState.QUEUED, JobState.CANCELLING, "user asked")
        s.execute(
            update(Job)
            .where(Job.id == job_id)
            .values(last_progress_at=utcnow() - timedelta(minutes=5))
        )
    # no task is enqueued: only beat's reconciler can move it on
    _wait_state(url, job_id, JobState.CANCELLED, timeout=30)
    with session_scope(url) as s:
        kinds = [e.kind for e in repo.events(s, job_id)]
    assert "reconcile" in kinds


def test_reconciler_leaves_a_job_whose_step_holds_a_live_lease(
    worker: tuple[str, subprocess.Popen],
) -> None:
    """A leased step in progress (here: a lease renewed by this test, as a long export's
    heartbeat does) is not re-driven however stale its progress stamp; once the lease is
    released the reconciler re-drives the job."""
    url, _ = worker
    with session_scope(url) as s:
        job_id = repo.create_job(s, "p", SPEC).id
        s.execute(
            update(Job)
            .where(Job.id == job_id)
            .values(
                state=JobState.EXPORTING.value, last_progress_at=utcnow() - timedelta(minutes=5)
            )
        )
    lease = pipeline.take_lease(url, job_id, JobState.EXPORTING, 3.0)
    assert lease is not None
    # several reconcile rounds (interval 1 s, stuck_after 2 s) while the lease is renewed
    for _ in range(8):
        time.sleep(0.5)
        assert pipeline.renew_lease(url, lease)
    with session_scope(url) as s:
        assert "reconcile" not in [e.kind for e in repo.events(s, job_id)]
        assert repo.get_job(s, job_id).state == JobState.EXPORTING
    pipeline.release_lease(url, lease)
    # re-driven: export finds no server record and fails the job
    _wait_state(url, job_id, JobState.FAILED, timeout=30)
    with session_scope(url) as s:
        assert "reconcile" in [e.kind for e in repo.events(s, job_id)]
        assert repo.get_job(s, job_id).failure_reason == "server_lost"


def test_sigterm_stops_the_worker_cleanly(worker: tuple[str, subprocess.Popen]) -> None:
    _, proc = worker
    os.killpg(proc.pid, signal.SIGTERM)
    assert proc.wait(30) == 0
