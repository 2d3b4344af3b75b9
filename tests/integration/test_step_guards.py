"""Trainer output never breaks a step: poll and export against a real sandbox over OpenSSH,
on a real PostgreSQL, with what a hostile or broken trainer can leave on its server.

The trainer runs as the job's user: it prints anything (a metric with a 400-digit value, a
20-digit step), and it can rewrite the runner that reports the uploaded keys. Whatever it does,
the deadline holds, and export ends the job with a reason instead of raising.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select, update

from service import queue
from service.backends.compute import sandbox
from service.backends.compute.sandbox import SandboxBackend
from service.backends.interfaces import Access, Flavor, Grant, ServerSpec
from service.backends.storage.local import LocalStore
from service.config import Settings
from service.db import jobs as repo
from service.db.migrate import upgrade
from service.db.models import Job, MetricRow, Resource, utcnow
from service.db.session import session_scope
from service.domain.errors import StoreError
from service.domain.spec import JobSpec
from service.domain.states import JobState, ResourceState
from tests.pgutil import recorded_statements, temp_database
from workers import jobctx, pipeline, reconciler, ssh
from workers.jobctx import JOB_DIR, RUNNER
from workers.steps import batch_servers, export, poll, provision, sidecar
from workers.steps.provision import PYTHON
from workers.steps.sidecar import FINAL_WAIT

FLAVOR = Flavor(name="test.small", vcpus=1, ram_mb=512, pids=256)
BIG = "9" * 400


@pytest.fixture(scope="module")
def pg() -> Iterator[str]:
    with temp_database("step_guards") as url:
        upgrade(url)
        yield url


@pytest.fixture(scope="module")
def backend() -> Iterator[SandboxBackend]:
    assert Path(sandbox.SSHD).exists(), "openssh-server is required"
    base = Path(tempfile.mkdtemp(prefix="stackml-guards-", dir="/var/tmp"))
    os.chmod(base, 0o755)
    b = SandboxBackend(base / "sandboxes", [FLAVOR])
    yield b
    ssh.close_all()
    try:
        for ref in b.list_servers():
            b.delete_server(ref.id)
    finally:
        shutil.rmtree(base, ignore_errors=True)


class UploadingStore(LocalStore):
    """A local store where what the runner uploads lands when export grants it the prefix
    (the fake runners below upload nothing themselves)."""

    uploads: dict[str, bytes] = {}

    def grant(self, prefix: str, access: Access, ttl_seconds: int) -> Grant:
        for key, data in self.uploads.items():
            self.put(prefix + key, data)
        return super().grant(prefix, access, ttl_seconds)


@dataclass
class Env:
    url: str
    settings: Settings
    backend: SandboxBackend
    store: UploadingStore
    enqueued: list[tuple[str, str, float]] = field(default_factory=list)


@pytest.fixture
def env(
    pg: str, backend: SandboxBackend, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Env]:
    settings = Settings(
        database_url=pg, data_dir=tmp_path, secret_key="step-guards", max_metric_points=50
    )
    store = UploadingStore(tmp_path / "store", "http://127.0.0.1:9", settings.signing_key())
    store.uploads = {}
    e = Env(pg, settings, backend, store)
    with session_scope(pg) as s:
        for table in ("metrics", "log_chunks", "job_events", "job_labels", "resources", "jobs"):
            s.execute(Job.metadata.tables[table].delete())
    monkeypatch.setattr(jobctx, "settings", lambda: e.settings)
    monkeypatch.setattr(jobctx, "compute", lambda trust_id=None: backend)
    monkeypatch.setattr(jobctx, "store", lambda project_id=None, trust_id=None: store)
    monkeypatch.setattr(
        jobctx,
        "next_step",
        lambda task, job_id, countdown=0.0: e.enqueued.append((task, job_id, countdown)),
    )
    yield e


def start_job(
    env: Env, state: JobState, *, ran_for: float = 0.0, **spec: Any
) -> tuple[str, ssh.SSHConnection]:
    """A job in `state` on a fresh sandbox, as provision leaves it (started `ran_for` ago)."""
    pem, pub = ssh.generate_keypair()
    job_spec = JobSpec.model_validate(
        {"name": "g", "trainer": {"package_uri": "local://p/x.tar.gz", "module": "t"}, **spec}
    )
    with session_scope(env.url) as s:
        job_id = repo.create_job(s, "p", job_spec).id
    ref = env.backend.create_server(ServerSpec(f"g-{job_id}", FLAVOR, "tensorflow-2.21", pub))
    st = env.backend.get_server(ref.id)
    with session_scope(env.url) as s:
        s.execute(
            update(Job)
            .where(Job.id == job_id)
            .values(
                state=state.value,
                started_at=utcnow() - timedelta(seconds=ran_for),
                ssh_key_enc=jobctx.encrypt_key(pem),
            )
        )
        s.add(
            Resource(
                job_id=job_id,
                project_id="p",
                backend="sandbox",
                name=f"g-{job_id}",
                server_id=ref.id,
                flavor=FLAVOR.name,
                state=ResourceState.ACTIVE.value,
                host=st.host,
                port=st.port,
                username=st.username,
                host_key=st.host_key,
            )
        )
    assert st.host and st.username
    conn = ssh.wait_for_ssh(ssh.SSHTarget(st.host, st.port, st.username, pem, st.host_key), 20)
    conn.run(["mkdir", "-p", JOB_DIR], timeout=10)
    conn.run(["touch", f"{JOB_DIR}/heartbeat"], timeout=10)
    return job_id, conn


def job_row(env: Env, job_id: str) -> Job:
    with session_scope(env.url) as s:
        job = repo.get_job(s, job_id)
        s.expunge(job)
        return job


HOSTILE_LOG = (
    "epoch 1\n"
    f'{{"stackml_metric": 1, "loss": {BIG}}}\n'
    f'{{"stackml_metric": 1, "step": {10**20}, "loss": 0.5}}\n'
    f'{{"stackml_metric": 1, "step": -{BIG}, "loss": 0.25}}\n'
    '{"stackml_metric": 1, "step": 3, "loss": 0.125}\n'
).encode()


def test_a_hostile_metric_line_neither_crashes_poll_nor_loses_the_log(env: Env) -> None:
    job_id, conn = start_job(env, JobState.RUNNING)
    conn.put_bytes(HOSTILE_LOG, f"{JOB_DIR}/log", 0o644)
    poll.run(job_id)  # must not raise
    job = job_row(env, job_id)
    assert job.state == JobState.RUNNING
    assert job.log_offset == len(HOSTILE_LOG)  # the bytes are stored all the same
    with session_scope(env.url) as s:
        data, _ = repo.read_log(s, job_id)
        series = repo.metrics(s, job_id)
    assert data == HOSTILE_LOG
    # the well-formed point survives; none of the hostile ones was stored as a number
    assert {"value": 0.125, "step": 3} in [
        {"value": p["value"], "step": p["step"]} for p in series["loss"]
    ]
    assert all(p["step"] is None or abs(p["step"]) < 2**63 for p in series["loss"])
    assert (queue.POLL, job_id) in [(t, j) for t, j, _ in env.enqueued]


def test_a_trainer_that_exits_while_a_poll_looks_loses_no_line(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The trainer prints its last line and exits (the runner writes its exit status) while a
    poll is between its reads of the server: the line is stored before the job moves on."""
    job_id, conn = start_job(env, JobState.RUNNING)
    conn.put_bytes(b"first\n", f"{JOB_DIR}/log", 0o644)
    read_log = poll._read_log
    finished: list[bool] = []

    def read_then_finish(c: ssh.SSHConnection, offset: int) -> bytes:
        data = read_log(c, offset)
        if not finished:  # right after this poll's log read: the last line, then the exit
            finished.append(True)
            conn.put_bytes(b"first\nlast\n", f"{JOB_DIR}/log", 0o644)
            conn.put_bytes(b"0\n", f"{JOB_DIR}/exit_code", 0o644)
        return data

    monkeypatch.setattr(poll, "_read_log", read_then_finish)
    for _ in range(2):  # the poll that raced, then the next one
        if job_row(env, job_id).state == JobState.RUNNING:
            poll.run(job_id)
    assert finished
    job = job_row(env, job_id)
    with session_scope(env.url) as s:
        data, _ = repo.read_log(s, job_id)
    assert (job.state, data) == (JobState.EXPORTING, b"first\nlast\n")


def test_a_job_waits_a_bounded_time_for_its_evaluators_last_evaluation(env: Env) -> None:
    """The chief exited 0: the job stays RUNNING while its side-car evaluator (fed the final
    checkpoint) has not exited, for at most evaluator_grace_seconds; then one event, the
    evaluator's row ended, and the job goes on. An evaluator that exited, or none, holds
    nothing. After a restart the wait's clock starts again."""
    spec = JobSpec.model_validate(
        {
            "name": "g",
            "trainer": {"package_uri": "local://p/x.tar.gz", "module": "t"},
            "resources": {"evaluator": True},
        }
    )
    with session_scope(env.url) as s:
        job_id = repo.create_job(s, "p", spec).id
        row = Resource(
            job_id=job_id, project_id="p", backend="sandbox", role="tf-evaluator",
            name=f"stackml-{job_id}-evaluator-0", server_id="sb-x", flavor=FLAVOR.name,
            state=ResourceState.ACTIVE.value, replica_state="fed-final",
        )  # fmt: skip
        s.add(row)
        s.flush()
        row_id = row.id
    index = spec.shape().evaluator_index
    assert index is not None
    ctx: Any = type("Ctx", (), {"job_id": job_id, "spec": spec})()
    running = sidecar_look(index, None)
    env.settings = env.settings.model_copy(update={"evaluator_grace_seconds": 1.0})
    assert sidecar.holds_the_end(ctx, running)  # the first poll that saw the chief's exit
    assert sidecar.holds_the_end(ctx, running)  # within the grace
    assert not sidecar.holds_the_end(ctx, sidecar_look(index, "0\n"))  # it exited
    assert not sidecar.holds_the_end(ctx, None)  # none (or lost)
    time.sleep(1.1)
    assert not sidecar.holds_the_end(ctx, running)  # past the grace: the job goes on
    assert not sidecar.holds_the_end(ctx, running)  # and never waits again
    with session_scope(env.url) as s:
        messages = [e.message for e in repo.events(s, job_id)]
        assert s.get_one(Resource, row_id).replica_state == sidecar.ENDED
    assert sum("evaluates the final checkpoint" in m for m in messages) == 1, messages
    assert sum("did not exit within 1s of the chief" in m for m in messages) == 1, messages
    env.settings = env.settings.model_copy(update={"evaluator_grace_seconds": 0.0})
    with session_scope(env.url) as s:
        s.get_one(Resource, row_id).replica_state = "fed-final"
        for e in repo.events(s, job_id):
            s.delete(e)
    assert not sidecar.holds_the_end(ctx, running)  # a grace of 0: no wait at all
    # a run after a restart waits on a clock of its own, not on the earlier run's
    env.settings = env.settings.model_copy(update={"evaluator_grace_seconds": 1.0})
    with session_scope(env.url) as s:
        s.get_one(Resource, row_id).replica_state = "fed-final"  # (the grace of 0 ended it)
    assert sidecar.holds_the_end(ctx, running)
    time.sleep(1.1)
    with session_scope(env.url) as s:
        repo.add_event(s, job_id, "restart", "restart 1 of 1 (OnFailure): the server is lost")
    assert sidecar.holds_the_end(ctx, running)
    with session_scope(env.url) as s:
        waits = [e.message for e in repo.events(s, job_id) if FINAL_WAIT in e.message]
    assert len(waits) == 2, waits


def sidecar_look(index: int, exit_text: str | None) -> Any:
    from workers.steps.batch_servers import Look

    return Look(index, "sb-x", exit_text, time.time(), "evaluated" if exit_text else "")


# a runner whose `kill` stops the trainer as the real one does: its last words in the log,
# then the exit status
KILLING_RUNNER = f"""
import sys
with open("{JOB_DIR}/log", "ab") as log:
    log.write(b"killed at the deadline\\n")
with open("{JOB_DIR}/exit_code", "w") as out:
    out.write("137\\n")
print('{{"ok": true, "killed": true}}')
"""


def test_a_job_past_its_deadline_stores_the_rest_of_the_chiefs_log_first(env: Env) -> None:
    """More than one pull's worth of log is waiting when the job runs out of time: the trainer
    is stopped and every byte it printed is stored before the job fails."""
    job_id, conn = start_job(env, JobState.RUNNING, ran_for=120, max_runtime_seconds=60)
    body = b"x" * 100 + b"\n"
    log = body * ((poll.MAX_PULL // len(body)) + 50)  # more than one pull
    conn.put_bytes(log, f"{JOB_DIR}/log", 0o644)
    conn.run(["ln", "-sfn", "/usr/bin/python3", PYTHON], timeout=10)
    conn.put_bytes(KILLING_RUNNER.encode(), RUNNER, 0o644)
    poll.run(job_id)
    job = job_row(env, job_id)
    assert (job.state, job.failure_reason) == ("FAILED", "timeout")
    with session_scope(env.url) as s:
        data, _ = repo.read_log(s, job_id, 0, limit=4 << 20)
    assert data == log + b"killed at the deadline\n"


def test_a_lost_replica_with_the_chiefs_log_left_to_pull_stores_all_of_it(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The chief exited with more than one pull's worth of log left, and another replica's
    server is gone in the same poll: the rest of the chief's log is stored before the job
    ends."""
    job_id, conn = start_job(env, JobState.RUNNING, resources={"workers": 2})
    body = b"y" * 100 + b"\n"
    log = body * ((poll.MAX_PULL // len(body)) + 50)
    conn.put_bytes(log, f"{JOB_DIR}/log", 0o644)
    conn.put_bytes(b"0\n", f"{JOB_DIR}/exit_code", 0o644)

    def lost(ctx: object, timeout: float, spare: bool = False) -> None:
        raise batch_servers.WorkerLost("replica worker-1's server is gone", 1, "sb-gone")

    monkeypatch.setattr(batch_servers, "look", lost)
    poll.run(job_id)
    job = job_row(env, job_id)
    assert (job.state, job.failure_reason) == ("FAILED", "server_lost")
    with session_scope(env.url) as s:
        data, _ = repo.read_log(s, job_id, 0, limit=4 << 20)
    assert data == log


def test_the_deadline_holds_whatever_the_trainer_prints(env: Env) -> None:
    job_id, conn = start_job(env, JobState.RUNNING, ran_for=120, max_runtime_seconds=60)
    conn.put_bytes(HOSTILE_LOG * 3, f"{JOB_DIR}/log", 0o644)
    poll.run(job_id)
    job = job_row(env, job_id)
    assert (job.state, job.failure_phase, job.failure_reason) == ("FAILED", "train", "timeout")
    assert (queue.TEARDOWN, job_id) in [(t, j) for t, j, _ in env.enqueued]


def test_a_garbled_exit_code_fails_the_job_with_a_reason(env: Env) -> None:
    job_id, conn = start_job(env, JobState.RUNNING)
    conn.put_bytes(b"ok\n", f"{JOB_DIR}/log", 0o644)
    conn.put_bytes(b"zero\n", f"{JOB_DIR}/exit_code", 0o644)
    poll.run(job_id)
    job = job_row(env, job_id)
    assert (job.state, job.failure_reason) == ("FAILED", "trainer_exit_nonzero")
    assert "zero" in (job.failure_message or "")


def test_metric_points_per_job_are_capped(env: Env) -> None:
    job_id, conn = start_job(env, JobState.RUNNING)
    lines = "".join(f'{{"stackml_metric": 1, "step": {i}, "loss": {i}}}\n' for i in range(200))
    conn.put_bytes(lines.encode(), f"{JOB_DIR}/log", 0o644)
    poll.run(job_id)
    with session_scope(env.url) as s:
        count = len(list(s.scalars(select(MetricRow.id).where(MetricRow.job_id == job_id))))
        events = [e.message for e in repo.events(s, job_id)]
    assert count == env.settings.max_metric_points
    assert job_row(env, job_id).log_offset == len(lines)
    assert sum("max_metric_points" in m for m in events) == 1


def fake_runner(conn: ssh.SSHConnection, manifest: dict[str, Any]) -> None:
    """The runner as a trainer rewrote it: it uploads nothing and reports `manifest`."""
    conn.run(["ln", "-sfn", "/usr/bin/python3", PYTHON], timeout=10)
    src = f"import sys\nsys.stdin.read()\nprint({json.dumps(json.dumps(manifest))})\n"
    conn.put_bytes(src.encode(), RUNNER, 0o644)


@pytest.mark.parametrize(
    "key",
    ["../../x", "/etc/passwd", "a/../../b", "ok\nX-Injected: 1", "", "a\\..\\b", 7, None],
    ids=["dotdot", "absolute", "inner-dotdot", "control", "empty", "backslash", "int", "null"],
)
def test_export_fails_a_rewritten_runners_bad_key_with_a_reason(env: Env, key: object) -> None:
    job_id, conn = start_job(env, JobState.EXPORTING)
    # another job's model next door, and one good object this run wrote
    prefix = f"projects/p/models/{job_id}/"
    neighbour = env.store.put("projects/p/models/other/weights.txt", b"keep me")
    env.store.uploads = {"weights.txt": b"42\n"}
    fake_runner(
        conn,
        {
            "ok": True,
            "objects": [
                {"key": "weights.txt", "size": 3, "etag": hashlib.md5(b"42\n").hexdigest()},
                {"key": key, "size": 1, "etag": "0" * 32},
            ],
        },
    )
    export.run(job_id)  # must not raise
    job = job_row(env, job_id)
    assert (job.state, job.failure_phase, job.failure_reason) == (
        "FAILED",
        "export",
        "runner_output_invalid",
    )
    assert env.store.info(neighbour.key) is not None
    assert env.store.info(prefix + "weights.txt") is None  # what this run wrote is removed


def test_a_failed_export_removes_only_what_this_run_wrote(env: Env) -> None:
    job_id, conn = start_job(env, JobState.EXPORTING)
    prefix = f"projects/p/models/{job_id}/"
    before = env.store.put(prefix + "from-an-earlier-life.txt", b"old")
    env.store.uploads = {"weights.txt": b"42\n", "vocab.txt": b"a b"}
    etag = hashlib.md5(b"42\n").hexdigest()
    fake_runner(
        conn,
        {
            "ok": True,
            "objects": [
                {"key": "weights.txt", "size": 4, "etag": etag},  # not what the store holds
                # reported, but as it was before: not this run's to remove
                {"key": "from-an-earlier-life.txt", "size": before.size, "etag": before.etag},
            ],
        },
    )
    export.run(job_id)
    job = job_row(env, job_id)
    assert (job.state, job.failure_reason) == ("FAILED", "upload_failed")
    assert env.store.info(prefix + "weights.txt") is None
    assert env.store.info(prefix + "vocab.txt") is None  # written, though not reported
    assert env.store.info(before.key) is not None


@pytest.mark.parametrize(
    "answer",
    [
        {"ok": True, "objects": "nope"},
        {"ok": True, "objects": [{"key": "w", "size": "big", "etag": "x"}]},
        {"ok": True, "objects": [{"key": "w", "size": 1, "etag": "x", "segments": [{"k": 1}]}]},
        ["not", "an", "object"],
    ],
    ids=["objects-str", "size-str", "segment-garbled", "list"],
)
def test_export_fails_a_garbled_manifest_with_a_reason(env: Env, answer: object) -> None:
    job_id, conn = start_job(env, JobState.EXPORTING)
    conn.run(["ln", "-sfn", "/usr/bin/python3", PYTHON], timeout=10)
    src = f"import sys\nsys.stdin.read()\nprint({json.dumps(json.dumps(answer))})\n"
    conn.put_bytes(src.encode(), RUNNER, 0o644)
    export.run(job_id)
    job = job_row(env, job_id)
    assert (job.state, job.failure_reason) == ("FAILED", "runner_output_invalid")


def _raise(*args: object, **kwargs: object) -> None:
    raise OverflowError("Python int too large to convert to SQLite INTEGER")


def test_the_deadline_holds_when_storing_the_log_fails(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Whatever breaks log ingestion (a parser bug, a value the database refuses), the poll
    still checks max_runtime_seconds: the deadline does not depend on ingestion."""
    job_id, conn = start_job(env, JobState.RUNNING, ran_for=120, max_runtime_seconds=60)
    conn.put_bytes(b"anything\n", f"{JOB_DIR}/log", 0o644)
    monkeypatch.setattr(repo, "append_log", _raise)
    poll.run(job_id)
    job = job_row(env, job_id)
    assert (job.state, job.failure_reason) == ("FAILED", "timeout")


def test_a_metric_the_database_refuses_costs_the_log_nothing(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    job_id, _ = start_job(env, JobState.RUNNING)
    monkeypatch.setattr(repo, "inspect_metric_line", _raise)
    with session_scope(env.url) as s:
        assert repo.append_log(s, job_id, 0, b'{"stackml_metric": 1, "x": 1}\n') == 30
    with session_scope(env.url) as s:
        assert repo.read_log(s, job_id)[0] == b'{"stackml_metric": 1, "x": 1}\n'
        assert repo.metrics(s, job_id) == {}
        assert [e.kind for e in repo.events(s, job_id)][-1] == "metrics"


# --------------------------------------------------------------------------- the step lease


def test_a_long_export_is_not_redriven_nor_run_twice(env: Env) -> None:
    """An export that takes longer than stuck_after holds the job's lease: the reconciler does
    not re-drive it, and a second export task for the job returns at once."""
    env.settings = env.settings.model_copy(update={"stuck_after": 1.0})
    job_id, conn = start_job(env, JobState.EXPORTING)
    env.store.uploads = {"weights.txt": b"42\n"}
    conn.run(["ln", "-sfn", "/usr/bin/python3", PYTHON], timeout=10)
    manifest = {
        "ok": True,
        "objects": [{"key": "weights.txt", "size": 3, "etag": hashlib.md5(b"42\n").hexdigest()}],
    }
    # every run of the runner leaves a line in runs; it outlasts stuck_after three times over
    src = (
        "import sys, time\nsys.stdin.read()\n"
        f"open('{JOB_DIR}/runs', 'a').write('run\\n')\ntime.sleep(3)\n"
        f"print({json.dumps(json.dumps(manifest))})\n"
    )
    conn.put_bytes(src.encode(), RUNNER, 0o644)
    first = threading.Thread(target=export.run, args=(job_id,))
    first.start()
    try:
        deadline = time.monotonic() + 20
        while conn.stat(f"{JOB_DIR}/runs") is None:
            assert time.monotonic() < deadline, "the export never started its runner"
            time.sleep(0.05)
        time.sleep(1.5)  # past stuck_after, and past the lease's first time to live
        report = reconciler.Report()
        reconciler._redrive(report)
        assert job_id not in report.redriven
        export.run(job_id)  # a second export task (a re-drive, a redelivery): returns at once
        assert first.is_alive()
    finally:
        first.join(30)
    assert job_row(env, job_id).state == JobState.SUCCEEDED
    assert conn.read_file_from(f"{JOB_DIR}/runs", 0, 100) == b"run\n"
    assert job_row(env, job_id).step_lease_owner is None  # released: nothing holds the job


def test_a_lease_whose_heartbeat_stopped_lapses_and_the_job_is_redriven(env: Env) -> None:
    """A worker killed mid-step stops renewing its lease: once it lapses, the reconciler
    re-drives the job as for a lost message."""
    env.settings = env.settings.model_copy(update={"stuck_after": 1.0})
    job_id, _ = start_job(env, JobState.EXPORTING)
    lease = pipeline.take_lease(env.url, job_id, JobState.EXPORTING, 1.0)
    assert lease is not None  # ... and the worker holding it dies here: no heartbeat
    assert pipeline.take_lease(env.url, job_id, JobState.EXPORTING, 1.0) is None
    with session_scope(env.url) as s:
        s.execute(
            update(Job)
            .where(Job.id == job_id)
            .values(last_progress_at=utcnow() - timedelta(seconds=5))
        )
    report = reconciler.Report()
    reconciler._redrive(report)
    assert job_id not in report.redriven  # the lease is live
    time.sleep(1.2)
    reconciler._redrive(report)
    assert report.redriven == [job_id]
    assert (queue.EXPORT, job_id) in [(t, j) for t, j, _ in env.enqueued]


def test_a_store_that_refuses_for_good_fails_the_export_with_its_reason(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A non-transient backend error in a step fails the job with the error's reason (it does
    not leave the job in EXPORTING for the reconciler to re-drive every stuck_after)."""
    job_id, _ = start_job(env, JobState.EXPORTING)

    def refuse(prefix: str) -> list[object]:
        raise StoreError("the container is gone", reason="store_error")

    monkeypatch.setattr(env.store, "list", refuse)
    export.run(job_id)  # must not raise
    job = job_row(env, job_id)
    assert (job.state, job.failure_phase, job.failure_reason) == ("FAILED", "export", "store_error")
    assert job.step_lease_owner is None


def test_latest_metrics_are_the_last_point_of_each_series(env: Env) -> None:
    job_id, _ = start_job(env, JobState.RUNNING)
    log = (
        b'{"stackml_metric": 1, "step": 1, "loss": 0.9, "acc": 0.1}\n'
        b"noise\n"
        b'{"stackml_metric": 1, "step": 2, "loss": 0.5}\n'
        b'{"stackml_metric": 1, "step": 3, "acc": 0.7, "lr": 0.01}\n'
    )
    with session_scope(env.url) as s:
        repo.append_log(s, job_id, 0, log)
    with session_scope(env.url) as s:
        series = repo.metrics(s, job_id)
        assert repo.latest_metrics(s, job_id) == {k: v[-1]["value"] for k, v in series.items()}
        assert repo.latest_metrics(s, job_id) == {"loss": 0.5, "acc": 0.7, "lr": 0.01}


def test_a_store_that_does_not_answer_now_leaves_the_export_to_the_reconciler(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """'Not now' (store_unavailable) is not 'never': the step ends with the error, the job stays
    EXPORTING with its lease released, so the reconciler re-drives it after stuck_after."""
    job_id, _ = start_job(env, JobState.EXPORTING)

    def unavailable(prefix: str) -> list[object]:
        raise StoreError("swift GET failed: connection refused", reason="store_unavailable")

    monkeypatch.setattr(env.store, "list", unavailable)
    with pytest.raises(StoreError):
        export.run(job_id)
    job = job_row(env, job_id)
    assert (job.state, job.step_lease_owner) == ("EXPORTING", None)


def test_a_redriven_export_that_fails_removes_what_the_dead_run_uploaded(env: Env) -> None:
    """The job's first export recorded the prefix (empty) and died mid-upload, leaving an
    object; the re-driven export fails: the dead run's object goes too (it is the job's), while
    what the prefix held before the job's first export stays."""
    job_id, conn = start_job(env, JobState.EXPORTING)
    prefix = f"projects/p/models/{job_id}/"
    kept = env.store.put(prefix + "there-before.txt", b"old")
    assert export.baseline(job_id, {kept.key: kept.etag}) == {kept.key: kept.etag}
    env.store.put(prefix + "half-uploaded.bin", b"partial")  # by the run that died
    fake_runner(conn, {"ok": True, "objects": [{"key": "../../x", "size": 1, "etag": "00"}]})
    export.run(job_id)
    job = job_row(env, job_id)
    assert (job.state, job.failure_reason) == ("FAILED", "runner_output_invalid")
    assert env.store.info(prefix + "half-uploaded.bin") is None
    assert env.store.info(kept.key) is not None
    # the baseline is recorded once: a later listing does not replace it
    assert export.baseline(job_id, {}) == {kept.key: kept.etag}


def test_a_trainer_that_removes_its_log_still_meets_the_deadline(env: Env) -> None:
    job_id, conn = start_job(env, JobState.RUNNING, ran_for=120, max_runtime_seconds=60)
    conn.run(["rm", "-f", f"{JOB_DIR}/log"], timeout=10)
    poll.run(job_id)  # must not raise
    job = job_row(env, job_id)
    assert (job.state, job.failure_reason) == ("FAILED", "timeout")


def test_binary_junk_in_the_exit_status_fails_the_job_with_a_reason(env: Env) -> None:
    job_id, conn = start_job(env, JobState.RUNNING)
    conn.put_bytes(b"ok\n", f"{JOB_DIR}/log", 0o644)
    conn.put_bytes(b"\xff\xfe\x00junk", f"{JOB_DIR}/exit_code", 0o644)
    poll.run(job_id)  # must not raise
    job = job_row(env, job_id)
    assert (job.state, job.failure_reason) == ("FAILED", "trainer_exit_nonzero")


def test_a_runner_that_floods_stdout_costs_the_worker_a_bounded_tail(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A rewritten runner printing without end: the worker keeps the last MAX_OUTPUT bytes of
    its output (the last line, where the answer is), not all of it."""
    monkeypatch.setattr(ssh, "MAX_OUTPUT", 1 << 20)
    _, conn = start_job(env, JobState.EXPORTING)
    flood = "import sys\nsys.stdout.write('x' * (3 << 20) + '\\n')\nprint('last line')\n"
    result = conn.run(["python3", "-c", flood], timeout=30)
    assert len(result.stdout) == 1 << 20
    assert result.stdout.endswith(b"\nlast line\n")


# -- provision: the image's runtime first, the slow path when the image has none --------------

FAKE_RUNTIME = ".stackml/runtimes/installed"
# a runtime's "python" that records how the runner was called and answers as `launch` does
FAKE_PYTHON = '#!/bin/sh\necho "$@" >> "$HOME/.stackml/calls"\necho \'{"ok": true}\'\n'


def test_provision_installs_the_runtime_the_image_lacks_then_launches_with_it(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The runner is run by the runtime's own python; a missing one (the shell's 127) sends
    provision down the slow path once, and job.json then names the installed runtime."""
    job_id, conn = start_job(env, JobState.PROVISIONING)
    installed: list[str] = []

    def install(c: ssh.SSHConnection, jid: str, runtime: str, key: str) -> str:
        installed.append(runtime)
        c.makedirs(f"{FAKE_RUNTIME}/bin")
        c.put_bytes(FAKE_PYTHON.encode(), f"{FAKE_RUNTIME}/bin/python", 0o755)
        return c.run(["pwd"], timeout=10).text.strip() + "/" + FAKE_RUNTIME

    monkeypatch.setattr(provision, "runtime_on_server", lambda backend, key: "/nonexistent/rt")
    monkeypatch.setattr(provision, "install_runtime", install)
    monkeypatch.setattr(
        provision, "job_document", lambda jid, runtime, **kw: {"job_id": jid, "runtime": runtime}
    )
    spec = JobSpec.model_validate(job_row(env, job_id).spec)
    doc = provision._prepare(conn, job_id, spec, "sandbox", 0, 1, start=True)
    assert installed == ["/nonexistent/rt"]  # asked once, for the runtime that was missing
    assert str(doc["runtime"]).endswith(FAKE_RUNTIME)
    on_server = json.loads(conn.run(["cat", f"{JOB_DIR}/job.json"], timeout=10).stdout)
    assert on_server["runtime"] == doc["runtime"]
    calls = conn.run(["cat", ".stackml/calls"], timeout=10).text.split()
    assert calls[-2:] == ["launch", JOB_DIR]  # one command prepared and started it


def test_provision_reports_what_the_runner_said_when_it_fails(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    job_id, conn = start_job(env, JobState.PROVISIONING)
    conn.makedirs(f"{FAKE_RUNTIME}/bin")
    broken = "#!/bin/sh\necho 'stackml-runner: the package is not a valid .tar.gz' >&2\nexit 3\n"
    conn.put_bytes(broken.encode(), f"{FAKE_RUNTIME}/bin/python", 0o755)
    home = conn.run(["pwd"], timeout=10).text.strip()
    monkeypatch.setattr(provision, "runtime_on_server", lambda b, k: f"{home}/{FAKE_RUNTIME}")
    monkeypatch.setattr(
        provision, "job_document", lambda jid, runtime, **kw: {"job_id": jid, "runtime": runtime}
    )
    spec = JobSpec.model_validate(job_row(env, job_id).spec)
    with pytest.raises(ssh.RemoteCommandError) as e:
        provision._prepare(conn, job_id, spec, "sandbox", 0, 1, start=True)
    assert e.value.returncode == 3
    assert "not a valid .tar.gz" in e.value.stderr_tail


def test_the_runner_is_shipped_with_its_bytecode_and_the_first_command_uses_it(env: Env) -> None:
    """ship_runner puts a hash-checked .pyc beside runner.py: the first command loads it
    instead of compiling; a rewritten runner.py no longer matches it and is compiled."""
    _, conn = start_job(env, JobState.PROVISIONING)
    jobctx.ship_runner(conn, JOB_DIR)
    python = provision.runtime_on_server("sandbox", env.settings.default_runtime) + "/bin/python"
    argv = jobctx.runner_argv(python, "kill", JOB_DIR)
    argv.insert(1, "-v")  # the import system says where each code object came from
    pyc = f"/.stackml/__pycache__/runner.{sys.implementation.cache_tag}.pyc'"
    first = conn.run(argv, timeout=30).stderr.decode()
    assert any(
        ln.startswith("# code object from '") and ln.endswith(pyc) for ln in first.splitlines()
    )
    conn.put_bytes(b'import json\nprint(json.dumps({"rewritten": True}))\n', RUNNER, 0o644)
    second = conn.run(argv, timeout=30)
    lines = second.stderr.decode().splitlines()
    assert any(
        ln.startswith("# code object from ") and ln.endswith("/.stackml/runner.py") for ln in lines
    )
    assert json.loads(second.stdout) == {"rewritten": True}


def test_a_step_reads_its_job_once_and_a_moved_on_job_not_at_all(env: Env) -> None:
    """open_step's one read: a step's context comes from one SELECT of the job's row (plus its
    servers), leased or not; a leased step whose job moved on ends at the lease's
    compare-and-set, with no read of the row."""
    job_id, _ = start_job(env, JobState.RUNNING)

    def job_selects(sent: list[str]) -> list[str]:
        return [q for q in sent if q.startswith("SELECT") and "FROM jobs" in q]

    with recorded_statements(env.url) as sent:
        with jobctx.open_step(job_id, JobState.RUNNING) as ctx:
            assert ctx is not None and ctx.job.id == job_id and ctx.target is not None
    assert len(job_selects(sent)) == 1
    with recorded_statements(env.url) as sent:
        with jobctx.open_step(job_id, JobState.RUNNING, leased=True) as ctx:
            assert ctx is not None and ctx.lease is not None
    assert len(job_selects(sent)) == 1
    with recorded_statements(env.url) as sent:
        with jobctx.open_step(job_id, JobState.EXPORTING) as ctx:  # leased, and not EXPORTING
            assert ctx is None
    assert job_selects(sent) == []
    assert job_row(env, job_id).step_lease_owner is None  # the lease went with its block
