"""Export: the runner pushes STACKML_MODEL_DIR to the store with a write grant; we verify it."""

from __future__ import annotations

import json
from typing import Any

from service import queue
from service.backends.interfaces import Access, ObjectInfo, ObjectStore
from service.db import jobs as repo
from service.domain.errors import StoreError
from service.domain.spec import JobSpec
from service.domain.states import FailureReason, JobState, Phase
from workers import chaos, jobctx, ssh
from workers.jobctx import JOB_DIR, RUNNER, db
from workers.steps.provision import PYTHON


def model_uri(job_id: str, project_id: str, spec: JobSpec, store: ObjectStore) -> str:
    return spec.output.model_uri or store.uri(f"{store.project_prefix(project_id)}models/{job_id}/")


def run(job_id: str) -> None:
    cfg = jobctx.settings()
    with db() as s:
        job = repo.get_job(s, job_id)
        if job.state != JobState.EXPORTING:
            return
        store = jobctx.store(job.project_id, job.trust_id)
        chaos.pause("export")
        res = jobctx.chief(s, job_id)
        if res is None:
            jobctx.fail(
                job_id, Phase.EXPORT, FailureReason.SERVER_LOST, "the job has no server record"
            )
            return
        target = jobctx.ssh_target(job, res)
        server_id, trust_id = res.server_id, job.trust_id
        spec = JobSpec.model_validate(job.spec)
        uri = model_uri(job_id, job.project_id, spec, store)
    prefix = store.key_of(uri)
    if not prefix.endswith("/"):
        prefix += "/"
    grant = store.grant(prefix, Access.WRITE, max(600, int(cfg.provision_deadline) * 2))
    try:
        conn = ssh.connection(target)
        # the grant goes over stdin: signed URLs stay out of the VM's process list
        result = conn.run(
            [PYTHON, RUNNER, "export", JOB_DIR],
            timeout=cfg.provision_deadline,
            input=json.dumps(
                {
                    "url_prefix": grant.url_prefix,
                    "query": grant.query,
                    "segment_bytes": grant.segment_bytes,
                }
            ).encode(),
        )
        manifest = json.loads(result.stdout.decode().strip().splitlines()[-1])
    except ssh.RemoteCommandError as e:
        _fail(
            job_id,
            store,
            prefix,
            FailureReason.UPLOAD_FAILED,
            f"uploading the model failed: {e.stderr_tail.strip() or e}",
        )
        return
    except (ssh.SSHUnreachable, ssh.ConnectionLost) as e:
        ssh.drop(target)
        if jobctx.retry_after_ssh_failure(job_id, queue.EXPORT, trust_id, server_id, e):
            return  # the server is up: the export runs again (it is idempotent)
        _fail(
            job_id, store, prefix, FailureReason.of(e.reason), f"lost the server during export: {e}"
        )
        return
    except ssh.SSHError as e:
        _fail(
            job_id, store, prefix, FailureReason.of(e.reason), f"lost the server during export: {e}"
        )
        return
    except (ValueError, IndexError) as e:
        _fail(
            job_id,
            store,
            prefix,
            FailureReason.UPLOAD_FAILED,
            f"the runner's answer is garbled: {e}",
        )
        return

    objects = manifest.get("objects", [])
    if not objects:
        jobctx.fail(
            job_id,
            Phase.EXPORT,
            FailureReason.NO_MODEL,
            "the trainer exited 0 but wrote nothing to STACKML_MODEL_DIR",
        )
        return
    try:
        for obj in objects:
            if obj.get("segments"):
                store.put_manifest(
                    prefix + obj["key"],
                    [
                        ObjectInfo(prefix + s["key"], int(s["size"]), str(s["etag"]))
                        for s in obj["segments"]
                    ],
                    expected_etag=obj["etag"],
                )
    except (StoreError, ValueError, KeyError, TypeError) as e:
        _fail(
            job_id,
            store,
            prefix,
            FailureReason.UPLOAD_FAILED,
            f"the model's large files did not verify: {e}",
        )
        return
    objects = [{"key": o["key"], "size": o["size"], "etag": o["etag"]} for o in objects]
    bad = unverified(store, prefix, objects)
    if bad is not None:
        _fail(
            job_id,
            store,
            prefix,
            FailureReason.UPLOAD_FAILED,
            f"{bad} is missing or differs in the store after upload",
        )
        return
    output = {"model_uri": uri, "objects": objects, "size": sum(int(o["size"]) for o in objects)}
    with db() as s:
        moved = repo.transition(
            s,
            job_id,
            JobState.EXPORTING,
            JobState.SUCCEEDED,
            f"model exported to {uri} ({len(objects)} files)",
            output=output,
        )
    jobctx.next_step(queue.TEARDOWN, job_id)
    if not moved:
        jobctx.log.info("job %s left EXPORTING during the upload", job_id)


def unverified(store: ObjectStore, prefix: str, objects: list[dict[str, Any]]) -> str | None:
    """The first of the runner's `objects` (key, size, etag) the store does not hold as
    reported, or None when all verify. One listing for the lot; an object the listing lacks or
    shows otherwise is asked about itself, because a busy Swift updates container listings
    after the write has returned (they are eventually consistent; the object is not)."""
    listed = {o.key: o for o in store.list(prefix)}
    for obj in objects:
        key = prefix + obj["key"]

        def matches(got: ObjectInfo | None, obj: dict[str, Any] = obj) -> bool:
            return got is not None and (got.etag, got.size) == (obj["etag"], obj["size"])

        if not matches(listed.get(key)) and not matches(store.info(key)):
            return str(obj["key"])
    return None


def _fail(
    job_id: str, store: ObjectStore, prefix: str, reason: FailureReason, message: str
) -> None:
    """Fail the job, then remove what its upload left. Only the run that moves the job to
    FAILED removes anything: a second export run (re-driven) that loses the server after the
    first one registered the model must not delete that model."""
    if jobctx.fail(job_id, Phase.EXPORT, reason, message):
        _discard(store, prefix)


def _discard(store: ObjectStore, prefix: str) -> None:
    """Nothing half-written stays behind as if it were a model. The job fails whatever happens
    here (nothing is registered); a store that cannot delete now leaves a line in the log."""
    try:
        store.delete_prefix(prefix)
    except StoreError as e:
        jobctx.log.warning("could not remove the partial upload under %s: %s", prefix, e)
