"""Restart: a training job whose `restart_policy` covers what went wrong starts again on a new
server instead of failing.

While a restartable job runs, the runner uploads new files of STACKML_CHECKPOINT_DIR to
`<project>/checkpoints/<job id>/` in the store (a write grant on that prefix only, in job.json).
When the trainer exits with a status the policy retries, or the job's server is lost, and the
job has restarts left, the job goes RUNNING -> QUEUED (`restarts` + 1, an event saying why); its
servers are deleted, admission and allocate boot a new one, and provision restores the synced
checkpoints before the trainer starts again. Everything else fails the job as before.
"""

from __future__ import annotations

from service import queue
from service.backends.interfaces import ObjectStore
from service.db import jobs as repo
from service.domain.errors import BackendError
from service.domain.spec import JobSpec, retryable_exit
from service.domain.states import FailureReason, JobState, Phase, ResourceState
from workers import chaos, jobctx
from workers.jobctx import db, log


def checkpoint_prefix(store: ObjectStore, project_id: str, job_id: str) -> str:
    """Where a job's checkpoints are synced to (kept after the job, like its model)."""
    return f"{store.project_prefix(project_id)}checkpoints/{job_id}/"


def restartable(spec: JobSpec) -> bool:
    """Whether the job may restart at all (and so syncs its checkpoints)."""
    return not spec.batch and spec.restart_policy != "Never"


def covers(spec: JobSpec, reason: FailureReason, code: int | None) -> bool:
    """Whether the job's restart_policy restarts after this failure of its trainer."""
    if not restartable(spec):
        return False
    if reason is FailureReason.SERVER_LOST:
        return True
    return (
        reason is FailureReason.TRAINER_EXIT_NONZERO
        and code is not None
        and retryable_exit(spec.restart_policy, code)
    )


def fail_or_restart(
    ctx: jobctx.StepContext, reason: FailureReason, message: str, code: int | None = None
) -> None:
    """The trainer failed (`reason`, its exit status `code`): restart the job on a new server
    when its restart_policy covers it and restarts are left; else fail it in the train phase."""
    spec, job_id = ctx.spec, ctx.job_id
    if not covers(spec, reason, code):
        jobctx.fail(job_id, Phase.TRAIN, reason, message)
        return
    cfg = jobctx.settings()
    with db() as s:
        job = repo.get_job(s, job_id)
        done = job.restarts
        moved = False
        if done < spec.max_restarts:
            why = f"restart {done + 1} of {spec.max_restarts} ({spec.restart_policy}): {message}"
            # compare-and-set on RUNNING: of two polls that saw the failure, one restarts
            moved = repo.transition(
                s,
                job_id,
                JobState.RUNNING,
                JobState.QUEUED,
                why,
                restarts=done + 1,
                log_base=job.log_offset,  # the next server's log file starts at 0
                alloc_attempt=0,
                poll_interval=cfg.poll_min,
                queue_reason="restarting on a new server",
                not_before=None,
            )
            if moved:
                for r in repo.resources(s, job_id):
                    if r.state != ResourceState.DELETED.value:
                        r.state = ResourceState.DELETING.value  # the next allocate deletes it
                repo.add_event(s, job_id, "restart", why)
            else:
                return  # another step moved the job first
    if done >= spec.max_restarts:
        jobctx.fail(
            job_id,
            Phase.TRAIN,
            reason,
            f"{message} (restart_policy {spec.restart_policy}: "
            f"{spec.max_restarts} restart{'s' if spec.max_restarts != 1 else ''} used)",
        )
        return
    log.info("job %s restarts (%d of %d): %s", job_id, done + 1, spec.max_restarts, message)
    chaos.pause("restart")  # (a worker killed here: the reconciler re-drives the QUEUED job)
    from workers.steps.allocate import retire

    try:
        retire(jobctx.compute(ctx.trust_id), job_id)
    except BackendError as e:  # the allocate step retires them before it boots, or teardown
        log.warning("job %s: deleting the lost run's servers: %s (allocate retries)", job_id, e)
    jobctx.next_step(queue.ALLOCATE, job_id)
