"""Allocate: boot the job's server, record it before and after, wait (bounded) until ACTIVE."""

from __future__ import annotations

import time

from service import queue
from service.backends.interfaces import ServerSpec, ServerState
from service.db import jobs as repo
from service.db.models import Resource, utcnow
from service.domain.errors import BackendError
from service.domain.spec import JobSpec
from service.domain.states import JobState, Phase, ResourceState
from workers import jobctx, ssh
from workers.jobctx import db, log


def run(job_id: str) -> None:
    cfg = jobctx.settings()
    backend = jobctx.compute()
    with db() as s:
        job = repo.get_job(s, job_id)
        if job.state == JobState.QUEUED:
            spec = JobSpec.model_validate(job.spec)
            flavor_name = spec.resources.flavor or cfg.default_flavor
            if not repo.transition(
                s, job_id, JobState.QUEUED, JobState.ALLOCATING, f"booting one {flavor_name} server"
            ):
                return
        elif job.state != JobState.ALLOCATING:
            return
        spec = JobSpec.model_validate(job.spec)
        flavor_name = spec.resources.flavor or cfg.default_flavor
        if job.ssh_key_enc is None:
            pem, pub = ssh.generate_keypair()
            job.ssh_key_enc = jobctx.encrypt_key(pem)
            job.ssh_public_key = pub
        res = jobctx.chief(s, job_id)
        if res is None:
            # recorded before the boot: a crash after it leaves a row the reconciler pays for
            res = Resource(
                job_id=job_id,
                project_id=job.project_id,
                backend=backend.name,
                role="chief",
                name=f"stackml-{job_id}-chief",
                flavor=flavor_name,
                state=ResourceState.BOOTING.value,
            )
            s.add(res)
            s.flush()
        res_id, res_name, server_id = res.id, res.name, res.server_id
        public_key = job.ssh_public_key or ""
        project_id = job.project_id

    flavor = backend.find_flavor(flavor_name)
    if flavor is None:
        jobctx.fail(
            job_id,
            Phase.ALLOCATE,
            "unknown_flavor",
            f"flavor {flavor_name!r} is not offered by the {backend.name} backend",
        )
        return
    if server_id is None:
        existing = [r for r in backend.list_servers(("stackml-job", job_id)) if r.name == res_name]
        try:
            ref = (
                existing[0]
                if existing
                else backend.create_server(
                    ServerSpec(
                        name=res_name,
                        flavor=flavor,
                        image=spec.runtime.key,
                        public_key=public_key,
                        tags=(
                            ("stackml-job", job_id),
                            ("stackml-role", "chief"),
                            ("stackml-project", project_id),
                        ),
                    )
                )
            )
        except BackendError as e:
            jobctx.fail(job_id, Phase.ALLOCATE, e.reason, f"could not boot the server: {e}")
            return
        server_id = ref.id
        with db() as s:
            s.get_one(Resource, res_id).server_id = server_id
            repo.touch(s, job_id)

    deadline = time.monotonic() + cfg.boot_deadline
    status = backend.get_server(server_id)
    while status.state == ServerState.BUILD and time.monotonic() < deadline:
        time.sleep(0.2)
        status = backend.get_server(server_id)
    if status.state != ServerState.ACTIVE:
        reason = {ServerState.BUILD: "timeout", ServerState.ERROR: "boot_failed"}.get(
            status.state, "server_lost"
        )
        jobctx.fail(
            job_id,
            Phase.ALLOCATE,
            reason,
            f"server {server_id} is {status.state.value}"
            + (f": {status.fault}" if status.fault else "")
            + (f" after {cfg.boot_deadline:.0f}s" if reason == "timeout" else ""),
        )
        return

    with db() as s:
        res = s.get_one(Resource, res_id)
        res.state = ResourceState.ACTIVE.value
        res.host, res.port, res.username = status.host, status.port, status.username
        res.host_key = status.host_key
        res.active_at = utcnow()
        moved = repo.transition(
            s,
            job_id,
            JobState.ALLOCATING,
            JobState.PROVISIONING,
            f"server {server_id} is ACTIVE at {status.host}",
        )
    if moved:
        jobctx.next_step(queue.PROVISION, job_id)
    else:
        # cancelled or failed while booting: the server must not outlive the job
        log.info("job %s left ALLOCATING while its server booted; tearing down", job_id)
        jobctx.next_step(queue.TEARDOWN, job_id)
