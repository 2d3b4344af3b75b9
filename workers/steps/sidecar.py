"""A training job's side-car evaluator (`resources.evaluator`): replica W+P, TF_CONFIG's
`evaluator`, outside the cluster.

It evaluates the chief's checkpoints as they come: the chief's runner syncs
STACKML_CHECKPOINT_DIR to the job's checkpoint prefix in the store (as for a restartable job),
and each poll that finds the prefix changed writes the evaluator's `checkpoints.feed` over SSH:
every file there with a signed GET URL, its size and MD5. The evaluator's runner fetches the new
files into its own STACKML_CHECKPOINT_DIR (workers/vm/runner.py `_CheckpointFeed`). What the
poll fed last is the row's `replica_state` (a fingerprint of the listing), so an unchanged
prefix costs one listing and nothing more.

It never decides the job: the poll leaves it out of the replicas whose exit, failure or
silence ends the run. Its exit is one event (`replica_state` `ended` after it); a lost
evaluator's server is one event too (batch_servers.look), and the job goes on without it; the
teardown stops it with the job's other servers. One wait: when the chief exited 0, the poll
that saw it fed the evaluator the final checkpoint (the chief's runner syncs it before writing
its exit status), and the job stays RUNNING until the evaluator exits, at most
`evaluator_grace_seconds` (`holds_the_end`): else the job's last evaluation, of the model it
exports, would be lost with the evaluator's server.
"""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime

from sqlalchemy import func, select

from service.backends.interfaces import Access
from service.db import jobs as repo
from service.db.models import JobEvent, Resource, utcnow
from service.domain.errors import BackendError
from workers import jobctx, ssh
from workers.jobctx import JOB_DIR, db
from workers.steps import batch_servers, restart

ENDED = "ended"
FEED = f"{JOB_DIR}/checkpoints.feed"
FINAL_WAIT = "evaluates the final checkpoint"  # the event that starts the wait (its clock)


def index(ctx: jobctx.StepContext) -> int | None:
    """The evaluator's replica index, None when the job has none."""
    return None if ctx.spec.batch else ctx.spec.shape().evaluator_index


def split(
    ctx: jobctx.StepContext, others: list[batch_servers.Look]
) -> tuple[list[batch_servers.Look], batch_servers.Look | None]:
    """The poll's looks without the evaluator's, and the evaluator's (None: none, or lost)."""
    side = index(ctx)
    return [o for o in others if o.index != side], next(
        (o for o in others if o.index == side), None
    )


def tend(ctx: jobctx.StepContext, look: batch_servers.Look, timeout: float) -> None:
    """After the poll's look at the evaluator: its exit is one event; while it runs, feed it
    the checkpoints the chief synced since the last feed."""
    live = batch_servers.rows(ctx.job_id, ctx.spec.shape()).get(look.index)
    if live is None or live.replica_state in (ENDED, batch_servers.REPLACING):
        return  # (a replacement's row is the replace task's until it started)
    who = batch_servers.label(ctx.spec, look.index)
    if look.exit_text is not None:
        last = look.tail.strip().splitlines()[-1:] or ["(no log)"]
        with db() as s:
            s.get_one(Resource, live.id).replica_state = ENDED
            repo.add_event(
                s,
                ctx.job_id,
                "poll",
                f"{who} exited {look.exit_text.strip()[:16]}: {last[0]}",
                replica=look.index,
            )
        return
    cfg = jobctx.settings()
    try:
        store = jobctx.store(ctx.project_id, ctx.trust_id)
        prefix = restart.checkpoint_prefix(store, ctx.project_id, ctx.job_id)
        objects = sorted(store.list(prefix), key=lambda o: o.key)
    except BackendError as e:  # the store does not answer now: the next poll feeds it
        jobctx.log.warning("job %s: %s not fed: %s", ctx.job_id, who, e)
        return
    mark = hashlib.sha256(
        "\n".join(f"{o.key}\t{o.etag}\t{o.size}" for o in objects).encode()
    ).hexdigest()[:16]
    if not objects or live.replica_state == mark:
        return
    grant = store.grant(prefix, Access.READ, cfg.grant_ttl)
    from workers.steps.provision import sign

    items = [
        {
            "name": o.key[len(prefix) :],
            "url": sign(grant.url_prefix, grant.query, o.key[len(prefix) :]),
            "size": o.size,
            "md5": o.etag.strip('"'),
        }
        for o in objects
    ]
    with db() as s:
        job = repo.get_job(s, ctx.job_id)
        target = jobctx.ssh_target(job, live)
    try:
        conn = ssh.connection(target, timeout=timeout)
        conn.put_bytes(json.dumps(items).encode(), FEED, 0o600)
    except ssh.SSHError as e:  # the next poll feeds it again (or finds it lost)
        ssh.drop(target)
        jobctx.log.warning("job %s: %s not fed: %s", ctx.job_id, who, e)
        return
    with db() as s:
        s.get_one(Resource, live.id).replica_state = mark


def holds_the_end(ctx: jobctx.StepContext, look: batch_servers.Look | None) -> bool:
    """The chief exited 0: whether the job stays RUNNING for its evaluator, fed the final
    checkpoint and not exited yet, within `evaluator_grace_seconds` of the first poll of this
    run that saw the chief's exit (its event is the clock: the platform's time, not the
    server's; a wait in a run before a restart counts for nothing). Past the grace one event,
    the evaluator's row `ended`, and the job goes on without it."""
    if look is None or look.exit_text is not None:
        return False  # none, lost, or exited (tend recorded it; its log is pulled whole)
    live = batch_servers.rows(ctx.job_id, ctx.spec.shape()).get(look.index)
    if live is None or live.replica_state in (ENDED, batch_servers.REPLACING):
        return False
    grace = jobctx.settings().evaluator_grace_seconds
    who = batch_servers.label(ctx.spec, look.index)
    with db() as s:
        # this run's: an earlier run's wait (before a restart) does not start this one's clock
        run_began = select(func.coalesce(func.max(JobEvent.id), 0)).where(
            JobEvent.job_id == ctx.job_id, JobEvent.kind == "restart"
        )
        since = s.scalar(
            select(JobEvent.at)
            .where(
                JobEvent.job_id == ctx.job_id,
                JobEvent.replica == look.index,
                JobEvent.message.startswith(f"{who} {FINAL_WAIT}"),
                JobEvent.id > run_began.scalar_subquery(),
            )
            .order_by(JobEvent.id.desc())
            .limit(1)
        )
        if since is None and grace > 0:
            repo.add_event(
                s,
                ctx.job_id,
                "poll",
                f"{who} {FINAL_WAIT}: the chief exited 0; the job waits for it up to {grace:g}s",
                replica=look.index,
            )
            return True
        if since is not None and (utcnow() - _aware(since)).total_seconds() < grace:
            return True
        s.get_one(Resource, live.id).replica_state = ENDED
        repo.add_event(
            s,
            ctx.job_id,
            "poll",
            f"{who} did not exit within {grace:g}s of the chief: the job goes on without "
            "its evaluation of the final checkpoint",
            replica=look.index,
        )
    return False


def _aware(dt: datetime) -> datetime:
    return dt if dt.tzinfo is not None else dt.replace(tzinfo=UTC)
