"""/v1/quotas: a project's limits (concurrent jobs, servers, GPUs) and what it uses; admins set
another project's overrides (PUT) or drop them (DELETE)."""

from __future__ import annotations

from typing import Any

from flask import Blueprint, Response, jsonify, request
from pydantic import BaseModel, ConfigDict, Field, StrictInt
from sqlalchemy import func, select

from service.api import ctx, json_body
from service.db import quotas as repo
from service.db.models import Job
from service.domain.errors import Forbidden, InvalidRequest
from service.domain.states import JobState

bp = Blueprint("quotas", __name__)

MAX_LIMIT = 1_000_000


class QuotaUpdate(BaseModel):
    """PUT /v1/quotas/{project}: the limits to override; null drops an override (back to the
    configured default); a key left out keeps its current value."""

    model_config = ConfigDict(extra="forbid")

    jobs: StrictInt | None = Field(default=None, ge=0, le=MAX_LIMIT)
    servers: StrictInt | None = Field(default=None, ge=0, le=MAX_LIMIT)
    gpus: StrictInt | None = Field(default=None, ge=0, le=MAX_LIMIT)


# -- who may see and change what (the one seam with service/api/auth.py) -----------------


def is_admin() -> bool:
    """Whether the caller holds the admin role. Uses `auth.current()` (a caller with `.roles`)
    where auth provides it; before keystone auth existed, the one noauth user is the operator
    of its laptop, hence admin."""
    from service.api import auth

    current = getattr(auth, "current", None)
    if current is None:
        return ctx().settings.auth == "noauth"
    caller = current() if callable(current) else current
    return "admin" in set(getattr(caller, "roles", ()) or ())


def caller_project() -> str:
    from service.api.auth import current_project

    return current_project()


def check_project(project: str) -> str:
    from service.api.auth import PROJECT_RE

    if not PROJECT_RE.match(project):
        raise InvalidRequest(
            "a project id is 1-64 letters, digits, '_' or '-'",
            details={"parameter": "project"},
        )
    return project


def readable_project(project: str | None) -> str:
    """The project a read is about: the caller's own, or (admin only) the one named. Another
    project answers 403 for every id, existing or not, so nothing about it leaks."""
    own = caller_project()
    if project is None or project == own:
        return own
    check_project(project)
    if not is_admin():
        raise Forbidden(
            "only an admin may look at another project", details={"required_role": "admin"}
        )
    return project


def require_admin(what: str) -> None:
    caller_project()  # authenticated first: 401 before 403
    if not is_admin():
        raise Forbidden(f"{what} needs the admin role", details={"required_role": "admin"})


# -- views --------------------------------------------------------------------------------


@bp.get("/v1/quotas")
def get_own() -> Response:
    project = readable_project(request.args.get("project") or None)
    return jsonify(view(project))


@bp.get("/v1/quotas/<project>")
def get_one(project: str) -> Response:
    return jsonify(view(readable_project(project)))


@bp.put("/v1/quotas/<project>")
def put(project: str) -> Response:
    require_admin("setting a project's quota")
    check_project(project)
    update = QuotaUpdate.model_validate(json_body())
    values = {k: getattr(update, k) for k in update.model_fields_set}
    with ctx().session() as s:
        repo.set_overrides(s, project, values)
    return jsonify(view(project))


@bp.delete("/v1/quotas/<project>")
def delete(project: str) -> tuple[str, int]:
    require_admin("resetting a project's quota")
    check_project(project)
    with ctx().session() as s:
        repo.clear_overrides(s, project)
    return "", 204


def view(project: str) -> dict[str, Any]:
    c = ctx()
    flavors = repo.flavor_table(c.settings)
    with c.session() as s:
        limits = repo.limits_for(s, c.settings, project)
        used = repo.in_use(s, flavors, c.settings.default_flavor, [project])[project]
        queued = s.scalar(
            select(func.count())
            .select_from(Job)
            .where(Job.project_id == project, Job.state == JobState.QUEUED.value)
        )
        overrides = repo.overrides(s, project)
    return {
        "project_id": project,
        "limits": limits.as_dict(),
        "in_use": used.as_dict(),
        "queued": int(queued or 0),
        "defaults": repo.defaults(c.settings).as_dict(),
        "overrides": overrides,
    }
