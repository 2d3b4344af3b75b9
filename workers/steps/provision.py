"""Provision: reach the server over SSH, ship the runner, stage runtime/package/inputs, start."""

from __future__ import annotations

import json
import shlex
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from service import queue
from service.backends import registry
from service.backends.interfaces import IMAGE_RUNTIMES_DIR, Access, ObjectStore, ServerState
from service.db import jobs as repo
from service.domain import cluster
from service.domain.errors import BackendError
from service.domain.spec import JobSpec
from service.domain.states import FailureReason, JobState, Phase
from service.runtime import ensure_runtime
from workers import jobctx, ssh
from workers.jobctx import JOB_DIR, db
from workers.steps import batch, batch_servers, restart

RUNNER_SRC = jobctx.RUNNER_SRC
# a batch prediction job's server also gets the predictor, the model server it predicts with
# and the shard plan, next to the runner (workers/steps/batch.py)
BATCH_FILES = {
    ".stackml/batch_predictor.py": RUNNER_SRC.parent / "batch_predictor.py",
    ".stackml/model_server.py": RUNNER_SRC.parent / "model_server.py",
    ".stackml/batch_plan.py": Path(__file__).resolve().parents[2] / "service/domain/batch.py",
}
OPENSTACK_RUNTIMES = IMAGE_RUNTIMES_DIR  # (the images build puts them there)


PYTHON = ".stackml/python"  # a link to the runtime's python, made at provision time
SLOW_PATH_RUNTIMES = ".stackml/runtimes"


def runtime_on_server(backend_name: str, key: str) -> str:
    """Where the runtime is expected on the server: the image's <runtimes_dir>/<key> on a cloud,
    the worker's own build where the server sees it (the sandbox: runtimes_dir None)."""
    cfg = jobctx.settings()
    runtimes_dir = registry.capabilities(backend_name).runtimes_dir
    if runtimes_dir is None:
        return str(ensure_runtime(cfg, key).parent.parent)
    return f"{runtimes_dir}/{key}"


def install_runtime(conn: ssh.SSHConnection, job_id: str, runtime: str, key: str) -> str:
    """The image has no runtime at `runtime`: install it from the configured index into the
    job's home (slow path, bounded by provision_deadline). Where it went."""
    cfg = jobctx.settings()
    home = conn.run(["pwd"], timeout=cfg.command_timeout).text.strip()
    target = f"{home}/{SLOW_PATH_RUNTIMES}/{key}"
    with db() as s:
        repo.add_event(
            s,
            job_id,
            "provision",
            f"the image has no {key} runtime at {runtime}; installing it (slow path)",
        )
        repo.touch(s, job_id)
    rdef = cfg.runtimes()[key]
    from service.config import REPO_ROOT

    reqs = (REPO_ROOT / (rdef.vm_requirements or rdef.requirements)).read_bytes()
    conn.makedirs(SLOW_PATH_RUNTIMES)
    conn.put_bytes(reqs, f"{SLOW_PATH_RUNTIMES}/{key}.txt", 0o644)
    conn.run(["python3", "-m", "venv", target], timeout=cfg.command_timeout)
    pip = [f"{target}/bin/python", "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    if cfg.runtime_index_url:
        pip += ["--index-url", cfg.runtime_index_url]
    conn.run([*pip, "-r", f"{SLOW_PATH_RUNTIMES}/{key}.txt"], timeout=cfg.provision_deadline)
    return target


# the remote shell's statuses for a command it cannot run: not executable, not found
NO_RUNTIME = (126, 127)


def _prepare(
    conn: ssh.SSHConnection,
    job_id: str,
    spec: JobSpec,
    backend_name: str,
    worker: int,
    workers: int,
    peers: list[str] | None = None,
    *,
    start: bool = False,
) -> dict[str, object]:
    """Ship the runner (and a batch job's predictor), write job.json and run `runner prepare`
    with the runtime's python: everything but the start (with `start`, `runner launch` starts
    the trainer in the same command). The image's runtime is the fast path; when the image has
    none the runtime is installed first. Idempotent. The job document."""
    cfg = jobctx.settings()
    jobctx.ship_runner(conn, JOB_DIR)
    if spec.batch:
        for dest, src in BATCH_FILES.items():
            conn.put_bytes(src.read_bytes(), dest, 0o644)
    key = spec.runtime.key
    command = "launch" if start else "prepare"

    def stage(runtime: str) -> tuple[dict[str, object], ssh.CommandResult, list[str]]:
        doc = job_document(job_id, runtime, worker=worker, workers=workers, peers=peers)
        conn.put_bytes(json.dumps(doc).encode(), f"{JOB_DIR}/job.json", 0o600)
        argv = jobctx.runner_argv(f"{runtime}/bin/python", command, JOB_DIR)
        return doc, conn.run(argv, timeout=cfg.provision_deadline, check=False), argv

    expected = runtime_on_server(backend_name, key)
    doc, result, argv = stage(expected)
    if result.returncode in NO_RUNTIME:
        doc, result, argv = stage(install_runtime(conn, job_id, expected, key))
    result.checked(shlex.join(argv))
    return doc


def _prepare_others(
    job_id: str,
    spec: JobSpec,
    backend_name: str,
    others: list[batch_servers.Worker],
    workers: int,
    peers: list[str] | None = None,
) -> list[ssh.SSHConnection]:
    """Prepare a batch job's other workers, all at once (each on its own connection); their
    connections, in worker order. The first failure is raised; each is an event of the job
    that names the worker and its server."""
    if not others:
        return []
    cfg = jobctx.settings()

    def one(w: batch_servers.Worker) -> ssh.SSHConnection:
        try:
            c = ssh.wait_for_ssh(w.target, cfg.ssh_deadline)
            _prepare(c, job_id, spec, backend_name, w.index, workers, peers)
        except ssh.SSHError as e:
            with db() as s:
                repo.add_event(
                    s,
                    job_id,
                    "provision",
                    f"{batch_servers.label(spec, w.index)} ({w.server_id}): {e}",
                )
            raise
        return c

    with ThreadPoolExecutor(max_workers=min(8, len(others))) as pool:
        return list(pool.map(one, others))


def job_document(
    job_id: str,
    runtime: str,
    *,
    worker: int = 0,
    workers: int = 1,
    peers: list[str] | None = None,
) -> dict[str, object]:
    """job.json for the runner, with signed URLs to read the package and the inputs (a batch
    job's: workers/steps/batch.py, for worker `worker` of `workers`). A distributed training
    job's replica `worker` gets TF_CONFIG (its cluster at `peers`) and STACKML_REPLICA."""
    cfg = jobctx.settings()
    with db() as s:
        job = repo.get_job(s, job_id)
        project_id, trust_id, restarts = job.project_id, job.trust_id, job.restarts
        spec = JobSpec.model_validate(job.spec)
    if spec.batch:
        return batch.document(job_id, runtime, worker=worker, workers=workers)
    store = jobctx.store(project_id, trust_id)
    pkg_key = store.key_of(spec.training().package_uri)
    pkg_grant = store.grant(pkg_key, Access.READ, cfg.grant_ttl)
    inputs = []
    if spec.inputs.data_uri:
        data_key = store.key_of(spec.inputs.data_uri)
        grant = store.grant(data_key, Access.READ, cfg.grant_ttl)
        for obj in store.list(data_key):
            rel = obj.key[len(data_key) :].lstrip("/") or obj.key.rsplit("/", 1)[-1]
            inputs.append(
                {"name": rel, "url": sign(grant.url_prefix, grant.query, obj.key[len(data_key) :])}
            )
    doc: dict[str, object] = {
        "job_id": job_id,
        "project_id": project_id,
        "module": spec.training().module,
        "argv": spec.trainer_argv(),
        "env": {**spec.env, **_replica_env(peers, worker, spec.shape())},
        "runtime": runtime,
        "package_url": sign(pkg_grant.url_prefix, pkg_grant.query, ""),
        "inputs": inputs,
    }
    shape = spec.shape()
    if restart.restartable(spec) or shape.evaluator:
        # a side-car evaluator reads the chief's checkpoints from the store: they are synced
        doc.update(_checkpoints(store, project_id, job_id, spec, restarts, sync=worker == 0))
    if worker == shape.evaluator_index:
        doc["checkpoint_feed"] = True  # the runner fetches what the poll step feeds it
    return doc


def _replica_env(peers: list[str] | None, worker: int, shape: cluster.Shape) -> dict[str, str]:
    """A distributed job's replica's own variables (none for a job of one server)."""
    if not peers or len(peers) < 2:
        return {}
    return {
        "TF_CONFIG": json.dumps(cluster.tf_config(peers, worker, shape)),
        "STACKML_REPLICA": cluster.replica_name(worker, shape),
    }


def _checkpoints(
    store: ObjectStore,
    project_id: str,
    job_id: str,
    spec: JobSpec,
    restarts: int,
    *,
    sync: bool = True,
) -> dict[str, object]:
    """A restartable job's job.json entries: a write grant on its checkpoint prefix that the
    runner syncs STACKML_CHECKPOINT_DIR to while the trainer runs (it outlives the job's
    max_runtime_seconds; the chief's only, `sync`), and after a restart the synced files to
    restore on every replica, with their sizes and MD5s (each verified as it is fetched)."""
    cfg = jobctx.settings()
    prefix = restart.checkpoint_prefix(store, project_id, job_id)
    ttl = max(cfg.grant_ttl, spec.max_runtime_seconds + batch.GRANT_MARGIN)
    write = store.grant(prefix, Access.WRITE, ttl) if sync else None
    restore = []
    if restarts:
        read = store.grant(prefix, Access.READ, cfg.grant_ttl)
        for obj in store.list(prefix):
            rel = obj.key[len(prefix) :]
            restore.append(
                {
                    "name": rel,
                    "url": sign(read.url_prefix, read.query, rel),
                    "size": obj.size,
                    "md5": obj.etag.strip('"'),
                }
            )
    out: dict[str, object] = {"restart": restarts, "checkpoints": restore}
    if write is not None:
        out["checkpoint_sync"] = {
            "url_prefix": write.url_prefix,
            "query": write.query,
            "seconds": cfg.checkpoint_sync_seconds,
        }
    return out


def _peer_hosts(ctx: jobctx.StepContext, others: list[batch_servers.Worker]) -> list[str]:
    """The address each replica's peers reach it on, in replica order (the chief first)."""
    backend = jobctx.compute(ctx.trust_id)
    out = []
    for server_id in [ctx.server_id, *(w.server_id for w in others)]:
        status = backend.get_server(str(server_id))
        host = status.peer_host or status.host
        if status.state is not ServerState.ACTIVE or host is None:
            raise BackendError(
                f"the job's server {server_id} is {status.state.value}",
                reason=FailureReason.SERVER_LOST,
            )
        out.append(host)
    return out


def sign(url_prefix: str, query: str, rel: str) -> str:
    from urllib.parse import quote

    return f"{url_prefix}{quote(rel)}?{query}"


def run(job_id: str) -> None:
    with jobctx.open_step(job_id, JobState.PROVISIONING) as ctx:
        if ctx is not None:
            _provision(ctx)


def _provision(ctx: jobctx.StepContext) -> None:
    """One provision at a time per job: `open_step` holds the job's lease while this runs."""
    cfg = jobctx.settings()
    job_id = ctx.job_id
    if ctx.target is None or ctx.backend is None:
        raise BackendError(f"job {job_id} is provisioning without a server")
    target, backend_name, spec = ctx.target, ctx.backend, ctx.spec
    try:
        conn = ssh.wait_for_ssh(target, cfg.ssh_deadline)
    except ssh.SSHAuthenticationFailed as e:
        # the key was refused past the boot-time window: a loaded sshd, while the server is up
        if jobctx.retry_after_ssh_failure(ctx, e):
            return
        jobctx.fail(
            job_id,
            Phase.PROVISION,
            FailureReason.SSH_UNREACHABLE,
            f"the server refused the job's key: {e}",
        )
        return
    except ssh.SSHError as e:
        jobctx.fail(
            job_id,
            Phase.PROVISION,
            FailureReason.SSH_UNREACHABLE,
            f"the server did not answer SSH within {cfg.ssh_deadline:.0f}s: {e}",
        )
        return
    workers = batch_servers.count(spec)
    try:
        if workers > 1:
            batch_servers.boot(ctx, workers)
        if workers > 1 and not spec.batch:
            # every replica's TF_CONFIG names every replica: all are up before any is prepared
            others = batch_servers.wait_active(ctx, workers)
            peers = _peer_hosts(ctx, others)
            doc = _prepare(conn, job_id, spec, backend_name, 0, workers, peers)
        elif workers > 1:
            peers = None
            doc = _prepare(conn, job_id, spec, backend_name, 0, workers)
            others = batch_servers.wait_active(ctx, workers)
        else:
            # one server: staged and started by one command (a cancel meanwhile finds the
            # trainer started; the teardown stops it with the server)
            doc = _prepare(conn, job_id, spec, backend_name, 0, 1, start=True)
        if workers > 1:
            # every server prepared before any starts, and none when the job was cancelled
            started = _prepare_others(job_id, spec, backend_name, others, workers, peers)
            with db() as s:
                repo.touch(s, job_id)
                if repo.get_job(s, job_id).state != JobState.PROVISIONING:
                    return  # cancelled meanwhile: do not start the trainer
            for other in started:
                other.run(jobctx.runner_argv(PYTHON, "start", JOB_DIR), timeout=cfg.command_timeout)
            conn.run(jobctx.runner_argv(PYTHON, "start", JOB_DIR), timeout=cfg.command_timeout)
    except batch_servers.Cancelled:
        return  # cancelled while booting the other workers: the teardown has them
    except ssh.RemoteCommandError as e:
        jobctx.fail(
            job_id,
            Phase.PROVISION,
            FailureReason.PROVISION_FAILED,
            f"preparing the server failed: {e.stderr_tail.strip() or e}",
        )
        return
    except (ssh.SSHUnreachable, ssh.ConnectionLost) as e:
        ssh.drop(target)
        if jobctx.retry_after_ssh_failure(ctx, e):
            return  # the server is up: every provisioning step is idempotent, run them again
        jobctx.fail(
            job_id,
            Phase.PROVISION,
            FailureReason.of(e.reason),
            f"lost the server while preparing: {e}",
        )
        return
    except ssh.SSHError as e:
        jobctx.fail(
            job_id,
            Phase.PROVISION,
            FailureReason.of(e.reason),
            f"lost the server while preparing: {e}",
        )
        return
    except BackendError as e:
        jobctx.fail(
            job_id, Phase.PROVISION, FailureReason.of(e.reason), f"cannot stage the job: {e}"
        )
        return
    with db() as s:
        moved = repo.transition(
            s,
            job_id,
            JobState.PROVISIONING,
            JobState.RUNNING,
            (
                f"batch predictor started on {workers} servers"
                if workers > 1
                else "batch predictor started"
            )
            if spec.batch
            else f"trainer started: python -m {doc['module']}"
            + (f" on {workers} replicas" if workers > 1 else ""),
            poll_interval=cfg.poll_min,
        )
    if moved:
        jobctx.next_step(queue.POLL, job_id, cfg.first_poll)
