"""Replace one replica alone: a lost worker of a ParameterServerStrategy job.

Under ParameterServerStrategy the chief coordinates and the workers only run the steps it
schedules on them; the variables live on the parameter servers. A lost worker costs the
cluster nothing but its share of the steps (the coordinator gives them to the others), and a
worker that comes back at the same address is used again. So when a worker's server is lost,
its trainer fails, or its heartbeat stops, and

- the job has parameter servers (`resources.parameter_servers` > 0) and the replica is one of
  its workers (not the chief, not a parameter server: losing one of those ends the run, and the
  job restarts from its checkpoint as under MultiWorkerMirroredStrategy: restart.py),
- the backend keeps peer addresses stable (`Capabilities.stable_peer_addresses`: the sandbox;
  on Nova a replacement would get another fixed address, so there the job restarts), and
- the job's `restart_policy` covers a lost server and it has replacements left (each one counts
  against `max_restarts`, as a restart does),

the poll step marks the replica's row DELETING, records a `replace` event and hands the job to
this task (`begin`), then goes on polling the rest. The task, holding the job's lease (one
replacement at a time per job, never two of the same), deletes the lost server, boots a new one
for the replica (same flavor, key, peer group and peer index, so the same peer address; named
`stackml-<job>[-r<n>]-x<m>-worker-<k>`, its row `replacing` until started), prepares it with
the same TF_CONFIG and starts its runner. Every step is idempotent: a worker killed mid-way
leaves the job's lease to lapse, and the poll hands the job here again (`resume`).
"""

from __future__ import annotations

from sqlalchemy import select, update

from service.db import jobs as repo
from service.db.models import Job, Resource
from service.domain.errors import BackendError, TransientBackendError
from service.domain.states import FailureReason, JobState, ResourceState
from workers import jobctx, pipeline, ssh
from workers.jobctx import JOB_DIR, db, log
from workers.steps import batch_servers, restart

TASK = "stackml.replace_replica"
EVENT = "replace"


def alone(ctx: jobctx.StepContext, index: int) -> bool:
    """Whether replica `index` of the job is replaced alone when it is lost (see above)."""
    spec = ctx.spec
    return (
        not spec.batch
        and spec.resources.parameter_servers > 0
        and 1 <= index < spec.resources.workers
        and jobctx.compute(ctx.trust_id).capabilities.stable_peer_addresses
        and restart.covers(spec, FailureReason.SERVER_LOST, None)
    )


def begin(ctx: jobctx.StepContext, index: int, server_id: str, why: str) -> bool:
    """Replace replica `index` (its server `server_id`, lost for `why`): False when the job
    has no replacement left (the caller restarts or fails it instead)."""
    spec, job_id = ctx.spec, ctx.job_id
    who = batch_servers.label(spec, index)
    with db() as s:
        used = sum(1 for e in repo.events(s, job_id) if e.kind == EVENT)
        if used >= spec.max_restarts:
            return False
        moved = s.execute(
            update(Resource)
            .where(
                Resource.job_id == job_id,
                Resource.server_id == server_id,
                Resource.state.notin_((ResourceState.DELETING.value, ResourceState.DELETED.value)),
            )
            .values(state=ResourceState.DELETING.value)
        ).rowcount  # type: ignore[attr-defined]
        if moved:
            repo.add_event(
                s,
                job_id,
                EVENT,
                f"replacing {who} alone (ParameterServerStrategy; replacement {used + 1} of "
                f"{spec.max_restarts}): {why}",
                replica=index,
            )
    if moved:
        log.info("job %s: replacing %s (server %s): %s", job_id, who, server_id, why)
        jobctx.next_step(TASK, job_id)
    return True


def resume(ctx: jobctx.StepContext) -> None:
    """The poll's look for a replacement that stopped half-way (its task's worker died): a
    worker replica without a live row, or with one still `replacing`, while no task holds the
    job's lease: hand the job to this task again."""
    spec = ctx.spec
    if spec.batch or not spec.resources.parameter_servers:
        return
    have = batch_servers.rows(ctx.job_id, spec.shape())
    pending = [
        k
        for k in range(1, spec.resources.workers)
        if k not in have or have[k].replica_state == batch_servers.REPLACING
    ]
    if not pending:
        return
    with db() as s:
        free = s.scalar(select(Job.id).where(Job.id == ctx.job_id, pipeline.no_live_lease()))
    if free is not None:
        log.info("job %s: replacement of replicas %s resumed", ctx.job_id, pending)
        jobctx.next_step(TASK, ctx.job_id)


def run(job_id: str) -> None:
    with jobctx.open_step(job_id, JobState.RUNNING, leased=True) as ctx:
        if ctx is not None:
            _replace(ctx)


def _replace(ctx: jobctx.StepContext) -> None:
    from workers.steps.allocate import retire
    from workers.steps.provision import PYTHON, _peer_hosts, _prepare

    cfg = jobctx.settings()
    job_id, spec = ctx.job_id, ctx.spec
    servers = spec.servers()
    backend = jobctx.compute(ctx.trust_id)
    try:
        retire(backend, job_id)  # the lost servers first: their peer addresses are reused
        with db() as s:
            left = [
                r.name for r in repo.resources(s, job_id) if r.state == ResourceState.DELETING.value
            ]
        if left:
            raise TransientBackendError(f"the lost servers {left} are not deleted yet")
        booted = batch_servers.boot(ctx, servers, JobState.RUNNING)
        others = batch_servers.wait_active(ctx, servers)
        live = batch_servers.rows(job_id, spec.shape())
        waiting = {k for k, r in live.items() if r.replica_state == batch_servers.REPLACING}
        peers = _peer_hosts(ctx, others)
        for w in others:
            if w.index not in waiting:
                continue
            conn = ssh.wait_for_ssh(w.target, cfg.ssh_deadline)
            if conn.stat(f"{JOB_DIR}/started") is None:  # not started by an earlier run
                _prepare(conn, job_id, spec, ctx.backend or backend.name, w.index, servers, peers)
                with db() as s:
                    if repo.get_job(s, job_id).state != JobState.RUNNING:
                        return  # it ended meanwhile: the teardown has the new server
                conn.run(jobctx.runner_argv(PYTHON, "start", JOB_DIR), timeout=cfg.command_timeout)
            with db() as s:
                s.get_one(Resource, live[w.index].id).replica_state = None
                repo.add_event(
                    s,
                    job_id,
                    EVENT,
                    f"{batch_servers.label(spec, w.index)} replaced: server {w.server_id} "
                    f"started at {peers[w.index]}",
                    replica=w.index,
                )
        log.info("job %s: replicas %s replaced", job_id, sorted(waiting) or booted)
    except batch_servers.Cancelled:
        return  # the job ended while booting: the teardown deletes what was booted
    except TransientBackendError:
        raise  # the task retries; the poll resumes it once the lease lapses
    except (BackendError, ssh.SSHError) as e:
        # the replacement failed for good (a boot in ERROR, a server that never answered):
        # the job restarts or fails as for any lost server
        restart.fail_or_restart(
            ctx, FailureReason.SERVER_LOST, f"a replica's replacement failed: {e}"
        )
