"""/v1/models: the model registry (models, versions, labels and their history).

Roles as for jobs: readers read, members write (service/api/auth.py's rule by method). A
model is found by name in the caller's project only: another project's model is a 404.
Endpoints (/v1/models/<name>/endpoints) and prediction (/v1/models/<name>:predict) are other
modules (service/api/endpoints.py, service/api/predict.py).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from flask import Blueprint, Response, jsonify, request, url_for
from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr, model_validator

from service import queue
from service.api import ctx, json_body
from service.api.auth import current, current_project
from service.api.errors import field_error, fields_failed
from service.backends.interfaces import ObjectStore
from service.backends.storage.local import check_key
from service.db import feedback as feedback_repo
from service.db import jobs as jobs_repo
from service.db import registry as repo
from service.db.models import Model, iso
from service.domain import outputs
from service.domain.errors import Conflict, InvalidRequest, NotFound
from service.domain.feedback import declared_metric
from service.domain.states import JobState

bp = Blueprint("models", __name__)

MAX_VERSION = 2**31 - 1
_NAME = r"^[a-z][a-z0-9_-]{0,62}$"


class JobNotSucceeded(Conflict):
    """A version comes from a SUCCEEDED job only."""

    code = "job_not_succeeded"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class CreateModel(_Strict):
    name: StrictStr = Field(pattern=_NAME)
    description: StrictStr = Field(default="", max_length=repo.MAX_DESCRIPTION)


class CreateVersion(_Strict):
    job_id: StrictStr | None = Field(default=None, min_length=1, max_length=64)
    artifact_uri: StrictStr | None = Field(default=None, min_length=1, max_length=1024)

    @model_validator(mode="after")
    def _one_source(self) -> CreateVersion:
        if (self.job_id is None) == (self.artifact_uri is None):
            raise ValueError("give exactly one of job_id and artifact_uri")
        return self


class SetLabel(_Strict):
    version: StrictInt = Field(ge=1, le=MAX_VERSION)
    why: StrictStr = Field(default="", max_length=repo.MAX_WHY)
    # absent: move unconditionally; null: only if the label does not exist yet
    expected_version: StrictInt | None = Field(default=None, ge=1, le=MAX_VERSION)


class SetDefault(_Strict):
    version: StrictInt = Field(ge=1, le=MAX_VERSION)
    why: StrictStr = Field(default="", max_length=repo.MAX_WHY)
    expected_version: StrictInt | None = Field(default=None, ge=1, le=MAX_VERSION)


class Rollback(_Strict):
    why: StrictStr = Field(default="", max_length=repo.MAX_WHY)


# -- helpers ------------------------------------------------------------------------------------


def _model(s: Any, name: str) -> Model:
    return repo.find_model(s, current_project(), name)


def _version_number(model: Model, version: int) -> int:
    if not 1 <= version <= MAX_VERSION:
        raise NotFound(
            f"model {model.name!r} has no version {version}",
            details={"model": model.name, "version": version},
        )
    return version


def _label_name(model: Model, label: str) -> str:
    if not repo.NAME_RE.match(label):
        raise NotFound(
            f"model {model.name!r} has no label {label[:64]!r}",
            details={"model": model.name, "label": label[:64]},
        )
    return label


def _label_name_for_write(label: str) -> str:
    if not repo.NAME_RE.match(label):
        raise fields_failed(
            [field_error("label", f"must match {_NAME} (lower-case letters, digits, _ and -)")]
        )
    return label


def _by() -> str:
    return current().user_id or current_project()


def _expected(body: dict[str, Any], parsed: SetLabel | SetDefault) -> Any:
    return parsed.expected_version if "expected_version" in body else repo._UNSET


# -- models -------------------------------------------------------------------------------------


@bp.post("/v1/models")
def create_model() -> tuple[Response, int, dict[str, str]]:
    body = CreateModel.model_validate(json_body())
    c = ctx()
    with c.session() as s:
        model = repo.create_model(s, current_project(), body.name, body.description, _by())
        out = repo.serialize_model(s, model, detail=True)
    return jsonify(out), 201, {"Location": url_for("models.get_model", name=body.name)}


@bp.get("/v1/models")
def list_models() -> Response:
    with ctx().session() as s:
        rows = repo.list_models(s, current_project())
        return jsonify({"models": [repo.serialize_model(s, m) for m in rows]})


@bp.get("/v1/models/<name>")
def get_model(name: str) -> Response:
    with ctx().session() as s:
        return jsonify(repo.serialize_model(s, _model(s, name), detail=True))


@bp.delete("/v1/models/<name>")
def delete_model(name: str) -> tuple[str, int]:
    with ctx().session() as s:
        repo.delete_model(s, _model(s, name))
    return "", 204


# -- versions -----------------------------------------------------------------------------------


@bp.post("/v1/models/<name>/versions")
def create_version(name: str) -> tuple[Response, int, dict[str, str]]:
    body = CreateVersion.model_validate(json_body())
    c = ctx()
    project = current_project()
    job_id: str | None
    with c.session() as s:
        model = _model(s, name)
        if body.job_id is not None:
            uri, metrics, job_id = _from_job(s, project, body.job_id)
        else:
            assert body.artifact_uri is not None
            uri, metrics, job_id = _from_uri(c.store_for(project), project, body.artifact_uri)
        mv = repo.create_version(
            s, model, artifact_uri=uri, by=_by(), source_job_id=job_id, metrics=metrics
        )
        out = repo.serialize_version(mv, model, {})
        version_id = mv.id
    c.enqueue_quietly(queue.REGISTER_VERSION, str(version_id))
    where = url_for("models.get_version", name=name, version=out["version"])
    return jsonify(out), 202, {"Location": where}


def _from_job(s: Any, project: str, job_id: str) -> tuple[str, dict[str, Any], str]:
    job = jobs_repo.get_job(s, job_id, project)  # another project's job: 404
    if job.state != JobState.SUCCEEDED.value:
        raise JobNotSucceeded(
            f"job {job.id} is {job.state}; a version comes from a SUCCEEDED job",
            details={"job_id": job.id, "state": job.state},
        )
    uri = (job.output or {}).get("model_uri")
    if not isinstance(uri, str) or not uri:
        raise JobNotSucceeded(
            f"job {job.id} recorded no model_uri", details={"job_id": job.id, "state": job.state}
        )
    return outputs.as_prefix(uri), jobs_repo.latest_metrics(s, job.id), job.id


def _from_uri(store: ObjectStore, project: str, uri: str) -> tuple[str, dict[str, Any], None]:
    try:
        key = store.key_of(uri)
    except ValueError as e:
        raise fields_failed(
            [field_error("artifact_uri", f"must be a {store.scheme}:// URI on this store")]
        ) from e
    area = store.project_prefix(project)
    key = outputs.as_prefix(key)
    if not key.startswith(area) or key == area or "//" in key or "/../" in f"/{key}":
        raise fields_failed(
            [
                field_error(
                    "artifact_uri",
                    f"must be a directory inside this project's area, {store.scheme}://{area}",
                )
            ]
        )
    try:
        check_key(key, prefix=True)  # the key rules of both stores
    except ValueError as e:
        raise fields_failed([field_error("artifact_uri", str(e))]) from e
    return store.uri(key), {}, None


@bp.get("/v1/models/<name>/versions")
def list_versions(name: str) -> Response:
    with ctx().session() as s:
        model = _model(s, name)
        labels = repo.labels_of(s, model)
        rows = repo.list_versions(s, model)
        live = feedback_repo.live_metrics(s, model, [v.version for v in rows])
        evals = repo.evaluations_of(s, model)
        return jsonify(
            {
                "versions": [
                    _with_live(repo.serialize_version(v, model, labels, evals.get(v.version)), live)
                    for v in rows
                ]
            }
        )


@bp.get("/v1/models/<name>/versions/<int:version>")
def get_version(name: str, version: int) -> Response:
    with ctx().session() as s:
        model = _model(s, name)
        mv = repo.get_version(s, model, _version_number(model, version))
        live = feedback_repo.live_metrics(s, model, [mv.version])
        evaluation = repo.evaluations_of(s, model).get(mv.version)
        return jsonify(
            _with_live(
                repo.serialize_version(mv, model, repo.labels_of(s, model), evaluation), live
            )
        )


def _with_live(out: dict[str, Any], live: dict[int, Any]) -> dict[str, Any]:
    """A version's view with its live metrics from joined feedback (service/db/feedback.py),
    and the metric it is judged by, live against trained (`declared`)."""
    lm = live.get(out["version"])
    out["live_metrics"] = None
    if lm is not None:
        gate = (out.get("evaluation") or {}).get("metric")
        out["live_metrics"] = {
            **lm.as_json(),
            "declared": declared_metric(gate, dict(out.get("metrics") or {}), dict(lm.metrics)),
        }
    return out


@bp.delete("/v1/models/<name>/versions/<int:version>")
def delete_version(name: str, version: int) -> tuple[str, int]:
    with ctx().session() as s:
        model = _model(s, name)
        repo.delete_version(s, model, _version_number(model, version))
    return "", 204


# -- labels -------------------------------------------------------------------------------------


def _set_label(name: str, label: str, raw: dict[str, Any], body: SetLabel | SetDefault) -> Response:
    with ctx().session() as s:
        model = _model(s, name)
        before, moved = repo.set_label(
            s,
            model,
            label,
            body.version,
            by=_by(),
            why=body.why,
            expected=_expected(raw, body),
        )
        return jsonify(
            {
                "model": model.name,
                "label": label,
                "version": body.version,
                "from_version": before,
                "moved": moved,
            }
        )


@bp.put("/v1/models/<name>/labels/<label>")
def put_label(name: str, label: str) -> Response:
    raw = json_body()
    body = SetLabel.model_validate(raw)
    return _set_label(name, _label_name_for_write(label), raw, body)


@bp.post("/v1/models/<name>/default")
def set_default(name: str) -> Response:
    raw = json_body()
    body = SetDefault.model_validate(raw)
    return _set_label(name, repo.DEFAULT_LABEL, raw, body)


@bp.post("/v1/models/<name>/labels/<label>:rollback")
def rollback_label(name: str, label: str) -> Response:
    # the body is optional ({"why"}): a bodiless POST, like cancel's, is a plain rollback
    raw = json_body() if request.content_length or request.is_json else {}
    body = Rollback.model_validate(raw)
    with ctx().session() as s:
        model = _model(s, name)
        before, back = repo.rollback(s, model, _label_name(model, label), by=_by(), why=body.why)
        return jsonify(
            {
                "model": model.name,
                "label": label,
                "version": back,
                "from_version": before or None,
                "moved": True,
            }
        )


@bp.delete("/v1/models/<name>/labels/<label>")
def delete_label(name: str, label: str) -> Response:
    why = request.args.get("why", "")
    if len(why) > repo.MAX_WHY:
        raise InvalidRequest(
            f"why is longer than {repo.MAX_WHY} characters", details={"parameter": "why"}
        )
    with ctx().session() as s:
        model = _model(s, name)
        before = repo.remove_label(s, model, _label_name(model, label), by=_by(), why=why)
        return jsonify(
            {"model": model.name, "label": label, "version": None, "from_version": before}
        )


@bp.get("/v1/models/<name>/history")
def history(name: str) -> Response:
    label = request.args.get("label") or None
    at_raw = request.args.get("at")
    at = _parse_at(at_raw) if at_raw is not None else None
    with ctx().session() as s:
        model = _model(s, name)
        if label is not None and not repo.NAME_RE.match(label):
            raise InvalidRequest(
                f"label must match {_NAME}", details={"parameter": "label", "value": label[:64]}
            )
        if at is not None:
            return jsonify(
                {"model": model.name, "at": iso(at), "labels": repo.labels_at(s, model, at, label)}
            )
        rows = repo.history(s, model, label)
        return jsonify({"model": model.name, "history": [repo.serialize_history(r) for r in rows]})


def _parse_at(raw: str) -> datetime:
    try:
        at = datetime.fromisoformat(raw.strip())
    except ValueError as e:
        raise InvalidRequest(
            "at must be an ISO 8601 time, e.g. 2026-12-04T16:00:00Z",
            details={"parameter": "at", "value": raw[:64]},
        ) from e
    if at.tzinfo is None:
        at = at.replace(tzinfo=UTC)
    try:
        return at.astimezone(UTC)
    except OverflowError as e:
        raise InvalidRequest(
            "at is out of range", details={"parameter": "at", "value": raw[:64]}
        ) from e


__all__ = ["bp"]
