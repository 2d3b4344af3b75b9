"""The poll of a ParameterServerStrategy job once its chief exited 0, on a real SQLite
database, with each server's files behind a fake SSH connection: training is over, so the
workers and parameter servers decide nothing more. While the job waits for its side-car
evaluator's last evaluation (or for the rest of the chief's log), a parameter server lost or
gone silent, a worker that exits 1 and a worker that does not answer SSH neither restart nor
fail it; the job moves on to export when the evaluator exits. An evaluator that does not
answer SSH never fails a job either."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import pytest

from service import queue
from service.backends.interfaces import ServerState
from service.config import Settings
from service.db import jobs as repo
from service.db.models import Job, Resource
from service.db.session import session_scope
from service.domain.spec import JobSpec
from service.domain.states import JobState, ResourceState
from tests.unit.test_api_jobs import advance
from workers import jobctx, pipeline, ssh
from workers.jobctx import JOB_DIR
from workers.steps import batch_servers, poll, sidecar


@dataclass(frozen=True)
class Target:
    port: int  # which server: 0 the chief, k replica k


@dataclass
class Server:
    files: dict[str, bytes] = field(default_factory=dict)
    state: ServerState = ServerState.ACTIVE
    answers: bool = True  # over SSH
    beat: float | None = None  # the heartbeat's mtime (None: now)


class Conn:
    def __init__(self, server: Server) -> None:
        self.server = server

    def read_file_from(self, path: str, offset: int, n: int) -> bytes:
        if path not in self.server.files:
            raise FileNotFoundError(path)
        return self.server.files[path][offset : offset + n]

    def stat(self, path: str) -> Any:
        if path not in self.server.files:
            return None
        beat = self.server.beat if path.endswith("/heartbeat") else None
        size = len(self.server.files[path])
        return type("St", (), {"st_mtime": beat or time.time(), "st_size": size})


class Cloud:
    """Servers 0..4: chief, worker-1, worker-2, ps (3), evaluator (4)."""

    def __init__(self) -> None:
        self.servers = {k: Server() for k in range(5)}
        self.enqueued: list[str] = []  # the tasks the poll enqueued
        for server in self.servers.values():
            server.files[f"{JOB_DIR}/heartbeat"] = b""
            server.files[f"{JOB_DIR}/log"] = b"training\n"

    def connection(self, target: Target, timeout: float = 0) -> Conn:
        server = self.servers[target.port]
        if not server.answers:
            raise ssh.SSHError(f"server {target.port} does not answer")
        return Conn(server)

    def get_server(self, server_id: str) -> Any:
        return type("Status", (), {"state": self.servers[int(server_id[4:])].state})

    def exits(self, k: int, status: str, line: str = "done") -> None:
        self.servers[k].files[f"{JOB_DIR}/log"] += f"{line}\n".encode()
        self.servers[k].files[f"{JOB_DIR}/exit_code"] = status.encode()


@pytest.fixture
def cloud(settings: Settings, db_url: str, monkeypatch: pytest.MonkeyPatch) -> Cloud:
    c = Cloud()
    monkeypatch.setattr(jobctx, "settings", lambda: settings)
    monkeypatch.setattr(jobctx, "compute", lambda trust_id=None: c)
    monkeypatch.setattr(
        jobctx, "next_step", lambda task, job_id, countdown=0.0: c.enqueued.append(task)
    )
    monkeypatch.setattr(jobctx, "ssh_target", lambda job, r: Target(r.port))
    monkeypatch.setattr(ssh, "connection", c.connection)
    monkeypatch.setattr(ssh, "drop", lambda target: None)
    monkeypatch.setattr(sidecar, "tend", lambda ctx, look, timeout: None)  # (no feeding here)
    return c


def start(url: str) -> jobctx.StepContext:
    spec = JobSpec.model_validate(
        {
            "name": "ps",
            "trainer": {"package_uri": "local://projects/p/staging/x/t.tar.gz", "module": "t"},
            "resources": {"workers": 3, "parameter_servers": 1, "evaluator": True},
            "restart_policy": "OnFailure",
            "max_restarts": 2,
        }
    )
    shape = spec.shape()
    assert shape.evaluator_index == 4
    with session_scope(url) as s:
        job_id = repo.create_job(s, "p", spec).id
    advance(url, job_id, JobState.ALLOCATING, JobState.PROVISIONING, JobState.RUNNING)
    with session_scope(url) as s:
        for k in range(5):
            s.add(
                Resource(
                    job_id=job_id,
                    project_id="p",
                    backend="sandbox",
                    role="chief" if k == 0 else batch_servers.role_of(spec, k),
                    name=f"stackml-{job_id}-chief-0"
                    if k == 0
                    else batch_servers.name_of(job_id, k, batch=False, shape=shape),
                    flavor="local.small",
                    state=ResourceState.ACTIVE.value,
                    server_id=f"srv-{k}",
                    host="127.0.0.1",
                    port=k,
                )
            )
    return context(url, job_id, spec)


def context(url: str, job_id: str, spec: JobSpec) -> jobctx.StepContext:
    with session_scope(url) as s:
        job = repo.get_job(s, job_id)
        s.expunge(job)
    return jobctx.StepContext(
        job_id=job_id,
        state=JobState.RUNNING,
        step=pipeline.PIPELINE[JobState.RUNNING],
        project_id="p",
        trust_id=None,
        spec=spec,
        server_id="srv-0",
        backend="sandbox",
        target=Target(0),  # type: ignore[arg-type]
        lease=None,
        job=job,
    )


def poll_once(url: str, ctx: jobctx.StepContext) -> Job:
    poll._poll(context(url, ctx.job_id, ctx.spec))
    with session_scope(url) as s:
        job = repo.get_job(s, ctx.job_id)
        s.expunge(job)
        return job


def messages(url: str, job_id: str) -> list[str]:
    with session_scope(url) as s:
        return [e.message for e in repo.events(s, job_id)]


def test_after_the_chief_exits_0_no_other_replica_restarts_or_fails_the_job(
    cloud: Cloud, db_url: str
) -> None:
    ctx = start(db_url)
    cloud.exits(0, "0\n", "saved the model")
    job = poll_once(db_url, ctx)
    assert job.state == JobState.RUNNING  # it waits for the evaluator's last evaluation
    assert any("evaluates the final checkpoint" in m for m in messages(db_url, ctx.job_id))

    cloud.servers[3].answers, cloud.servers[3].state = False, ServerState.ERROR  # ps lost
    cloud.exits(1, "1\n", "UnavailableError: the coordinator is gone")  # worker-1 fails
    job = poll_once(db_url, ctx)
    assert (job.state, job.restarts) == (JobState.RUNNING, 0)
    cloud.servers[2].answers = False  # worker-2 does not answer (its server is ACTIVE)
    job = poll_once(db_url, ctx)
    assert (job.state, job.restarts, job.ssh_failing_since) == (JobState.RUNNING, 0, None)
    with session_scope(db_url) as s:
        states = {r.server_id: r.state for r in repo.resources(s, ctx.job_id)}
        kinds = {e.kind for e in repo.events(s, ctx.job_id)}
    assert states["srv-3"] == ResourceState.DELETING.value  # let go, the teardown deletes it
    assert {states[f"srv-{k}"] for k in (0, 1, 2, 4)} == {ResourceState.ACTIVE.value}
    assert not kinds & {"restart", "replace"}, kinds
    assert any(
        "is lost: its server srv-3 is ERROR" in m and "after the chief exited 0" in m
        for m in messages(db_url, ctx.job_id)
    )

    cloud.exits(4, "0\n", "evaluated the final checkpoint")
    job = poll_once(db_url, ctx)
    assert job.state == JobState.EXPORTING
    assert any("exited 1: UnavailableError" in m for m in messages(db_url, ctx.job_id))


def test_an_evaluator_that_does_not_answer_ssh_never_fails_the_job(
    cloud: Cloud, db_url: str
) -> None:
    ctx = start(db_url)
    cloud.servers[4].answers = False  # its server ACTIVE: not lost, just not answering
    job = poll_once(db_url, ctx)
    assert (job.state, job.ssh_failing_since, cloud.enqueued) == (
        JobState.RUNNING,
        None,
        [queue.POLL],
    )
    cloud.exits(0, "0\n")  # the chief exits 0: the wait for it is bounded by the grace
    job = poll_once(db_url, ctx)
    assert job.state == JobState.RUNNING
    assert any("evaluates the final checkpoint" in m for m in messages(db_url, ctx.job_id))


def test_a_replica_gone_silent_while_the_chiefs_last_log_is_pulled_changes_nothing(
    cloud: Cloud, db_url: str
) -> None:
    """The chief exited 0 with more than one pull of log left: the poll comes back for it,
    and a parameter server whose heartbeat stopped meanwhile neither restarts nor fails it,
    nor is a worker lost meanwhile replaced."""
    ctx = start(db_url)
    cloud.exits(0, "0\n", "x" * (poll.MAX_PULL + 100))
    cloud.servers[3].beat = time.time() - 3600  # the ps's runner stopped beating
    cloud.servers[2].answers, cloud.servers[2].state = False, ServerState.DELETED  # worker-2
    job = poll_once(db_url, ctx)
    assert (job.state, job.restarts, cloud.enqueued) == (JobState.RUNNING, 0, [queue.POLL])
    assert job.log_offset == poll.MAX_PULL  # one pull; the next poll takes the rest
    cloud.exits(4, "0\n")
    job = poll_once(db_url, ctx)
    assert job.state == JobState.EXPORTING
    with session_scope(db_url) as s:
        assert not {e.kind for e in repo.events(s, ctx.job_id)} & {"restart", "replace"}
