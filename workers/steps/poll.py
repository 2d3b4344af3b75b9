"""Poll: pull new log bytes from an offset, store them (with their metrics), watch the runner.

Re-schedules itself with a countdown that starts at poll_min and grows to poll_max while the
trainer is quiet, until the runner reports an exit code and every log byte is stored.
"""

from __future__ import annotations

import contextlib
import time
from datetime import UTC, datetime

from service import queue
from service.backends.interfaces import ServerState
from service.db import jobs as repo
from service.domain.spec import JobSpec
from service.domain.states import FailureReason, JobState, Phase
from workers import chaos, jobctx, ssh
from workers.base import TRANSIENT
from workers.jobctx import JOB_DIR, db

MAX_PULL = 1 << 20
TAIL_LINES = 20


def run(job_id: str) -> None:
    cfg = jobctx.settings()
    with db() as s:
        job = repo.get_job(s, job_id)
        if job.state != JobState.RUNNING or job.cancel_requested:
            return
        chaos.pause("poll")
        res = jobctx.chief(s, job_id)
        if res is None:
            jobctx.fail(
                job_id, Phase.TRAIN, FailureReason.SERVER_LOST, "the job has no server record"
            )
            return
        target = jobctx.ssh_target(job, res)
        offset, interval = job.log_offset, job.poll_interval or cfg.poll_min
        started_at = job.started_at
        server_id = res.server_id
        max_runtime = JobSpec.model_validate(job.spec).max_runtime_seconds

    try:
        conn = ssh.connection(target, timeout=cfg.command_timeout)
        data = conn.read_file_from(f"{JOB_DIR}/log", offset, MAX_PULL)
        exit_text = _read_small(conn, f"{JOB_DIR}/exit_code")
        heartbeat = conn.stat(f"{JOB_DIR}/heartbeat")
    except ssh.SSHError as e:
        ssh.drop(target)
        _unreachable(job_id, server_id, started_at, str(e))
        return

    _store_log(job_id, offset, data, cfg.max_metric_points)
    more = len(data) == MAX_PULL
    if exit_text is not None and not more:
        code = _exit_code(exit_text)
        if code is None:
            jobctx.fail(
                job_id,
                Phase.TRAIN,
                FailureReason.TRAINER_EXIT_NONZERO,
                f"the runner's exit status is not a number: {exit_text[:64]!r}",
            )
        elif code == 0:
            with db() as s:
                moved = repo.transition(
                    s,
                    job_id,
                    JobState.RUNNING,
                    JobState.EXPORTING,
                    "trainer exited 0; exporting the model",
                )
            if moved:
                jobctx.next_step(queue.EXPORT, job_id)
        else:
            with db() as s:
                tail = repo.log_tail(s, job_id, TAIL_LINES)
            jobctx.fail(
                job_id,
                Phase.TRAIN,
                FailureReason.TRAINER_EXIT_NONZERO,
                f"the trainer exited with status {code}; last lines of its log:\n{tail}",
            )
        return

    now = time.time()
    if started_at is not None and now - _epoch(started_at) > max_runtime:
        jobctx.fail(
            job_id,
            Phase.TRAIN,
            FailureReason.TIMEOUT,
            f"the job ran longer than max_runtime_seconds={max_runtime}",
        )
        return
    if heartbeat is not None and now - heartbeat.st_mtime > cfg.heartbeat_timeout:
        jobctx.fail(
            job_id,
            Phase.TRAIN,
            FailureReason.SERVER_LOST,
            f"the runner's heartbeat stopped {now - heartbeat.st_mtime:.0f}s ago",
        )
        return

    interval = cfg.poll_min if data else min(cfg.poll_max, max(interval, cfg.poll_min) * 1.5)
    with db() as s:
        repo.touch(s, job_id, poll_interval=interval)
    jobctx.next_step(queue.POLL, job_id, 0 if more else interval)


def _store_log(job_id: str, offset: int, data: bytes, max_points: int) -> None:
    """Store the pulled bytes; a failure here (whatever the trainer printed) is logged and
    never keeps the poll from its deadline, exit code and heartbeat checks."""
    try:
        with db() as s:
            repo.append_log(s, job_id, offset, data, max_points=max_points)
    except TRANSIENT:
        raise  # the database is down: the task retries, as for any step
    except Exception as e:  # noqa: BLE001 - trainer output must never break the poll
        jobctx.log.exception(
            "job %s: could not store %d log bytes at %d", job_id, len(data), offset
        )
        with contextlib.suppress(Exception), db() as s:
            repo.add_event(s, job_id, "poll", f"log bytes at {offset} not stored: {e!s:.200}")


def _exit_code(text: str) -> int | None:
    """The runner's exit status (the trainer can write the file: anything may be in it)."""
    text = text.strip()
    if not text:
        return 1
    try:
        return int(text)
    except ValueError:
        return None


def _read_small(conn: ssh.SSHConnection, path: str) -> str | None:
    if conn.stat(path) is None:
        return None
    return conn.read_file_from(path, 0, 64).decode()


def _epoch(dt: datetime) -> float:
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return dt.timestamp()


def _unreachable(
    job_id: str, server_id: str | None, started_at: datetime | None, error: str
) -> None:
    """SSH failed: the server is gone (fail now) or flaky (retry until the heartbeat deadline)."""
    cfg = jobctx.settings()
    with db() as s:
        trust_id = repo.get_job(s, job_id).trust_id
    state = (
        jobctx.compute(trust_id).get_server(server_id).state if server_id else ServerState.DELETED
    )
    if state != ServerState.ACTIVE:
        jobctx.fail(
            job_id,
            Phase.TRAIN,
            FailureReason.SERVER_LOST,
            f"the server {server_id} is {state.value.lower()} ({error})",
        )
        return
    with db() as s:
        job = repo.get_job(s, job_id)
        quiet_for = time.time() - _epoch(job.last_progress_at)
    if quiet_for > cfg.heartbeat_timeout:
        jobctx.fail(
            job_id,
            Phase.TRAIN,
            FailureReason.SERVER_LOST,
            f"no answer over SSH for {quiet_for:.0f}s: {error}",
        )
        return
    jobctx.next_step(queue.POLL, job_id, cfg.poll_max)
