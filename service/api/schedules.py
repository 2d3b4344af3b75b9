"""/v1/schedules: cron schedules that submit a job template at each slot.

Roles as for jobs (service/api/auth.py's rule by method): readers read, members create, pause,
resume and delete. A schedule is found by id or by name in the caller's project only (an
admin with cross-project reach finds any by id): another project's schedule is a 404.
Pause and resume are PATCH {"paused": true|false}, as endpoints are changed with PATCH.
The firing is the workers' (workers/steps/schedules.py); the slot logic is
service/domain/schedules.py.
"""

from __future__ import annotations

from typing import Any

from flask import Blueprint, Response, jsonify, request, url_for
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    StrictStr,
    field_validator,
)

from service import trusts
from service.api import ctx, json_body
from service.api.auth import all_projects_arg, current, current_project, job_scope, list_scope
from service.api.errors import field_error, fields_failed
from service.db import datasets as datasets_repo
from service.db import schedules as repo
from service.db.models import Schedule, utcnow
from service.domain import schedules as dom
from service.domain.errors import InvalidRequest, NotFound, StackMLError, ValidationFailed
from service.domain.spec import JobSpec, Name, stored

bp = Blueprint("schedules", __name__)


class NotAvailable(ValidationFailed):
    """What the request asks for is not available in this deployment."""

    code = "not_implemented"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class CreateSchedule(_Strict):
    name: Name
    cron: StrictStr = Field(description="5-field cron expression, or @hourly, @daily, ...")
    timezone: StrictStr = Field(default="UTC", description="An IANA time zone name.")
    job: JobSpec
    concurrency: dom.Concurrency = dom.Concurrency.FORBID
    catchup: dom.Catchup = dom.Catchup.NONE
    max_catchup: StrictInt = Field(default=dom.DEFAULT_MAX_CATCHUP, ge=1, le=dom.MAX_CATCHUP)
    paused: StrictBool = False
    dataset: Name | None = Field(
        default=None,
        description="A dataset of the project (POST /v1/datasets) to rebuild before each "
        "slot's job: the slot is `building` until the new version is READY, then the job "
        "trains on it (its inputs.data_uri is the version's train/ prefix; a gate that names "
        "no holdout_uri is scored on the version's holdout/). A training template only, "
        "without inputs.data_uri.",
    )

    @field_validator("cron")
    @classmethod
    def _cron(cls, v: str) -> str:
        return dom.normalise_cron(v)

    @field_validator("timezone")
    @classmethod
    def _timezone(cls, v: str) -> str:
        dom.zone(v)
        return v


class UpdateSchedule(_Strict):
    paused: StrictBool


def _by() -> str:
    return current().user_id or current_project()


def _prefixed(e: StackMLError, prefix: str) -> StackMLError:
    """The same error with its field names under `prefix` (job.runtime, job.resources...)."""
    fields = e.details.get("fields")
    if isinstance(fields, list):
        e.details["fields"] = [
            {**f, "field": f"{prefix}.{f.get('field', '')}"} if isinstance(f, dict) else f
            for f in fields
        ]
        e.message = e.message.replace("invalid request: ", f"invalid request: {prefix}.", 1)
    elif isinstance(e.details.get("field"), str):
        e.details["field"] = f"{prefix}.{e.details['field']}"
    return e


def _checked_job(
    spec: JobSpec, project: str, schedule_id_hint: str, *, dataset: str | None = None
) -> dict[str, Any]:
    """The job template as it will be stored: checked the way POST /v1/jobs checks a spec
    (the schema, what is not built yet, runtimes, flavors, quotas, the store), with the
    resource defaults made explicit. Its output goes to each job's own models/<job id>/: a
    template naming output.model_uri would collide with itself at the second slot."""
    from service.api import jobs as jobs_api

    if spec.batch:
        raise jobs_api.NotImplementedYet(
            "not available yet: job.type batch_prediction in a schedule",
            details={
                "fields": [
                    field_error(
                        "job.type",
                        "a schedule cannot fire batch prediction jobs yet (each run would need "
                        "its own output prefix and its own label resolution)",
                    )
                ]
            },
        )
    if spec.output.model_uri is not None:
        raise fields_failed(
            [
                field_error(
                    "job.output.model_uri",
                    "a schedule submits a job at every slot and each writes to its own "
                    "models/<job id>/ prefix: leave output.model_uri out",
                )
            ]
        )
    try:
        jobs_api._refuse_unbuilt(spec)
        resolved = jobs_api._resolve(spec, project, ctx(), holdout_later=dataset is not None)
    except StackMLError as e:
        raise _prefixed(e, "job") from e
    data = stored(resolved)
    # the labels a fired job gets must fit too (at most 64 labels)
    try:
        JobSpec.model_validate(dom.fired_spec(data, schedule_id_hint, utcnow()))
    except ValueError as e:
        raise fields_failed(
            [
                field_error(
                    "job.labels",
                    f"a fired job also gets the labels {dom.SCHEDULE_LABEL} and "
                    f"{dom.SLOT_LABEL}; they do not fit: {e}",
                )
            ]
        ) from e
    return data


def _check_dataset(body: CreateSchedule, project: str) -> None:
    """A schedule that rebuilds `body.dataset` first: a training template that leaves its
    data to the dataset, and a dataset of the project with a version to rebuild from."""
    errors = []
    if body.job.type != "training":
        errors.append(
            field_error("dataset", "only a training template can rebuild a dataset first")
        )
    if body.job.inputs.data_uri is not None:
        errors.append(
            field_error(
                "job.inputs.data_uri",
                "each slot's job trains on the dataset's new version: leave inputs.data_uri out",
            )
        )
    with ctx().session() as s:
        try:
            ds = datasets_repo.find(s, project, body.dataset or "")
            has_version = datasets_repo.latest(s, ds) is not None
        except NotFound:
            has_version = False
    if not has_version:
        errors.append(
            field_error(
                "dataset",
                f"no dataset {body.dataset!r} with a version in this project; build one first "
                "(POST /v1/datasets): a rebuild repeats its latest version's model and split",
            )
        )
    if errors:
        raise fields_failed(errors)


@bp.post("/v1/schedules")
def create() -> tuple[Response, int, dict[str, str]]:
    c = ctx()
    if trusts.enabled(c.settings):
        raise NotAvailable(
            "schedules are not available with keystone auth and per-project tenancy: a slot "
            "fires without a user token, and each job needs a Keystone trust made from one",
            details={"auth": c.settings.auth, "tenancy": c.settings.tenancy},
        )
    body = CreateSchedule.model_validate(json_body())
    project = current_project()
    if body.dataset is not None:
        _check_dataset(body, project)
    job = _checked_job(body.job, project, repo.new_schedule_id(), dataset=body.dataset)
    with c.session() as s:
        sch = repo.create_schedule(
            s,
            project,
            name=body.name,
            cron=body.cron,
            timezone=body.timezone,
            job=job,
            concurrency=body.concurrency,
            catchup=body.catchup,
            max_catchup=body.max_catchup,
            paused=body.paused,
            by=_by(),
            dataset=body.dataset,
        )
        out = repo.serialize(s, sch, detail=True)
    return jsonify(out), 201, {"Location": url_for("schedules.get", ref=sch.id)}


@bp.get("/v1/schedules")
def list_() -> Response:
    project = list_scope(all_projects_arg())
    with ctx().session() as s:
        rows = repo.list_schedules(s, project)
        return jsonify({"schedules": [repo.serialize(s, r) for r in rows]})


def _find(s: Any, ref: str, *, lock: bool = False) -> Schedule:
    scope = job_scope()
    if scope is None:  # an admin reaching every project: by id anywhere, else by name in own
        try:
            return repo.find(s, None, ref, lock=lock)
        except StackMLError:
            return repo.find(s, current_project(), ref, lock=lock)
    return repo.find(s, scope, ref, lock=lock)


@bp.get("/v1/schedules/<ref>")
def get(ref: str) -> Response:
    with ctx().session() as s:
        return jsonify(repo.serialize(s, _find(s, ref), detail=True))


@bp.patch("/v1/schedules/<ref>")
def update(ref: str) -> Response:
    body = UpdateSchedule.model_validate(json_body())
    with ctx().session() as s:
        sch = _find(s, ref, lock=True)
        repo.set_paused(s, sch, body.paused)
        return jsonify(repo.serialize(s, sch, detail=True))


@bp.delete("/v1/schedules/<ref>")
def delete(ref: str) -> tuple[str, int]:
    with ctx().session() as s:
        repo.delete_schedule(s, _find(s, ref, lock=True))
    return "", 204


@bp.get("/v1/schedules/<ref>/runs")
def runs(ref: str) -> Response:
    raw = request.args.get("limit") or "50"
    try:
        limit = int(raw)
    except ValueError as e:
        raise InvalidRequest("limit must be an integer", details={"parameter": "limit"}) from e
    if not 1 <= limit <= repo.MAX_RUNS_LIMIT:
        raise InvalidRequest(
            f"limit must be between 1 and {repo.MAX_RUNS_LIMIT}", details={"parameter": "limit"}
        )
    with ctx().session() as s:
        sch = _find(s, ref)
        rows = repo.runs(s, sch.id, limit)
        return jsonify({"runs": [repo.serialize_run(r) for r in rows]})
