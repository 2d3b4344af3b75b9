"""The dashboard's API layer: stackml's REST client, authenticated as the logged-in user.

Every call takes the Django request: the endpoint is the catalog's `machine-learning` service
(the region and interface Horizon uses for every service), the token the user's own Keystone
token, so the API scopes everything to the user's project. The views call only these
functions (the unit tests mock them).
"""

from __future__ import annotations

import sys
from typing import Any, BinaryIO

from horizon import exceptions
from openstack_dashboard.api import base

from service.client import APIError, ClientError, StackMLClient, describe_error

SERVICE_TYPE = "machine-learning"
TIMEOUT = 30.0
Json = dict[str, Any]

__all__ = ["APIError", "ClientError", "describe_error"]


def client(request: Any) -> StackMLClient:
    """A client of the project's stackml API, as the user (their Keystone token)."""
    url = base.url_for(request, SERVICE_TYPE)
    return StackMLClient(url, token=request.user.token.id, timeout=TIMEOUT)


def message(err: BaseException) -> str:
    """The API's sentence (with its code and request id) for a Horizon message."""
    return describe_error(err)


def handle(request: Any, what: str, **kwargs: Any) -> Any:
    """`horizon.exceptions.handle` of the error being handled, the API's sentence in the
    message itself ("<what>: <sentence> [code, HTTP status, request id]") rather than behind
    Horizon's "Details" toggle."""
    err = sys.exc_info()[1]
    text = f"{what}: {message(err)}" if err is not None else what
    return exceptions.handle(request, text, details="", **kwargs)


# -- jobs -------------------------------------------------------------------------------------


def job_list(
    request: Any, state: str | None = None, limit: int = 50, marker: str | None = None
) -> tuple[list[Json], str | None]:
    """One page of the project's jobs, newest first, and the marker of the next page."""
    with client(request) as c:
        page = c.list_jobs(state=state or None, limit=limit, marker=marker)
    return list(page.get("jobs") or []), page.get("next")


def job_get(request: Any, job_id: str) -> Json:
    with client(request) as c:
        return c.get_job(job_id)


def job_events(request: Any, job_id: str) -> list[Json]:
    with client(request) as c:
        return list(c.events(job_id).get("events") or [])


def job_metrics(request: Any, job_id: str) -> dict[str, list[Json]]:
    with client(request) as c:
        return dict(c.metrics(job_id).get("metrics") or {})


def job_logs(request: Any, job_id: str, offset: int = 0) -> tuple[bytes, int]:
    with client(request) as c:
        return c.logs(job_id, offset)


def job_cancel(request: Any, job_id: str) -> Json:
    with client(request) as c:
        return c.cancel_job(job_id)


def job_delete(request: Any, job_id: str) -> None:
    with client(request) as c:
        c.delete_job(job_id)


def job_create(request: Any, spec: Json) -> Json:
    with client(request) as c:
        return c.create_job(spec)


def package_upload(request: Any, fh: BinaryIO, filename: str) -> Json:
    """Stage a trainer package (.tar.gz) in the project's staging area."""
    with client(request) as c:
        return c.upload_package_file(fh, filename)


# -- quotas and usage -------------------------------------------------------------------------


def quotas(request: Any) -> Json:
    with client(request) as c:
        return c.get_quotas()


def usage(
    request: Any, since: str | None = None, until: str | None = None, all_projects: bool = False
) -> Json:
    """The window's metered usage: the caller's project, or (an admin) every project's."""
    with client(request) as c:
        return c.usage(since=since, until=until, all_projects=all_projects)


# -- schedules --------------------------------------------------------------------------------


def schedule_list(request: Any) -> list[Json]:
    with client(request) as c:
        return c.list_schedules()


def schedule_get(request: Any, ref: str) -> Json:
    with client(request) as c:
        return c.get_schedule(ref)


def schedule_runs(request: Any, ref: str) -> list[Json]:
    with client(request) as c:
        return c.schedule_runs(ref)


def schedule_create(request: Any, name: str, cron: str, job: Json, **kw: Any) -> Json:
    with client(request) as c:
        return c.create_schedule(name, cron, job, **kw)


def schedule_pause(request: Any, ref: str, paused: bool) -> Json:
    with client(request) as c:
        return c.pause_schedule(ref) if paused else c.resume_schedule(ref)


def schedule_delete(request: Any, ref: str) -> None:
    with client(request) as c:
        c.delete_schedule(ref)


# -- models -----------------------------------------------------------------------------------


def model_list(request: Any) -> list[Json]:
    with client(request) as c:
        return c.list_models()


def model_get(request: Any, name: str) -> Json:
    with client(request) as c:
        return c.get_model(name)


def model_create(request: Any, name: str, description: str = "") -> Json:
    with client(request) as c:
        return c.create_model(name, description)


def model_delete(request: Any, name: str) -> None:
    with client(request) as c:
        c.delete_model(name)


def version_list(request: Any, model: str) -> list[Json]:
    with client(request) as c:
        return c.list_versions(model)


def version_create(request: Any, model: str, job_id: str) -> Json:
    with client(request) as c:
        return c.create_version(model, job_id=job_id)


def label_set(request: Any, model: str, label: str, version: int, why: str = "") -> Json:
    with client(request) as c:
        return c.set_label(model, label, version, why=why)


def model_history(request: Any, model: str) -> list[Json]:
    with client(request) as c:
        return list(c.model_history(model).get("history") or [])


def deploy(request: Any, model: str, **fields: Any) -> Json:
    with client(request) as c:
        return c.deploy(model, **fields)


def predict(
    request: Any, model: str, body: Json, version: int | None = None, label: str | None = None
) -> tuple[Json, dict[str, str]]:
    with client(request) as c:
        return c.predict(model, body, version=version, label=label)


# -- endpoints --------------------------------------------------------------------------------


def endpoint_list(request: Any) -> list[Json]:
    """The project's live endpoints, over its models (one call per model that has one)."""
    out: list[Json] = []
    with client(request) as c:
        for m in c.list_models():
            out.extend(c.list_endpoints(str(m["name"])))
    return out


def endpoint_get(request: Any, model: str, endpoint_id: str) -> Json:
    with client(request) as c:
        return c.get_endpoint(model, endpoint_id)


def endpoint_scale(request: Any, model: str, endpoint_id: str, replicas: int) -> Json:
    with client(request) as c:
        return c.scale(model, endpoint_id, replicas)


def endpoint_delete(request: Any, model: str, endpoint_id: str) -> Json:
    with client(request) as c:
        return c.undeploy(model, endpoint_id)
