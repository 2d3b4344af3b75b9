"""/v1/datasets: training datasets built from a model's logged predictions joined with their
feedback (the closed loop).

Roles as for the other writes (readers read, members build). A dataset is found by name in
the caller's project only: another project's dataset (or model) is a 404. POST builds a new
version of the named dataset (made on its first build); the build is the workers'
(`stackml.build_dataset`, workers/steps/datasets.py), and the version is BUILDING until it is
READY or FAILED.
"""

from __future__ import annotations

from typing import Literal

from flask import Blueprint, Response, jsonify, url_for
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictFloat,
    StrictStr,
    field_validator,
)

from service import queue, trusts
from service.api import ctx, json_body
from service.api.auth import current, current_project
from service.api.errors import field_error, fields_failed
from service.api.feedback import parse_time
from service.api.schedules import NotAvailable
from service.db import datasets as repo
from service.domain.errors import NotFound
from service.domain.spec import ModelName

bp = Blueprint("datasets", __name__)

MAX_VERSION = 2**31 - 1


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Window(_Strict):
    start: StrictStr | None = Field(default=None, description="ISO 8601; default: the beginning.")
    end: StrictStr | None = Field(default=None, description="ISO 8601; default: the build's time.")

    @field_validator("start", "end")
    @classmethod
    def _time(cls, v: str | None) -> str | None:
        if v is not None:
            parse_time(v)
        return v


class CreateDataset(_Strict):
    name: ModelName = Field(description="The dataset's name (lower-case letters, digits, _ -).")
    model: ModelName = Field(description="The model whose logged predictions it joins.")
    window: Window | None = Field(
        default=None, description="Which predictions, by their time (default: all until now)."
    )
    holdout_fraction: StrictFloat = Field(
        default=repo.DEFAULT_HOLDOUT,
        ge=0,
        le=0.9,
        description="The share of requests held out (fixed by a hash of the request id).",
    )
    format: Literal["csv", "jsonl"] = Field(
        default="csv",
        description="csv: the feature columns then the label, one row per instance; jsonl: "
        "one object per instance with the request id, version, time, instance, prediction "
        "and label.",
    )


def _by() -> str:
    return current().user_id or current_project()


@bp.post("/v1/datasets")
def create_dataset() -> tuple[Response, int, dict[str, str]]:
    body = CreateDataset.model_validate(json_body())
    c = ctx()
    if trusts.enabled(c.settings):
        raise NotAvailable(
            "datasets are not available with keystone auth and per-project tenancy yet: a "
            "build has no Keystone trust to write the project's store through",
            details={"fields": [{"field": "name", "message": "not available in this mode"}]},
        )
    start = end = None
    if body.window is not None:
        start = parse_time(body.window.start) if body.window.start else None
        end = parse_time(body.window.end) if body.window.end else None
        if start is not None and end is not None and start >= end:
            raise fields_failed([field_error("window", "start must be before end")])
    project = current_project()
    spec = repo.BuildSpec(
        model=body.model,
        start=start,
        end=end,
        holdout_fraction=float(body.holdout_fraction),
        format=body.format,
    )
    with c.session() as s:
        dv = repo.start_build(s, project, body.name, spec, store=c.store_for(project), by=_by())
        ds = repo.find(s, project, body.name)
        out = repo.serialize_version(ds, dv)
        vid = dv.id
    c.enqueue_quietly(queue.BUILD_DATASET, str(vid))
    where = url_for("datasets.get_version", name=body.name, version=out["version"])
    return jsonify(out), 202, {"Location": where}


@bp.get("/v1/datasets")
def list_datasets() -> Response:
    with ctx().session() as s:
        rows = repo.list_datasets(s, current_project())
        return jsonify({"datasets": [repo.serialize(s, d) for d in rows]})


@bp.get("/v1/datasets/<name>")
def get_dataset(name: str) -> Response:
    with ctx().session() as s:
        return jsonify(repo.serialize(s, repo.find(s, current_project(), name), detail=True))


@bp.get("/v1/datasets/<name>/versions/<int:version>")
def get_version(name: str, version: int) -> Response:
    with ctx().session() as s:
        ds = repo.find(s, current_project(), name)
        if not 1 <= version <= MAX_VERSION:
            raise NotFound(
                f"dataset {name!r} has no version {version}",
                details={"dataset": name, "version": version},
            )
        return jsonify(repo.serialize_version(ds, repo.get_version(s, ds, version)))


__all__ = ["CreateDataset", "Window", "bp"]
