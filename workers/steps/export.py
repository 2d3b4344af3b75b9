"""Export: the runner pushes STACKML_MODEL_DIR to the store with a write grant; we verify it."""

from __future__ import annotations

import json
import re
from typing import Any

from sqlalchemy import select, update

from service import queue
from service.backends.interfaces import Access, ObjectInfo, ObjectStore
from service.db import jobs as repo
from service.db.models import Job
from service.domain.errors import StoreError
from service.domain.spec import JobSpec
from service.domain.states import FailureReason, JobState, Phase
from workers import jobctx, ssh
from workers.jobctx import JOB_DIR, db
from workers.steps import batch, register
from workers.steps.provision import PYTHON


def model_uri(job_id: str, project_id: str, spec: JobSpec, store: ObjectStore) -> str:
    return spec.output.model_uri or store.uri(f"{store.project_prefix(project_id)}models/{job_id}/")


def run(job_id: str) -> None:
    with jobctx.open_step(job_id, JobState.EXPORTING) as ctx:
        if ctx is not None:
            if ctx.spec.batch:
                batch.finish(ctx)  # the shards are in the store already: check, record
            else:
                _export(ctx)


def _export(ctx: jobctx.StepContext) -> None:
    """One export at a time per job: `open_step` holds the job's lease while this runs."""
    cfg = jobctx.settings()
    job_id = ctx.job_id
    store = jobctx.store(ctx.project_id, ctx.trust_id)
    if ctx.target is None:
        jobctx.fail(job_id, Phase.EXPORT, FailureReason.SERVER_LOST, "the job has no server record")
        return
    target = ctx.target
    uri = model_uri(job_id, ctx.project_id, ctx.spec, store)
    prefix = store.key_of(uri)
    if not prefix.endswith("/"):
        prefix += "/"
    # what the prefix held before the job's first export: on failure only what appeared or
    # changed since (what this job's exports wrote) is removed, never objects that were there
    upload = Upload(store, prefix, baseline(job_id, {o.key: o.etag for o in store.list(prefix)}))
    grant = store.grant(prefix, Access.WRITE, max(600, int(cfg.provision_deadline) * 2))
    try:
        conn = ssh.connection(target)
        # the grant goes over stdin: signed URLs stay out of the VM's process list
        result = conn.run(
            jobctx.runner_argv(PYTHON, "export", JOB_DIR),
            timeout=cfg.provision_deadline,
            input=json.dumps(
                {
                    "url_prefix": grant.url_prefix,
                    "query": grant.query,
                    "segment_bytes": grant.segment_bytes,
                }
            ).encode(),
        )
    except ssh.RemoteCommandError as e:
        upload.fail(
            job_id,
            FailureReason.UPLOAD_FAILED,
            f"uploading the model failed: {e.stderr_tail.strip() or e}",
        )
        return
    except (ssh.SSHUnreachable, ssh.ConnectionLost) as e:
        ssh.drop(target)
        if jobctx.retry_after_ssh_failure(ctx, e):
            return  # the server is up: the export runs again (it is idempotent)
        upload.fail(job_id, FailureReason.of(e.reason), f"lost the server during export: {e}")
        return
    except ssh.SSHError as e:
        upload.fail(job_id, FailureReason.of(e.reason), f"lost the server during export: {e}")
        return
    try:
        # the runner's answer is the trainer's to forge (same user, same home): every key and
        # number in it is checked before any is used
        objects = manifest_objects(result.stdout)
    except ManifestInvalid as e:
        upload.fail(
            job_id, FailureReason.RUNNER_OUTPUT_INVALID, f"the runner's answer is invalid: {e}"
        )
        return
    upload.reported = [prefix + k for o in objects for k in _keys_of(o)]
    if not objects:
        upload.fail(
            job_id,
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
        upload.fail(
            job_id, FailureReason.UPLOAD_FAILED, f"the model's large files did not verify: {e}"
        )
        return
    objects = [{"key": o["key"], "size": o["size"], "etag": o["etag"]} for o in objects]
    bad = unverified(store, prefix, objects)
    if bad is not None:
        upload.fail(
            job_id,
            FailureReason.UPLOAD_FAILED,
            f"{bad} is missing or differs in the store after upload",
        )
        return
    output = {"model_uri": uri, "objects": objects, "size": sum(int(o["size"]) for o in objects)}
    version_id = None
    with db() as s:
        moved = repo.transition(
            s,
            job_id,
            JobState.EXPORTING,
            JobState.SUCCEEDED,
            f"model exported to {uri} ({len(objects)} files)",
            output=output,
        )
        if moved:  # output.register_as: a new model version, in the same transaction
            version_id = register.register_job_output(s, repo.get_job(s, job_id))
    jobctx.next_step(queue.TEARDOWN, job_id)
    if version_id is not None:
        register.enqueue(version_id)
    if not moved:
        jobctx.log.info("job %s left EXPORTING during the upload", job_id)


def baseline(job_id: str, listed: dict[str, str]) -> dict[str, str]:
    """The prefix's objects (key -> etag) when the job's first export began: recorded once
    (jobs.export_baseline), so that an export re-driven after a worker died mid-upload counts
    the dead run's objects as the job's own, not as what was there before."""
    with db() as s:
        s.execute(
            update(Job)
            .where(Job.id == job_id, Job.export_baseline.is_(None))
            .values(export_baseline=listed)
        )
        recorded = s.scalar(select(Job.export_baseline).where(Job.id == job_id))
    return {str(k): str(v) for k, v in (recorded or {}).items()}


class ManifestInvalid(ValueError):
    """The runner's report of what it uploaded is not one the worker can trust."""


MAX_KEY_CHARS = 1024
MAX_OBJECTS = 100_000
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_ETAG = re.compile(r"[0-9a-fA-F]{1,64}")


def check_key(key: object) -> str:
    """A key relative to the job's output prefix, or ManifestInvalid: a non-empty string of at
    most MAX_KEY_CHARS, no control character or backslash, not absolute, and no empty, `.` or
    `..` segment (so that prefix + key stays inside the prefix, on every store)."""
    if not isinstance(key, str) or not key:
        raise ManifestInvalid(f"an object key must be a non-empty string, not {key!r:.80}")
    if len(key) > MAX_KEY_CHARS:
        raise ManifestInvalid(f"an object key is longer than {MAX_KEY_CHARS} characters")
    if _CONTROL.search(key) or "\\" in key:
        raise ManifestInvalid(f"the object key {key!r:.80} holds a control character or '\\'")
    if key.startswith("/") or any(part in ("", ".", "..") for part in key.split("/")):
        raise ManifestInvalid(f"the object key {key!r:.80} leaves the job's output prefix")
    return key


def _check_entry(obj: object, *, segment: bool = False) -> dict[str, Any]:
    what = "a segment" if segment else "an object"
    if not isinstance(obj, dict):
        raise ManifestInvalid(f"{what} is not a JSON object: {obj!r:.80}")
    check_key(obj.get("key"))
    size, etag = obj.get("size"), obj.get("etag")
    if type(size) is not int or size < 0:
        raise ManifestInvalid(f"{what}'s size is not a non-negative integer: {size!r:.40}")
    if not isinstance(etag, str) or not _ETAG.fullmatch(etag):
        raise ManifestInvalid(f"{what}'s etag is not a hex digest: {etag!r:.80}")
    if not segment and obj.get("segments") is not None:
        segs = obj["segments"]
        if not isinstance(segs, list) or len(segs) > MAX_OBJECTS:
            raise ManifestInvalid(f"an object's segments are not a list of at most {MAX_OBJECTS}")
        for seg in segs:
            _check_entry(seg, segment=True)
    return obj


def manifest_objects(stdout: bytes) -> list[dict[str, Any]]:
    """The objects of the runner's answer (its last line on stdout), every one checked."""
    lines = stdout.decode("utf-8", "replace").strip().splitlines()
    if not lines:
        raise ManifestInvalid("the runner printed nothing")
    try:
        answer = json.loads(lines[-1])
    except (ValueError, RecursionError) as e:
        raise ManifestInvalid(f"the runner's last line is not JSON: {e}") from e
    if not isinstance(answer, dict):
        raise ManifestInvalid("the runner's answer is not a JSON object")
    objects = answer.get("objects", [])
    if not isinstance(objects, list) or len(objects) > MAX_OBJECTS:
        raise ManifestInvalid(f"the runner's objects are not a list of at most {MAX_OBJECTS}")
    return [_check_entry(o) for o in objects]


def _keys_of(obj: dict[str, Any]) -> list[str]:
    return [obj["key"], *(s["key"] for s in obj.get("segments") or [])]


class Upload:
    """What the job's exports wrote under `prefix`, removed when the export fails: every key
    that appeared or changed there since `before` (the listing taken when its first export
    began, `baseline`)."""

    def __init__(self, store: ObjectStore, prefix: str, before: dict[str, str]) -> None:
        self.store, self.prefix, self.before = store, prefix, before
        self.reported: list[str] = []

    def written(self) -> list[str]:
        """Keys under the prefix that are new or changed since `before`: the listing's, and
        the reported ones asked about one by one (a Swift listing may lag behind a write).
        A reported key whose object is as it was is not this run's (a forged report must not
        delete what another run wrote there)."""
        now = {o.key: o.etag for o in self.store.list(self.prefix)}
        fresh = [k for k, etag in now.items() if self.before.get(k) != etag]
        for key in self.reported:
            if key not in now and key.startswith(self.prefix):
                got = self.store.info(key)
                if got is not None and self.before.get(key) != got.etag:
                    fresh.append(key)
        return [k for k in dict.fromkeys(fresh) if k.startswith(self.prefix)]

    def fail(self, job_id: str, reason: FailureReason, message: str) -> None:
        """Fail the job, then remove what this run wrote. Only the run that moves the job to
        FAILED removes anything: a second export run (re-driven) that loses the server after
        the first one registered the model must not delete that model."""
        if jobctx.fail(job_id, Phase.EXPORT, reason, message):
            self.discard()

    def discard(self) -> None:
        """Nothing half-written stays behind as if it were a model. The job fails whatever
        happens here (nothing is registered); a store that cannot delete now leaves a line in
        the log."""
        try:
            keys = self.written()
            delete_keys = getattr(self.store, "delete_keys", None)
            if callable(delete_keys):
                delete_keys(keys, within=self.prefix)
            else:
                for key in keys:
                    self.store.delete(key)
        except (StoreError, ValueError) as e:
            jobctx.log.warning("could not remove the partial upload under %s: %s", self.prefix, e)


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
