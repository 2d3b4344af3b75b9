"""/v1/models/{name}/endpoints: deploy a model version on replicas, read, scale, switch, delete.

The API records what is wanted and hands the endpoint to the workers (`stackml.converge_endpoint`,
workers/steps/serve.py), which boot, provision, health-check and delete its replicas; every
answer is 202 with the endpoint as it is now.

With Keystone auth and `tenancy: project` (service/trusts.py) creating an endpoint creates a
Keystone trust with the caller's token, as submitting a job does: the workers boot its replicas
in the caller's project through it and read the model through it; it is deleted once the
endpoint is DELETED. A create that is refused after the trust was made deletes it again."""

from __future__ import annotations

import logging
from typing import Any

from flask import Blueprint, Response, jsonify, url_for
from pydantic import BaseModel, ConfigDict, Field, model_validator
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from service import queue, trusts
from service.api import Context, ctx, json_body
from service.api.auth import (
    current,
    current_project,
    delegate_trust,
    drop_trust_quietly,
    job_scope,
)
from service.api.errors import field_error, fields_failed
from service.backends import registry
from service.db import endpoints as repo
from service.db import quotas
from service.db.models import Endpoint, Model
from service.domain import endpoints as dom
from service.domain.errors import BackendError, Conflict, NotFound, ServiceUnavailable
from service.domain.quota import Demand

bp = Blueprint("endpoints", __name__)
log = logging.getLogger("stackml.api.endpoints")

READY_VERSION = "READY"


class EndpointExists(Conflict):
    code = "endpoint_exists"


class EndpointDeleting(Conflict):
    code = "endpoint_deleting"


class VersionNotReady(Conflict):
    code = "version_not_ready"


class EndpointQuotaExceeded(Conflict):
    code = "quota_exceeded"


_NAME = r"^[a-z][a-z0-9_-]{0,62}$"


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")

    replicas: int | None = Field(default=None, ge=1, le=dom.MAX_REPLICAS)
    label: str | None = Field(default=None, pattern=_NAME, description="Follow this label.")
    version: int | None = Field(default=None, ge=1, le=2**31 - 1, description="Pin a version.")
    traffic: dict[str, int] | None = Field(
        default=None,
        description='Optional split, version -> percent summing to 100, e.g. {"3": 90, "4": 10}.',
    )
    log_sample_rate: float | None = Field(default=None, ge=0.0, le=1.0)

    @model_validator(mode="after")
    def _one_target(self) -> _Body:
        if self.label is not None and self.version is not None:
            raise ValueError("give either label or version, not both")
        problem = dom.traffic_problem(self.traffic)
        if problem:
            raise ValueError(problem)
        return self


class EndpointCreate(_Body):
    """POST /v1/models/{name}/endpoints (default: follow the `default` label, 1 replica)."""

    flavor: str | None = Field(default=None, max_length=64)
    name: str = Field(default="default", pattern=_NAME)


class EndpointUpdate(_Body):
    """PATCH /v1/models/{name}/endpoints/{id}: any of replicas, label|version, traffic,
    log_sample_rate."""


class Deploy(BaseModel):
    """POST /v1/models/{name}/versions/{v}/deploy."""

    model_config = ConfigDict(extra="forbid")

    replicas: int | None = Field(default=None, ge=1, le=dom.MAX_REPLICAS)
    flavor: str | None = Field(default=None, max_length=64)


# -- helpers ------------------------------------------------------------------------------


def _model(s: Session, name: str) -> Model:
    if not dom.NAME_RE.match(name):
        raise NotFound(f"no model {name[:64]!r} in this project", details={"model": name[:64]})
    return repo.find_model(s, job_scope(), name)


def _endpoint(s: Session, model: Model, endpoint_id: str) -> Endpoint:
    if not dom.ENDPOINT_ID_RE.match(endpoint_id):
        raise NotFound(f"no endpoint {endpoint_id[:64]}", details={"endpoint_id": endpoint_id[:64]})
    return repo.get_endpoint(s, endpoint_id, model.id)


def _check_target(
    s: Session, model: Model, label: str | None, version: int | None, traffic: dict[str, int] | None
) -> None:
    """The target must exist and be READY (a label: the version it points at); so must every
    version of a split."""
    problems = []
    if label is not None:
        v = repo.label_version(s, model.id, label)
        if v is None:
            problems.append(field_error("label", f"model {model.name} has no label {label!r}"))
        else:
            _ready(s, model, v, "label")
    if version is not None:
        _ready(s, model, version, "version")
    for k in traffic or {}:
        _ready(s, model, int(k), f"traffic.{k}")
    if problems:
        raise fields_failed(problems)


def _ready(s: Session, model: Model, version: int, field: str) -> None:
    row = repo.version_row(s, model.id, version)
    if row is None:
        raise fields_failed([field_error(field, f"model {model.name} has no version {version}")])
    if row.state != READY_VERSION:
        raise VersionNotReady(
            f"version {version} of {model.name} is {row.state}; only a READY version is served",
            details={"field": field, "version": version, "state": row.state},
        )


def _flavor(c: Context, name: str | None) -> tuple[str, int]:
    """The flavor (default: the platform's) and its GPUs; 422 for one the backend lacks."""
    flavor = name or c.settings.default_flavor
    try:
        offered = {f.name: f for f in registry.compute(c.settings).flavors()}
    except BackendError as e:
        raise ServiceUnavailable(f"the compute backend cannot list its flavors: {e}") from e
    if flavor not in offered:
        raise fields_failed(
            [field_error("flavor", f"unknown flavor {flavor!r}; known: {sorted(offered)}")]
        )
    return flavor, offered[flavor].gpus


def _check_quota(
    c: Context, s: Session, project: str, flavor: str, servers: int, exclude: str | None
) -> None:
    """Endpoint replicas count against the project's server and GPU quotas and the platform's
    `max_servers`, as jobs' servers do: what jobs hold plus what every other live endpoint holds
    once converged, plus this one."""
    cfg = c.settings
    table = quotas.flavor_table(cfg)
    gpus_of = {n: f.gpus for n, f in table.items()}
    usage = quotas.in_use(s, table, cfg.default_flavor)
    actual = repo.endpoint_servers(s)
    reserved_all: dict[str, list[tuple[str, int]]] = {}
    for p in set(usage) | set(actual) | {project}:
        reserved_all[p] = repo.reserved_replicas(s, p, exclude=exclude)

    def held(p: str) -> tuple[int, int]:
        u = usage.get(p)
        servers_ = (u.servers if u else 0) - len(actual.get(p, []))
        gpus_ = (u.gpus if u else 0) - sum(gpus_of.get(f, 0) for f in actual.get(p, []))
        for f, n in reserved_all.get(p, []):
            servers_ += n
            gpus_ += n * gpus_of.get(f, 0)
        return servers_, gpus_

    need = Demand(servers=servers, gpus=servers * gpus_of.get(flavor, 0))
    limits = quotas.limits_for(s, cfg, project)
    used_servers, used_gpus = held(project)
    why = None
    if used_servers + need.servers > limits.servers:
        why = (
            f"project {project} holds {used_servers} of {limits.servers} servers; "
            f"the endpoint needs {need.servers}"
        )
    elif need.gpus and used_gpus + need.gpus > limits.gpus:
        why = (
            f"project {project} holds {used_gpus} of {limits.gpus} GPUs; "
            f"the endpoint needs {need.gpus}"
        )
    elif cfg.max_servers:
        total = sum(held(p)[0] for p in reserved_all)
        if total + need.servers > cfg.max_servers:
            why = (
                f"the platform runs {total} of its {cfg.max_servers} servers; "
                f"the endpoint needs {need.servers}"
            )
    if why is not None:
        raise EndpointQuotaExceeded(
            why, details={"servers": need.servers, "gpus": need.gpus, "flavor": flavor}
        )


def _body(s: Session, ep: Endpoint, model: Model) -> dict[str, Any]:
    return repo.serialize(s, ep, model.name)


def _accepted(
    body: dict[str, Any], model: str, endpoint_id: str
) -> tuple[Response, int, dict[str, str]]:
    ctx().enqueue_quietly(queue.CONVERGE_ENDPOINT, endpoint_id)
    where = url_for("endpoints.get", name=model, endpoint_id=endpoint_id)
    return jsonify(body), 202, {"Location": where}


def _create(
    c: Context, model_name: str, spec: EndpointCreate
) -> tuple[Response, int, dict[str, str]]:
    project = current_project()
    flavor, _gpus = _flavor(c, spec.flavor)
    replicas = spec.replicas or 1
    label = spec.label if spec.version is not None or spec.label is not None else "default"
    if spec.version is not None:
        label = None
    if replicas > c.settings.serving_max_replicas:
        raise fields_failed(
            [field_error("replicas", f"at most {c.settings.serving_max_replicas} replicas")]
        )
    servers = repo.servers_for(replicas, spec.traffic)
    trust_id = None
    if trusts.enabled(c.settings):
        # what can be refused is refused before Keystone is asked for a trust (checked again
        # under the quota lock below: another request may have changed things meanwhile)
        with c.session() as s:
            _admissible(c, s, project, model_name, label, spec, flavor, servers)
        trust_id = delegate_trust(c.settings, project)
    try:
        with c.session() as s:
            model = _admissible(c, s, project, model_name, label, spec, flavor, servers, lock=True)
            ep = Endpoint(
                id=repo.new_endpoint_id(),
                project_id=project,
                model_id=model.id,
                name=spec.name,
                state=dom.EndpointState.CREATING.value,
                target_label=label,
                target_version=spec.version,
                traffic=spec.traffic,
                replicas=replicas,
                flavor=flavor,
                log_sample_rate=spec.log_sample_rate or 0.0,
                created_by=current().user_id or "anonymous",
                trust_id=trust_id,
            )
            s.add(ep)
            s.flush()
            body = _body(s, ep, model)
    except BaseException as e:
        if trust_id is not None:
            # no endpoint row holds it: it must not outlive this request
            drop_trust_quietly(c.settings, trust_id, "an endpoint create")
        if isinstance(e, IntegrityError):  # another request created one first (the live index)
            raise EndpointExists(f"model {model_name} already has an endpoint") from e
        raise
    return _accepted(body, model_name, body["id"])


def _admissible(
    c: Context,
    s: Session,
    project: str,
    model_name: str,
    label: str | None,
    spec: EndpointCreate,
    flavor: str,
    servers: int,
    lock: bool = False,
) -> Model:
    """The model, once the endpoint may be created: the caller's project's model, no live
    endpoint yet, a READY target, room in the quotas (`lock`: under the quota lock, held for the
    rest of the transaction)."""
    model = _model(s, model_name)
    if model.project_id != project:
        raise NotFound(f"no model {model_name!r} in this project")
    existing = repo.live_endpoint(s, model.id)
    if existing is not None:
        raise EndpointExists(
            f"model {model_name} already has endpoint {existing.id}; PATCH it instead",
            details={"endpoint_id": existing.id},
        )
    _check_target(s, model, label, spec.version, spec.traffic)
    if lock:
        quotas.lock(s)  # quota checks of endpoints and admissions of jobs, one at a time
    _check_quota(c, s, project, flavor, servers, exclude=None)
    return model


def _update(
    c: Context, model_name: str, endpoint_id: str, spec: EndpointUpdate
) -> tuple[Response, int, dict[str, str]]:
    if spec.replicas is not None and spec.replicas > c.settings.serving_max_replicas:
        raise fields_failed(
            [field_error("replicas", f"at most {c.settings.serving_max_replicas} replicas")]
        )
    with c.session() as s:
        model = _model(s, model_name)
        ep = _endpoint(s, model, endpoint_id)
        if ep.state in (dom.EndpointState.DELETING.value, dom.EndpointState.DELETED.value):
            raise EndpointDeleting(
                f"endpoint {ep.id} is {ep.state}", details={"endpoint_id": ep.id, "state": ep.state}
            )
        fields = spec.model_fields_set
        values: dict[str, Any] = {}
        if "label" in fields and spec.label is not None:
            values.update(target_label=spec.label, target_version=None)
        if "version" in fields and spec.version is not None:
            values.update(target_label=None, target_version=spec.version)
        if "traffic" in fields:
            values["traffic"] = spec.traffic
        if spec.replicas is not None:
            values["replicas"] = spec.replicas
        if spec.log_sample_rate is not None:
            values["log_sample_rate"] = spec.log_sample_rate
        _check_target(
            s, model, values.get("target_label"), values.get("target_version"), spec.traffic
        )
        replicas = values.get("replicas", ep.replicas)
        traffic = values.get("traffic", ep.traffic)
        if "replicas" in values or "traffic" in values:
            quotas.lock(s)
            _check_quota(c, s, ep.project_id, ep.flavor, repo.servers_for(replicas, traffic), ep.id)
        for k, v in values.items():
            setattr(ep, k, v)
        if values and ep.state != dom.EndpointState.CREATING.value:
            ep.state = dom.EndpointState.UPDATING.value
            ep.failure_message = None
        s.flush()
        body = _body(s, ep, model)
    return _accepted(body, model_name, endpoint_id)


# -- routes -------------------------------------------------------------------------------


@bp.post("/v1/models/<name>/endpoints")
def create(name: str) -> tuple[Response, int, dict[str, str]]:
    c = ctx()
    spec = EndpointCreate.model_validate(json_body())
    return _create(c, name, spec)


@bp.get("/v1/models/<name>/endpoints")
def list_(name: str) -> Response:
    c = ctx()
    with c.session() as s:
        model = _model(s, name)
        body = {"endpoints": [_body(s, ep, model) for ep in repo.list_endpoints(s, model.id)]}
    return jsonify(body)


@bp.get("/v1/models/<name>/endpoints/<endpoint_id>")
def get(name: str, endpoint_id: str) -> Response:
    c = ctx()
    with c.session() as s:
        model = _model(s, name)
        body = _body(s, _endpoint(s, model, endpoint_id), model)
    return jsonify(body)


@bp.patch("/v1/models/<name>/endpoints/<endpoint_id>")
def patch(name: str, endpoint_id: str) -> tuple[Response, int, dict[str, str]]:
    c = ctx()
    spec = EndpointUpdate.model_validate(json_body())
    return _update(c, name, endpoint_id, spec)


@bp.delete("/v1/models/<name>/endpoints/<endpoint_id>")
def delete(name: str, endpoint_id: str) -> tuple[Response, int, dict[str, str]]:
    c = ctx()
    with c.session() as s:
        model = _model(s, name)
        ep = _endpoint(s, model, endpoint_id)
        if ep.state not in (dom.EndpointState.DELETING.value, dom.EndpointState.DELETED.value):
            ep.state = dom.EndpointState.DELETING.value
            ep.updated_at = ep.last_progress_at = _now()
        s.flush()
        body = _body(s, ep, model)
    return _accepted(body, name, endpoint_id)


@bp.post("/v1/models/<name>/versions/<int:version>/deploy")
def deploy(name: str, version: int) -> tuple[Response, int, dict[str, str]]:
    """DESIGN's alias: an endpoint pinned to `version`, or a PATCH of the live one."""
    c = ctx()
    spec = Deploy.model_validate(json_body())
    if version > 2**31 - 1:
        raise NotFound(f"no version {version} of {name[:64]}")
    with c.session() as s:
        model = _model(s, name)
        live = repo.live_endpoint(s, model.id)
        live_id = live.id if live is not None else None
    if live_id is not None:
        return _update(
            c,
            name,
            live_id,
            EndpointUpdate.model_validate(
                {"version": version, **({"replicas": spec.replicas} if spec.replicas else {})}
            ),
        )
    return _create(
        c,
        name,
        EndpointCreate(version=version, replicas=spec.replicas, flavor=spec.flavor),
    )


def _now() -> Any:
    from service.db.models import utcnow

    return utcnow()
