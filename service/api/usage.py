"""/v1/usage: VM-seconds, GPU-hours and cost of a project's servers in a time window, in total,
per project and per job; admins may ask for any project or all of them."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from flask import Blueprint, Response, jsonify, request

from service.api import bool_arg, ctx
from service.api.quotas import caller_project, is_admin, readable_project
from service.db import quotas as repo
from service.db.models import iso, utcnow
from service.domain.errors import Forbidden, InvalidRequest
from service.quota_policy import Metered

bp = Blueprint("usage", __name__)

DEFAULT_WINDOW = timedelta(days=30)


@bp.get("/v1/usage")
def get() -> Response:
    c = ctx()
    now = utcnow()
    until = _time_arg("until") or now
    since = _time_arg("since") or until - DEFAULT_WINDOW
    if since >= until:
        raise InvalidRequest(
            "since must be before until",
            details={"since": iso(since), "until": iso(until)},
        )
    project: str | None
    if bool_arg("all_projects"):
        caller_project()
        if not is_admin():
            raise Forbidden(
                "all_projects=true needs the admin role", details={"parameter": "all_projects"}
            )
        if request.args.get("project"):
            raise InvalidRequest(
                "give either project or all_projects=true", details={"parameter": "project"}
            )
        project = None
    else:
        project = readable_project(request.args.get("project") or None)
    with c.session() as s:
        table = repo.flavor_table(c.settings)
        rows = repo.usage_report(s, table, since, until, project, now)
        served = repo.endpoint_usage_report(s, table, since, until, project, now)
    totals = Metered()
    per_project: dict[str, tuple[Metered, int]] = {}
    for r in rows:
        # add what each row shows, so that totals are the sum of the rows to the last digit
        shown = r.metered.rounded()
        totals = totals + shown
        m, n = per_project.get(r.project_id, (Metered(), 0))
        per_project[r.project_id] = (m + shown, n + 1)
    for r in served:  # endpoints' replica servers (online prediction) cost like jobs' servers
        shown = r.metered.rounded()
        totals = totals + shown
        m, n = per_project.get(r.project_id, (Metered(), 0))
        per_project[r.project_id] = (m + shown, n)
    return jsonify(
        {
            "project_id": project,
            "since": iso(since),
            "until": iso(until),
            "totals": {**totals.as_dict(), "jobs": len(rows)},
            "projects": [
                {"project_id": p, **m.as_dict(), "jobs": n}
                for p, (m, n) in sorted(per_project.items())
            ],
            "jobs": [_row(r) for r in rows],
            "endpoints": [_row(r) for r in served],
        }
    )


def _row(r: repo.UsageRow) -> dict[str, Any]:
    return {
        "id": r.job_id,
        "name": r.name,
        "project_id": r.project_id,
        "state": r.state,
        **r.metered.as_dict(),
    }


def _time_arg(name: str) -> datetime | None:
    raw = request.args.get(name)
    if raw is None or raw == "":
        return None
    try:
        value = datetime.fromisoformat(raw.strip())
    except ValueError as e:
        raise InvalidRequest(
            f"{name} must be an ISO 8601 time, e.g. 2026-11-01T00:00:00Z",
            details={"parameter": name, "value": raw[:64]},
        ) from e
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)
