"""Provision: reach the server over SSH, ship the runner, stage runtime/package/inputs, start."""

from __future__ import annotations

import json
from pathlib import Path

from service import queue
from service.backends.interfaces import Access
from service.db import jobs as repo
from service.domain.errors import BackendError
from service.domain.spec import JobSpec
from service.domain.states import JobState, Phase
from service.runtime import ensure_runtime
from workers import jobctx, ssh
from workers.jobctx import JOB_DIR, RUNNER, db

RUNNER_SRC = Path(__file__).resolve().parents[1] / "vm" / "runner.py"
OPENSTACK_RUNTIMES = "/opt/stackml/runtimes"


def runtime_on_server(backend_name: str, key: str) -> str:
    """The runtime's root directory as the server sees it."""
    cfg = jobctx.settings()
    if backend_name == "sandbox":
        return str(ensure_runtime(cfg, key).parent.parent)
    return f"{OPENSTACK_RUNTIMES}/{key}"


def job_document(job_id: str) -> tuple[dict[str, object], str]:
    """job.json for the runner (with signed URLs to read the inputs) and the runtime root."""
    cfg = jobctx.settings()
    store = jobctx.store()
    with db() as s:
        job = repo.get_job(s, job_id)
        res = jobctx.chief(s, job_id)
        project_id = job.project_id
        backend_name = res.backend if res else cfg.compute
    spec = JobSpec.model_validate(job.spec)
    pkg_key = store.key_of(spec.trainer.package_uri)
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
    runtime = runtime_on_server(backend_name, spec.runtime.key)
    doc: dict[str, object] = {
        "job_id": job_id,
        "project_id": project_id,
        "module": spec.trainer.module,
        "argv": spec.trainer_argv(),
        "env": dict(spec.env),
        "runtime": runtime,
        "package_url": sign(pkg_grant.url_prefix, pkg_grant.query, ""),
        "inputs": inputs,
    }
    return doc, runtime


def sign(url_prefix: str, query: str, rel: str) -> str:
    from urllib.parse import quote

    return f"{url_prefix}{quote(rel)}?{query}"


def run(job_id: str) -> None:
    cfg = jobctx.settings()
    with db() as s:
        job = repo.get_job(s, job_id)
        if job.state != JobState.PROVISIONING:
            return
        res = jobctx.chief(s, job_id)
        if res is None:
            raise BackendError(f"job {job_id} is provisioning without a server")
        target = jobctx.ssh_target(job, res)
    try:
        doc, runtime = job_document(job_id)
    except BackendError as e:
        jobctx.fail(job_id, Phase.PROVISION, e.reason, f"cannot stage the job: {e}")
        return
    try:
        conn = ssh.wait_for_ssh(target, cfg.ssh_deadline)
    except ssh.SSHError as e:
        jobctx.fail(
            job_id,
            Phase.PROVISION,
            "ssh_unreachable",
            f"the server did not answer SSH within {cfg.ssh_deadline:.0f}s: {e}",
        )
        return
    python = f"{runtime}/bin/python"
    try:
        conn.run(["mkdir", "-p", JOB_DIR], timeout=cfg.command_timeout)
        conn.put_bytes(RUNNER_SRC.read_bytes(), RUNNER, 0o644)
        conn.put_bytes(json.dumps(doc).encode(), f"{JOB_DIR}/job.json", 0o600)
        conn.run([python, RUNNER, "prepare", JOB_DIR], timeout=cfg.provision_deadline)
        with db() as s:
            repo.touch(s, job_id)
            if repo.get_job(s, job_id).state != JobState.PROVISIONING:
                return  # cancelled meanwhile: do not start the trainer
        conn.run([python, RUNNER, "start", JOB_DIR], timeout=cfg.command_timeout)
    except ssh.RemoteCommandError as e:
        jobctx.fail(
            job_id,
            Phase.PROVISION,
            "provision_failed",
            f"preparing the server failed: {e.stderr_tail.strip() or e}",
        )
        return
    except ssh.SSHError as e:
        jobctx.fail(job_id, Phase.PROVISION, e.reason, f"lost the server while preparing: {e}")
        return
    with db() as s:
        moved = repo.transition(
            s,
            job_id,
            JobState.PROVISIONING,
            JobState.RUNNING,
            f"trainer started: python -m {doc['module']}",
            poll_interval=cfg.poll_min,
        )
    if moved:
        jobctx.next_step(queue.POLL, job_id, cfg.poll_min)
