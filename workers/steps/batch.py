"""Batch prediction jobs in the job pipeline: what provision ships, and how export finishes.

A batch job runs through the same states and steps as a training job (allocate, provision,
poll, export, teardown; quotas, usage, the reconciler, cancel). What differs:

- provision ships the batch predictor (`workers/vm/batch_predictor.py`), the model server it
  predicts with (`workers/vm/model_server.py`) and the shard plan (`service/domain/batch.py`,
  as `batch_plan.py`) next to the runner, and writes a `job.json` of kind `batch_prediction`:
  signed URLs of the model version's files (size + md5, from its recorded checksums) and of
  every input object, and a read and a write grant on the output prefix. `runner start` then
  runs the predictor where it would run a trainer (log, heartbeat, exit code: poll as usual).
- export uploads nothing: the shards are in the store already. It reads `manifest.json`,
  checks every field of it, checks that every shard is done and that both of its objects are
  in the store, and records the totals in the job's output.

Several servers (`prediction.max_workers` W > 1): each server's job.json carries
`"workers": W` and `"worker": k` (`document(..., worker=k, workers=W)`; absent, the predictor
takes W 1, k 0). Worker k computes the shards n with n % W == k and writes its part manifest
`manifest.worker-<k:05d>-of-<W:05d>.json`, never manifest.json. Export reads the W parts (one
missing or invalid fails the job, naming the worker), merges them (`dom.merge_parts`: every
part checked, one run, each marking only its own shards done), PUTs the merged manifest.json
(which a re-run resumes from, as after one server) and goes on as above; the parts are
deleted once the job has SUCCEEDED.
"""

from __future__ import annotations

import json
from typing import Any

from service import queue
from service.backends.interfaces import Access, ObjectStore
from service.db import endpoints as ep_repo
from service.db import jobs as repo
from service.domain import batch as dom
from service.domain import outputs
from service.domain.errors import BackendError, StoreError
from service.domain.spec import JobSpec
from service.domain.states import FailureReason, JobState, Phase
from workers import jobctx
from workers.jobctx import db

KIND = "batch_prediction"
GRANT_MARGIN = 3600  # seconds the output grant outlives max_runtime_seconds


def sign(url_prefix: str, query: str, rel: str) -> str:
    from urllib.parse import quote

    return f"{url_prefix}{quote(rel)}?{query}"


def input_objects(store: ObjectStore, uris: list[str]) -> list[tuple[str, str, int]]:
    """(URI's key, object key, size) of every input object, in the job's order: an object URI
    is itself, a prefix the objects under it in key order."""
    out: list[tuple[str, str, int]] = []
    for uri in uris:
        base = store.key_of(uri)
        info = None if base.endswith("/") else store.info(base)
        if info is not None:
            out.append((base, base, info.size))
            continue
        under = outputs.as_prefix(base)  # a prefix (the API accepted it as one)
        out += [(base, o.key, o.size) for o in sorted(store.list(under), key=lambda o: o.key)]
    return out


def document(job_id: str, runtime: str, *, worker: int = 0, workers: int = 1) -> dict[str, Any]:
    """job.json of a batch prediction job, for its worker `worker` of `workers` servers."""
    _check_worker(worker, workers)
    cfg = jobctx.settings()
    with db() as s:
        job = repo.get_job(s, job_id)
        project_id, trust_id = job.project_id, job.trust_id
        spec = JobSpec.model_validate(job.spec)
        record = dict((job.output or {}).get("prediction") or {})
        row = ep_repo.version_row(s, str(record.get("model_id")), int(record.get("version") or 0))
        if row is None:
            raise BackendError(
                f"version {record.get('version')} of model {record.get('model')!r} is gone "
                "(deleted since the job was submitted)",
                reason=FailureReason.PROVISION_FAILED,
            )
        artifact, checksums = row.artifact_uri, dict(row.checksums or {})
    return build(
        jobctx.store(project_id, trust_id),
        cfg.grant_ttl,
        job_id=job_id,
        project_id=project_id,
        runtime=runtime,
        spec=spec,
        request=record.get("request") or {},
        artifact=artifact,
        checksums=checksums,
        worker=worker,
        workers=workers,
    )


def _check_worker(worker: int, workers: int) -> None:
    if type(workers) is not int or workers < 1:
        raise ValueError(f"workers must be an integer >= 1, not {workers!r}")
    if type(worker) is not int or not 0 <= worker < workers:
        raise ValueError(f"worker must be an integer in 0..{workers - 1}, not {worker!r}")


def build(
    store: ObjectStore,
    grant_ttl: int,
    *,
    job_id: str,
    project_id: str,
    runtime: str,
    spec: JobSpec,
    request: dict[str, Any],
    artifact: str,
    checksums: dict[str, Any],
    worker: int = 0,
    workers: int = 1,
) -> dict[str, Any]:
    """job.json of a batch prediction job from what the database holds: signed URLs of the
    model version's files (size + md5 checked on the server) and of every input object, a
    read and a write grant on the output prefix that outlive the job's max_runtime_seconds,
    and which of the job's `workers` servers this one is (`worker`, 0-based)."""
    _check_worker(worker, workers)
    pred = spec.predicting()
    fmt, why = dom.infer_format(list(pred.input_uris), pred.format)  # the API filled it in
    if fmt is None:
        raise BackendError(f"prediction.format: {why}", reason=FailureReason.PROVISION_FAILED)
    model_prefix = outputs.as_prefix(store.key_of(artifact))
    model_grant = store.grant(model_prefix, Access.READ, grant_ttl)
    files = [
        {
            "path": rel,
            "url": sign(model_grant.url_prefix, model_grant.query, rel),
            "size": int(meta["size"]),
            "md5": str(meta["md5"]),
        }
        for rel, meta in sorted(checksums.items())
    ]
    # a read grant per input URI, as narrow as the spec names it (never the project's area)
    grants = {
        uri: store.grant(store.key_of(uri), Access.READ, grant_ttl) for uri in pred.input_uris
    }
    by_key = {store.key_of(uri): grants[uri] for uri in pred.input_uris}
    inputs = [
        {
            "key": key,
            "url": sign(by_key[base].url_prefix, by_key[base].query, key[len(base) :]),
            "size": size,
        }
        for base, key, size in input_objects(store, list(pred.input_uris))
    ]
    out_prefix = outputs.as_prefix(store.key_of(pred.output_prefix))
    ttl = max(grant_ttl, spec.max_runtime_seconds + GRANT_MARGIN)
    read = store.grant(out_prefix, Access.READ, ttl)
    write = store.grant(out_prefix, Access.WRITE, ttl)
    return {
        "kind": KIND,
        "job_id": job_id,
        "project_id": project_id,
        "runtime": runtime,
        "env": dict(spec.env),
        "model": {"files": files},
        "inputs": inputs,
        "format": fmt,
        "batch_size": pred.batch_size,
        "shard_rows": pred.shard_rows,
        "workers": workers,
        "worker": worker,
        "request": request,
        "output": {
            "read_url_prefix": read.url_prefix,
            "read_query": read.query,
            "write_url_prefix": write.url_prefix,
            "write_query": write.query,
        },
    }


def finish(ctx: jobctx.StepContext) -> None:
    """The export step of a batch job: check the manifest and the shards, record the totals,
    SUCCEEDED. A run that is not complete fails (its shards stay: a re-run resumes them).
    Over several servers (`max_workers` W > 1) the manifest is first merged from the
    workers' part manifests and PUT as manifest.json; the parts are deleted on success."""
    job_id = ctx.job_id
    store = jobctx.store(ctx.project_id, ctx.trust_id)
    pred = ctx.spec.predicting()
    prefix = outputs.as_prefix(store.key_of(pred.output_prefix))
    workers = pred.max_workers
    parts: list[str] = []
    if workers > 1:
        parts = [prefix + dom.part_manifest_name(k, workers) for k in range(workers)]
        merged = _merge(job_id, store, parts, workers)
        if merged is None:
            return
        # the run's manifest, as one server would have written it: a re-run resumes from it
        store.put(prefix + dom.MANIFEST, json.dumps(merged, indent=1).encode())
        doc: object = merged
    else:
        try:
            raw = store.get(prefix + dom.MANIFEST)
        except KeyError:
            _fail(job_id, f"the predictor exited 0 but wrote no {dom.MANIFEST}")
            return
        except StoreError:
            raise
        try:
            doc = json.loads(raw)
        except (ValueError, RecursionError) as e:
            _fail(job_id, f"{dom.MANIFEST} is invalid: {e}")
            return
    try:
        summary = dom.read_manifest(doc)
    except (ValueError, RecursionError) as e:
        _fail(job_id, f"{dom.MANIFEST} is invalid: {e}")
        return
    if summary.done != summary.shards:
        _fail(job_id, f"{summary.shards - summary.done} of {summary.shards} shards are not done")
        return
    listed = {o.key[len(prefix) :] for o in store.list(prefix)}
    missing = [n for n in summary.objects if n not in listed and store.info(prefix + n) is None]
    if missing:
        _fail(job_id, f"{len(missing)} shard object(s) are missing from the store: {missing[0]}")
        return
    with db() as s:
        record = dict((repo.get_job(s, job_id).output or {}).get("prediction") or {})
    record.update(
        {
            "rows": summary.rows,
            "errors": summary.errors,
            "predicted": summary.rows - summary.errors,
            "shards": summary.shards,
            "results": f"{pred.output_prefix}{dom.RESULTS}-*",
            "errors_uri": f"{pred.output_prefix}{dom.ERRORS}-*",
            "manifest": f"{pred.output_prefix}{dom.MANIFEST}",
        }
    )
    output = {"output_prefix": pred.output_prefix, "prediction": record}
    with db() as s:
        moved = repo.transition(
            s,
            job_id,
            JobState.EXPORTING,
            JobState.SUCCEEDED,
            f"batch prediction done: {summary.rows} rows ({summary.errors} failed) in "
            f"{summary.shards} shards under {pred.output_prefix}",
            output=output,
        )
    jobctx.next_step(queue.TEARDOWN, job_id)
    if not moved:
        jobctx.log.info("job %s left EXPORTING while its shards were checked", job_id)
    elif parts:
        # merged into manifest.json: the parts go, only once the job succeeded (an export
        # re-driven after a crash before that finds them again); one left is harmless
        try:
            store.delete_keys(parts, within=prefix)
        except BackendError as e:
            jobctx.log.warning("job %s: could not delete its part manifests: %s", job_id, e)


def _merge(
    job_id: str, store: ObjectStore, parts: list[str], workers: int
) -> dict[str, Any] | None:
    """The merged manifest of the workers' part manifests (keys `parts`, worker k's at k), or
    None when one is missing or invalid: the job failed, naming it."""
    docs: dict[int, object] = {}
    for k, key in enumerate(parts):
        name = key.rsplit("/", 1)[-1]
        try:
            raw = store.get(key)
        except KeyError:
            _fail(job_id, f"batch worker {k} of {workers} exited 0 but wrote no {name}")
            return None
        try:
            docs[k] = json.loads(raw)
        except (ValueError, RecursionError) as e:
            _fail(job_id, f"batch worker {k} of {workers}'s {name} is not JSON: {e}")
            return None
    try:
        return dom.merge_parts(docs, workers)
    except dom.ManifestInvalid as e:
        _fail(job_id, f"the workers' part manifests do not merge: {e}")
        return None


def _fail(job_id: str, message: str) -> None:
    jobctx.fail(job_id, Phase.EXPORT, FailureReason.RUNNER_OUTPUT_INVALID, message)
