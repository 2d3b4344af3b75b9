"""Poll: pull new log bytes from an offset, store them (with their metrics), watch the runner.

Re-schedules itself with a countdown that starts at poll_min and grows to poll_max while the
trainer is quiet, until the runner reports an exit code and every log byte is stored.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from datetime import UTC, datetime

from service import queue
from service.db import jobs as repo
from service.domain.states import FailureReason, JobState, Phase
from workers import jobctx, ssh
from workers.base import TRANSIENT
from workers.jobctx import JOB_DIR, db
from workers.steps import batch_servers, replace, restart, sidecar, tune

MAX_PULL = 1 << 20
TAIL_LINES = 20


def run(job_id: str) -> None:
    with jobctx.open_step(job_id, JobState.RUNNING) as ctx:
        if ctx is not None:
            _poll(ctx)


def _poll(ctx: jobctx.StepContext) -> None:
    if ctx.spec.tuning is not None:
        tune.run(ctx)  # a tuning job: no server, its trials are jobs of their own
        return
    cfg = jobctx.settings()
    job_id = ctx.job_id
    if ctx.target is None:
        jobctx.fail(job_id, Phase.TRAIN, FailureReason.SERVER_LOST, "the job has no server record")
        return
    target, job = ctx.target, ctx.job
    offset, interval = job.log_offset, job.poll_interval or cfg.poll_min
    started_at, log_base = job.started_at, job.log_base or 0
    max_runtime = ctx.spec.max_runtime_seconds
    parameter_servers = not ctx.spec.batch and ctx.spec.resources.parameter_servers > 0

    try:
        conn = ssh.connection(target, timeout=cfg.command_timeout)
        # the exit status before the log: the runner writes it after the trainer exited, so
        # once it is there the log is whole. Read the other way round, a trainer that printed
        # its last lines and exited between the two reads had them never pulled (one job in
        # ~2,000 of a burst of quick jobs: bench/bench_burst.py)
        exit_text = batch_servers.read_small(conn, f"{JOB_DIR}/exit_code")
        data = _read_log(conn, offset - log_base)  # (this server's log starts at log_base)
        heartbeat = conn.stat(f"{JOB_DIR}/heartbeat")
    except ssh.SSHError as e:
        ssh.drop(target)
        _ssh_failed(ctx, e, started_at, f"the server {ctx.server_id} is gone or has not")
        return

    # under ParameterServerStrategy the chief's exit 0 ends training: the workers and
    # parameter servers, which serve until the job ends, decide nothing more (one lost or
    # failing while the job waits for its evaluator, or its log, neither restarts nor fails it)
    trained = parameter_servers and exit_text is not None and _exit_code(exit_text) == 0
    others: list[batch_servers.Look] = []
    if batch_servers.count(ctx.spec) > 1:
        try:
            others = batch_servers.look(ctx, cfg.command_timeout, spare=trained)
        except batch_servers.WorkerLost as e:
            _store_log(job_id, offset, data, cfg.max_metric_points)
            if replace.alone(ctx, e.index) and replace.begin(ctx, e.index, e.server_id, str(e)):
                _again(job_id, cfg.poll_min, False)  # the others train on meanwhile
                return
            if exit_text is None or len(data) == MAX_PULL:  # running, or log left to pull
                _drain_chief(job_id, conn, offset + len(data), log_base, exited=bool(exit_text))
            restart.fail_or_restart(ctx, FailureReason.SERVER_LOST, str(e))
            return
        except ssh.SSHError as e:
            _ssh_failed(ctx, e, started_at, "one of the job's other servers has not")
            return

    _store_log(job_id, offset, data, cfg.max_metric_points)
    more = len(data) == MAX_PULL or any(o.more for o in others)
    others, side = sidecar.split(ctx, others)  # the evaluator never decides the job
    if side is not None:
        sidecar.tend(ctx, side, cfg.command_timeout)
    # the replicas whose exit, failure or silence ends the run (none once a PSS job trained:
    # their exits are events when the job moves on)
    deciding = [] if trained else others
    failed = next(
        (o for o in deciding if o.exit_text is not None and _exit_code(o.exit_text) != 0), None
    )
    if failed is not None and _replaced(
        ctx,
        failed,
        f"its trainer exited with status {(failed.exit_text or '').strip()[:64]}; last lines "
        f"of its log:\n{failed.tail}",
    ):
        others = [o for o in others if o is not failed]
        failed = None
    if failed is not None and not more:
        status = _exit_code(failed.exit_text or "")
        if exit_text is None:
            _drain_chief(job_id, conn, offset + len(data), log_base)
        restart.fail_or_restart(
            ctx,
            FailureReason.TRAINER_EXIT_NONZERO,
            f"{batch_servers.label(ctx.spec, failed.index)} (server {failed.server_id}) exited "
            f"with status {(failed.exit_text or '').strip()[:64]}; last lines of its log:\n"
            f"{failed.tail}",
            status,
        )
        return
    # under ParameterServerStrategy the workers and parameter servers serve until the job ends
    others_done = parameter_servers or all(o.exit_text is not None for o in others)
    if exit_text is not None and not more and (others_done or _exit_code(exit_text) != 0):
        code = _exit_code(exit_text)
        if code is None:
            jobctx.fail(
                job_id,
                Phase.TRAIN,
                FailureReason.TRAINER_EXIT_NONZERO,
                f"the runner's exit status is not a number: {exit_text[:64]!r}",
            )
        elif code == 0:
            if sidecar.holds_the_end(ctx, side):  # its evaluation of the final checkpoint
                _again(job_id, min(cfg.poll_max, max(interval, cfg.poll_min) * 1.5), False)
                return
            with db() as s:
                for o in others:
                    last = o.tail.strip().splitlines()[-1:] or ["(no log)"]
                    who = batch_servers.label(ctx.spec, o.index)
                    what = (
                        "served the cluster until the chief finished"
                        if o.exit_text is None
                        else f"exited {o.exit_text.strip()[:16]}: {last[0]}"
                    )
                    repo.add_event(s, job_id, "poll", f"{who} {what}", replica=o.index)
                moved = repo.transition(
                    s,
                    job_id,
                    JobState.RUNNING,
                    JobState.EXPORTING,
                    "batch predictor exited 0; checking the shards"
                    if ctx.spec.batch
                    else "trainer exited 0; exporting the model",
                )
            if moved:
                jobctx.next_step(queue.EXPORT, job_id)
        else:
            with db() as s:
                tail = repo.log_tail(s, job_id, TAIL_LINES)
            restart.fail_or_restart(
                ctx,
                FailureReason.TRAINER_EXIT_NONZERO,
                f"{'the batch predictor' if ctx.spec.batch else 'the trainer'}"
                f"{' (chief)' if others and not ctx.spec.batch else ''} exited with "
                f"status {code}; last lines of its log:\n{tail}",
                code,
            )
        return

    if _past_deadline(
        job_id,
        started_at,
        max_runtime,
        # the trainer is stopped and the rest of its log stored before the job fails
        drain=lambda: _drain_chief(
            job_id, conn, offset + len(data), log_base, exited=exit_text is not None
        ),
    ):
        return
    now = time.time()
    stopped: list[tuple[str, float, batch_servers.Look | None]] = []
    if exit_text is None and heartbeat is not None:
        stopped.append(("", heartbeat.st_mtime, None))
    stopped += [
        (f" of {batch_servers.label(ctx.spec, o.index)}", o.heartbeat, o)
        for o in deciding
        if o.exit_text is None and o.heartbeat is not None
    ]
    for who, beat, other in stopped:
        if now - beat > cfg.heartbeat_timeout:
            why = f"the runner's heartbeat{who} stopped {now - beat:.0f}s ago"
            if other is not None and _replaced(ctx, other, why):
                continue
            if who and (exit_text is None or more):  # another replica's: the chief's log
                _drain_chief(job_id, conn, offset + len(data), log_base, exited=bool(exit_text))
            restart.fail_or_restart(ctx, FailureReason.SERVER_LOST, why)
            return

    if parameter_servers and not trained:
        replace.resume(ctx)  # (once training is over, a replica let go is not replaced)
    interval = cfg.poll_min if data else min(cfg.poll_max, max(interval, cfg.poll_min) * 1.5)
    _again(job_id, interval, more)


def _again(job_id: str, interval: float, more: bool) -> None:
    """The next poll in `interval` seconds (at once when log bytes are left to pull)."""
    with db() as s:
        repo.touch(s, job_id, poll_interval=interval, ssh_failing_since=None)
    jobctx.next_step(queue.POLL, job_id, 0 if more else interval)


def _replaced(ctx: jobctx.StepContext, other: batch_servers.Look, why: str) -> bool:
    """Whether replica `other`, which failed for `why`, is being replaced alone (a worker of a
    ParameterServerStrategy job: workers/steps/replace.py) instead of ending the run."""
    return replace.alone(ctx, other.index) and replace.begin(ctx, other.index, other.server_id, why)


def _drain_chief(
    job_id: str, conn: ssh.SSHConnection, offset: int, log_base: int, *, exited: bool = False
) -> None:
    """Another replica ended the run (lost, or failed), or the job ran out of time, while the
    chief's trainer still runs: stop the trainer, read the rest of its log once the runner has
    written its exit status (every line the trainer printed is then in the file), and store it
    at the job's log `offset`. With `exited` (its exit status was read) only the rest of the
    log: more than one pull's worth was left. Without this, what it printed between the last
    pull and the deletion of its server would be lost, while a checkpoint it synced meanwhile
    is kept: a restart would resume past epochs whose lines the job never got. Best effort
    within the command timeout: an SSH failure drains nothing more (as with any lost
    server)."""
    from workers.steps.provision import PYTHON

    cfg = jobctx.settings()
    deadline = time.monotonic() + cfg.command_timeout
    out = b""
    try:
        if not exited:
            conn.run(jobctx.runner_argv(PYTHON, "kill", JOB_DIR), timeout=cfg.command_timeout)
        while batch_servers.read_small(conn, f"{JOB_DIR}/exit_code") is None:
            if time.monotonic() > deadline:
                break
            time.sleep(0.2)
        while chunk := _read_log(conn, offset - log_base + len(out)):
            out += chunk
            if len(chunk) < MAX_PULL:
                break
    except ssh.SSHError as e:
        jobctx.log.warning("job %s: the chief's log was not drained before the end: %s", job_id, e)
    if out:
        _store_log(job_id, offset, out, cfg.max_metric_points)


def _ssh_failed(
    ctx: jobctx.StepContext, e: ssh.SSHError, started_at: datetime | None, who: str
) -> None:
    """SSH to one of the job's servers failed: past its deadline the job fails `timeout`; else
    the step runs again while the SSH policy allows (jobctx.retry_after_ssh_failure), and the
    job fails `server_lost` once it does not ("<who> answered SSH for N s")."""
    if _past_deadline(ctx.job_id, started_at, ctx.spec.max_runtime_seconds):
        return
    if not jobctx.retry_after_ssh_failure(ctx, e):
        restart.fail_or_restart(
            ctx,
            FailureReason.SERVER_LOST,
            f"{who} answered SSH for {jobctx.ssh_failing_for(ctx.job_id):.0f}s ({e})",
        )


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


def _read_log(conn: ssh.SSHConnection, offset: int) -> bytes:
    """New log bytes from `offset`; none when the trainer removed its log (the runner's own
    checks go on: exit status, heartbeat, deadline)."""
    try:
        return conn.read_file_from(f"{JOB_DIR}/log", offset, MAX_PULL)
    except FileNotFoundError:
        return b""


def _epoch(dt: datetime) -> float:
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return dt.timestamp()


def _past_deadline(
    job_id: str,
    started_at: datetime | None,
    max_runtime: int,
    drain: Callable[[], None] | None = None,
) -> bool:
    """Fail the job when it ran past max_runtime_seconds (checked whatever else went wrong);
    `drain` first, when the chief's server answers."""
    if started_at is None or time.time() - _epoch(started_at) <= max_runtime:
        return False
    if drain is not None:
        drain()
    jobctx.fail(
        job_id,
        Phase.TRAIN,
        FailureReason.TIMEOUT,
        f"the job ran longer than max_runtime_seconds={max_runtime}",
    )
    return True
