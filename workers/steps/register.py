"""Register a model version: check its artifact in the store and record what it holds.

Task `stackml.register_version` takes a model_versions.id. For a version in CREATING it lists
the artifact's objects (their size and md5/etag become the version's checksums), reads
`saved_model.pb` from the store and decodes its `serving_default` signature without
TensorFlow (service/domain/savedmodel.py), then marks the version READY, or FAILED with a
sentence saying what is wrong. The model's first READY version gets the `default` label (when
the model never had one), so that a plain deploy and the default predict route need no extra
call. A version that is no longer CREATING is left alone, so the task may run twice. A version
a job's gate decides about (output.gate) gets no label here: its evaluation is enqueued
(workers/steps/evaluate.py), and the gate moves the label or not. A store that does not answer
now raises (the task is retried).
"""

from __future__ import annotations

import logging
from datetime import datetime
from typing import Any

from sqlalchemy import select, update

from service import queue
from service.backends.interfaces import ObjectInfo, ObjectStore
from service.db import evaluations
from service.db import jobs as jobs_repo
from service.db import registry as repo
from service.db.models import Job, Model, ModelVersion, utcnow
from service.domain import savedmodel
from service.domain.errors import StoreError, TransientBackendError
from workers import jobctx

log = logging.getLogger("stackml.worker.register")

SAVED_MODEL = "saved_model.pb"
MAX_OBJECTS = 100_000


class ArtifactInvalid(Exception):
    """What is wrong with the artifact, as the version's failure_message."""


def run(version_id: str) -> None:
    try:
        vid = int(version_id)
    except ValueError:
        log.warning("register_version: %r is not a version id; nothing done", version_id)
        return
    with jobctx.db() as s:
        mv = s.get(ModelVersion, vid)
        if mv is None or mv.state != repo.CREATING:
            return  # deleted, or already registered by an earlier run
        model = s.get(Model, mv.model_id)
        assert model is not None
        project, uri = model.project_id, mv.artifact_uri
        trust_id = None
        if mv.source_job_id is not None:
            trust_id = s.scalar(select(Job.trust_id).where(Job.id == mv.source_job_id))
    store = jobctx.store(project, trust_id)
    try:
        checksums, signature = inspect_artifact(store, uri)
    except ArtifactInvalid as e:
        _finish(vid, failure=str(e))
        return
    except TransientBackendError:
        raise  # retried by the task (workers/base.py)
    except StoreError as e:
        _finish(vid, failure=f"the store refused to read {uri}: {e}")
        return
    _finish(vid, checksums=checksums, signature=signature)


def _finish(vid: int, **outcome: Any) -> None:
    with jobctx.db() as s:
        mv = s.get(ModelVersion, vid)
        if mv is None:
            return
        gated = bool(evaluations.of_version(s, vid))
        if not repo.finish_version(s, mv, **outcome):
            return
        what = "READY" if outcome.get("failure") is None else f"FAILED: {outcome['failure']}"
        if mv.state == repo.READY and not gated:  # a gated version's label is its gate's
            model = s.get(Model, mv.model_id)
            if model is not None and repo.adopt_default(s, model, mv.version):
                what += f"; label {repo.DEFAULT_LABEL!r} points at it (the first READY one)"
        log.info("model version %s (%s) is %s", vid, mv.artifact_uri, what)
    if gated:
        from workers.steps import evaluate

        evaluate.enqueue_for_version(vid)


def inspect_artifact(store: ObjectStore, uri: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(checksums, signature) of the SavedModel at `uri`, or ArtifactInvalid."""
    try:
        prefix = store.key_of(uri)
    except ValueError as e:
        raise ArtifactInvalid(f"{uri} is not on this platform's store ({store.scheme}://)") from e
    if not prefix.endswith("/"):
        prefix += "/"
    objects: list[ObjectInfo] = store.list(prefix)
    if not objects:
        raise ArtifactInvalid(f"nothing is stored at {uri}")
    if len(objects) > MAX_OBJECTS:
        raise ArtifactInvalid(
            f"{uri} holds {len(objects)} objects; a SavedModel of more than {MAX_OBJECTS} "
            "is not registered"
        )
    checksums: dict[str, Any] = {
        o.key[len(prefix) :]: {"size": int(o.size), "md5": o.etag.strip('"')}
        for o in sorted(objects, key=lambda o: o.key)
    }
    pb = next((o for o in objects if o.key == prefix + SAVED_MODEL), None)
    if pb is None:
        raise ArtifactInvalid(
            f"{uri} holds no {SAVED_MODEL} at its top: it is not a SavedModel directory"
        )
    if pb.size > savedmodel.MAX_BYTES:
        raise ArtifactInvalid(
            f"{SAVED_MODEL} is {pb.size} bytes, more than the {savedmodel.MAX_BYTES} "
            "read to find its signature"
        )
    data = store.get(prefix + SAVED_MODEL)
    try:
        signature = savedmodel.read_signature(data)
    except savedmodel.SavedModelError as e:
        raise ArtifactInvalid(f"{uri}{SAVED_MODEL} cannot be read: {e}") from e
    return checksums, signature


def register_job_output(
    s: Any, job: Job, source: Job | None = None, by: str = repo.SYSTEM
) -> int | None:
    """For a job that just SUCCEEDED with output.register_as: its model (created when
    missing) gets a new CREATING version of the job's output, with the final metrics of
    `source` (default: the job; a tuning job's best trial), which the version names as its
    source job. Returns the version's id for stackml.register_version, or None when nothing
    is asked."""
    name = ((job.spec or {}).get("output") or {}).get("register_as")
    uri = (job.output or {}).get("model_uri")
    if not isinstance(name, str) or not isinstance(uri, str):
        return None
    model = repo.ensure_model(s, job.project_id, name, by=by)
    mv = repo.create_version(
        s,
        model,
        artifact_uri=uri if uri.endswith("/") else uri + "/",
        by=by,
        source_job_id=(source or job).id,
        metrics=jobs_repo.latest_metrics(s, (source or job).id),
    )
    gate = ((job.spec or {}).get("output") or {}).get("gate")
    if isinstance(gate, dict):
        # in the same transaction: a SUCCEEDED gated job always has its evaluation
        evaluations.create(s, job, mv, gate)
    return mv.id


def enqueue(version_id: int) -> None:
    jobctx.next_step(queue.REGISTER_VERSION, str(version_id))


def redrive_stalled(before: datetime) -> list[int]:
    """Versions CREATING since before `before` (their task was lost: a broker outage, a
    worker killed): re-enqueued, each by one reconciler only (a compare-and-set on
    updated_at). Returns their ids."""
    won = []
    with jobctx.db() as s:
        stale = s.scalars(
            select(ModelVersion.id).where(
                ModelVersion.state == repo.CREATING, ModelVersion.updated_at < before
            )
        ).all()
        for vid in stale:
            moved = s.execute(
                update(ModelVersion)
                .where(
                    ModelVersion.id == vid,
                    ModelVersion.state == repo.CREATING,
                    ModelVersion.updated_at < before,
                )
                .values(updated_at=utcnow())
            ).rowcount  # type: ignore[attr-defined]
            if moved:
                won.append(vid)
    for vid in won:
        enqueue(vid)
    return won
