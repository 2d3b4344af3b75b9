"""POST /v1/jobs with type batch_prediction: what the schema cannot check (the model version,
the inputs in the store, the output prefix), checked before anything is stored.

The label is resolved once, here: the job's `output.prediction` records the model, the version
and the label it came from, and the workers read the version from there. The output prefix is
reserved as `output.output_prefix` (service/api/jobs.py checks and inserts it under the same lock
as training outputs). A prefix that holds only a batch run's own objects (manifest.json, the
workers' part manifests manifest.worker-*.json, prediction.results-*, prediction.errors-*)
whose manifest names the same request is a re-run: accepted, and the job computes only the
shards that are missing there. A run over several servers (max_workers > 1) that failed before
its export merged the parts has no manifest.json: then every part must name the same request.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from sqlalchemy.orm import Session

from service.api.errors import field_error
from service.backends.interfaces import ObjectStore
from service.db import endpoints as ep_repo
from service.db import registry
from service.domain import batch as dom
from service.domain import outputs
from service.domain.errors import BackendError, Conflict, NotFound, ServiceUnavailable
from service.domain.spec import Prediction

DEFAULT_LABEL = "default"


class OutputExists(Conflict):
    code = "output_exists"


@dataclass(frozen=True)
class Resolved:
    """A batch job's checked request: the version to use and what its output records."""

    prediction: Prediction  # with the format filled in
    record: dict[str, Any]  # job.output["prediction"] at submission
    request: dict[str, Any]  # what the manifest names (a re-run must name the same)


def resolve(
    s: Session,
    store: ObjectStore,
    project: str,
    pred: Prediction,
    problems: list[dict[str, str]],
    check_uri: Any,
) -> Resolved | None:
    """Check the model version, the inputs and the output prefix; append each problem to
    `problems` (field errors) and return None when there is one."""
    start = len(problems)
    record: dict[str, Any] = {"model": pred.model}
    try:
        model = registry.find_model(s, project, pred.model)
    except NotFound:
        problems.append(field_error("prediction.model", f"no model {pred.model!r} in this project"))
        model = None
    if model is not None:
        version = pred.version
        label = None if version is not None else (pred.label or DEFAULT_LABEL)
        if label is not None:
            version = ep_repo.label_version(s, model.id, label)
            if version is None:
                problems.append(
                    field_error("prediction.label", f"model {pred.model!r} has no label {label!r}")
                )
        if version is not None:
            row = ep_repo.version_row(s, model.id, version)
            field = "prediction.version" if label is None else "prediction.label"
            via = "" if label is None else f" (label {label!r})"
            if row is None:
                problems.append(
                    field_error(field, f"model {pred.model!r} has no version {version}{via}")
                )
            elif row.state != "READY":
                problems.append(
                    field_error(
                        field,
                        f"version {version} of {pred.model!r}{via} is {row.state}, not READY: "
                        "only a READY version predicts",
                    )
                )
            else:
                record.update(
                    {
                        "model_id": model.id,
                        "version": version,
                        "label": label,
                        "artifact_uri": row.artifact_uri,
                    }
                )
    fmt, why = dom.infer_format(pred.input_uris, pred.format)
    if why:
        problems.append(field_error("prediction.format", why))
    for i, uri in enumerate(pred.input_uris):
        problem = check_uri(store, project, uri, "prefix")
        if problem:
            problems.append(field_error(f"prediction.input_uris.{i}", problem))
    out_uri = outputs.as_prefix(pred.output_prefix)
    problem = check_uri(store, project, out_uri, None)
    if problem is None:
        problem = outputs.prefix_problem(store.key_of(out_uri), store.project_prefix(project))
    if problem:
        problems.append(field_error("prediction.output_prefix", problem))
    if len(problems) > start:
        return None
    resolved = pred.model_copy(update={"format": fmt, "output_prefix": out_uri})
    request = {
        "model": pred.model,
        "version": record["version"],
        "artifact_uri": record["artifact_uri"],
        "format": fmt,
        "shard_rows": pred.shard_rows,
        "input_uris": list(pred.input_uris),
    }
    return Resolved(resolved, record, request)


def check_output(store: ObjectStore, uri: str, request: dict[str, Any]) -> bool:
    """409 output_exists unless the prefix is empty (False) or holds a failed run of the same
    request to resume (True)."""
    prefix = outputs.as_prefix(store.key_of(uri))
    try:
        found = store.list(prefix)
    except BackendError as e:
        raise ServiceUnavailable(f"the object store cannot list {uri}: {e}") from e
    if not found:
        return False
    names = [o.key[len(prefix) :] for o in found]
    details = {"field": "prediction.output_prefix", "model_uri": uri, "objects": len(found)}
    foreign = dom.foreign(names)
    if foreign:
        raise OutputExists(
            f"prediction.output_prefix {uri} already holds {len(found)} object(s), "
            f"{foreign[0]!r} among them; a job writes only to a new prefix (or resumes a "
            "batch run of the same request there)",
            details=details,
        )
    # a run over several servers that failed before its export merged the workers' parts
    # has no manifest.json: its parts (each names the run's request) stand for it
    parts = [n for n in names if dom.is_part_name(n)]
    keys = [dom.MANIFEST] if dom.MANIFEST in names or not parts else sorted(parts)
    for name in keys:
        try:
            doc = json.loads(store.get(prefix + name))
        except (BackendError, KeyError, ValueError, RecursionError) as e:
            raise OutputExists(
                f"prediction.output_prefix {uri} holds shards but no readable {name} ({e}); "
                "name a new prefix",
                details=details,
            ) from e
        if not isinstance(doc, dict) or doc.get("request") != request:
            raise OutputExists(
                f"prediction.output_prefix {uri} holds the shards of another request (another "
                "model version, inputs, format or shard_rows); name a new prefix",
                details=details,
            )
    return True
