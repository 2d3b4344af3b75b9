"""Endpoints repository: rows of `endpoints`, their replicas (`resources` rows with
owner_kind 'endpoint', role 'replica'), what the converge plan reads, and what the API shows."""

from __future__ import annotations

import secrets
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from service.db.models import Endpoint, Model, ModelLabel, ModelVersion, Resource, iso, utcnow
from service.domain import endpoints as dom
from service.domain.errors import NotFound
from service.domain.states import OwnerKind, ResourceState

ROLE = "replica"


def new_endpoint_id() -> str:
    return f"ep-{secrets.token_hex(6)}"


def find_model(s: Session, project: str | None, name: str) -> Model:
    q = select(Model).where(Model.name == name)
    if project is not None:
        q = q.where(Model.project_id == project)
    model = s.scalars(q).first()
    if model is None:
        raise NotFound(f"no model {name!r} in this project", details={"model": name})
    return model


def get_endpoint(s: Session, endpoint_id: str, model_id: str | None = None) -> Endpoint:
    ep = s.get(Endpoint, endpoint_id)
    if ep is None or (model_id is not None and ep.model_id != model_id):
        raise NotFound(f"no endpoint {endpoint_id}", details={"endpoint_id": endpoint_id})
    return ep


def live_endpoint(s: Session, model_id: str) -> Endpoint | None:
    return s.scalars(
        select(Endpoint).where(
            Endpoint.model_id == model_id, Endpoint.state != dom.EndpointState.DELETED.value
        )
    ).first()


def list_endpoints(s: Session, model_id: str, include_deleted: bool = False) -> list[Endpoint]:
    q = select(Endpoint).where(Endpoint.model_id == model_id)
    if not include_deleted:
        q = q.where(Endpoint.state != dom.EndpointState.DELETED.value)
    return list(s.scalars(q.order_by(Endpoint.created_at, Endpoint.id)))


def version_row(s: Session, model_id: str, version: int) -> ModelVersion | None:
    return s.scalars(
        select(ModelVersion).where(
            ModelVersion.model_id == model_id, ModelVersion.version == version
        )
    ).first()


def label_version(s: Session, model_id: str, label: str) -> int | None:
    return s.scalar(
        select(ModelLabel.version).where(ModelLabel.model_id == model_id, ModelLabel.name == label)
    )


def target_of(s: Session, ep: Endpoint) -> int | None:
    """The version the endpoint wants now: its pin, or where its label points."""
    if ep.target_version is not None:
        return ep.target_version
    if ep.target_label is not None:
        return label_version(s, ep.model_id, ep.target_label)
    return None


def replicas(s: Session, endpoint_id: str, include_deleted: bool = False) -> list[Resource]:
    q = select(Resource).where(
        Resource.owner_kind == OwnerKind.ENDPOINT.value, Resource.owner_id == endpoint_id
    )
    if not include_deleted:
        q = q.where(Resource.state != ResourceState.DELETED.value)
    return list(s.scalars(q.order_by(Resource.id)))


def traffic_of(ep: Endpoint) -> dict[int, int] | None:
    if not ep.traffic:
        return None
    return {int(k): int(v) for k, v in ep.traffic.items()}


def desired(s: Session, ep: Endpoint) -> dom.Desired:
    return dom.Desired(
        target=target_of(s, ep),
        replicas=ep.replicas,
        serving_version=ep.serving_version,
        traffic=traffic_of(ep),
        deleting=ep.state == dom.EndpointState.DELETING.value,
    )


def _aware(dt: datetime | None) -> datetime | None:
    if dt is None:
        return None
    return dt if dt.tzinfo is not None else dt.replace(tzinfo=UTC)


def state_since(r: Resource) -> datetime:
    """When the replica entered its replica_state. A draining replica's drain start is stamped
    in last_health_at (health is not checked while it drains)."""
    rs = r.replica_state
    stamp: datetime | None
    if rs == dom.ReplicaState.DRAINING.value:
        stamp = r.last_health_at
    elif rs in (dom.ReplicaState.PROVISIONING.value, dom.ReplicaState.LOADING.value):
        stamp = r.active_at
    elif rs == dom.ReplicaState.READY.value:
        stamp = r.ready_at
    else:
        stamp = None
    return _aware(stamp) or _aware(r.created_at) or utcnow()


def plan_view(
    rows: list[Resource], gone: set[int], now: datetime | None = None
) -> list[dom.Replica]:
    """The rows as the plan reads them; `gone`: ids of rows whose server the backend lost."""
    now = now or utcnow()
    return [
        dom.Replica(
            id=r.id,
            version=r.version or 0,
            state=dom.ReplicaState(r.replica_state or dom.ReplicaState.BOOTING.value),
            health_failures=r.health_failures or 0,
            server_gone=r.id in gone,
            in_state_for=max(0.0, (now - state_since(r)).total_seconds()),
            was_ready=r.ready_at is not None,
        )
        for r in rows
    ]


def failures(s: Session, endpoint_id: str) -> dict[int, int]:
    """Failed replicas per version that never had one ready (deleted rows included)."""
    rows = replicas(s, endpoint_id, include_deleted=True)
    ever_ready = {r.version for r in rows if r.ready_at is not None}
    out: dict[int, int] = {}
    for r in rows:
        if r.version is None or r.version in ever_ready:
            continue
        if r.replica_state == dom.ReplicaState.FAILED.value:
            out[r.version] = out.get(r.version, 0) + 1
    return out


def set_state(
    s: Session,
    endpoint_id: str,
    to: dom.EndpointState,
    expected: list[dom.EndpointState] | None = None,
    **values: Any,
) -> bool:
    """Compare-and-set of the endpoint's state (from any state that may go to `to`)."""
    sources = expected or [st for st in dom.EndpointState if dom.can_transition(st, to)]
    won = s.execute(
        update(Endpoint)
        .where(Endpoint.id == endpoint_id, Endpoint.state.in_([x.value for x in sources]))
        .values(state=to.value, updated_at=utcnow(), **values)
    ).rowcount  # type: ignore[attr-defined]
    return bool(won)


def touch(s: Session, endpoint_id: str, **values: Any) -> None:
    s.execute(
        update(Endpoint)
        .where(Endpoint.id == endpoint_id)
        .values(last_progress_at=utcnow(), **values)
    )


def replica_address(r: Resource) -> str | None:
    if r.host is None or r.serving_port is None:
        return None
    return f"http://{r.host}:{r.serving_port}"


def serialize_replica(r: Resource) -> dict[str, Any]:
    return {
        "id": r.id,
        "name": r.name,
        "version": r.version,
        "replica_state": r.replica_state,
        "state": r.state,
        "server_id": r.server_id,
        "flavor": r.flavor,
        "address": replica_address(r),
        "health_failures": r.health_failures or 0,
        "last_error": r.last_error,
        "created_at": iso(r.created_at),
        "ready_at": iso(r.ready_at),
        "last_health_at": iso(r.last_health_at),
    }


def serialize(s: Session, ep: Endpoint, model_name: str) -> dict[str, Any]:
    return {
        "id": ep.id,
        "model": model_name,
        "project_id": ep.project_id,
        "name": ep.name,
        "state": ep.state,
        "label": ep.target_label,
        "version": ep.target_version,
        "target_version": target_of(s, ep),
        "serving_version": ep.serving_version,
        "traffic": ep.traffic,
        "replicas": ep.replicas,
        "flavor": ep.flavor,
        "log_sample_rate": ep.log_sample_rate,
        "failure_message": ep.failure_message,
        "created_by": ep.created_by,
        "created_at": iso(ep.created_at),
        "updated_at": iso(ep.updated_at),
        "servers": [serialize_replica(r) for r in replicas(s, ep.id)],
    }


def endpoint_servers(s: Session, projects: list[str] | None = None) -> Mapping[str, list[str]]:
    """Per project, the flavors of the endpoint servers not yet deleted (quotas, usage)."""
    q = select(Resource.project_id, Resource.flavor).where(
        Resource.owner_kind == OwnerKind.ENDPOINT.value,
        Resource.state != ResourceState.DELETED.value,
    )
    if projects is not None:
        q = q.where(Resource.project_id.in_(projects))
    out: dict[str, list[str]] = {}
    for project, flavor in s.execute(q):
        out.setdefault(project, []).append(flavor)
    return out


def reserved_replicas(
    s: Session, project: str, exclude: str | None = None
) -> list[tuple[str, int]]:
    """(flavor, replicas) of the project's live endpoints (but `exclude`): what they hold once
    converged, for the quota check of a new or scaled endpoint."""
    q = select(Endpoint.flavor, Endpoint.replicas, Endpoint.traffic).where(
        Endpoint.project_id == project, Endpoint.state != dom.EndpointState.DELETED.value
    )
    if exclude is not None:
        q = q.where(Endpoint.id != exclude)
    out = []
    for flavor, n, traffic in s.execute(q):
        out.append((flavor, servers_for(n, traffic)))
    return out


def servers_for(replicas_: int, traffic: Mapping[str, Any] | None) -> int:
    """Servers an endpoint holds once converged (a split runs each version's share)."""
    if not traffic:
        return replicas_
    return sum(dom.split_counts(replicas_, {int(k): int(v) for k, v in traffic.items()}).values())


# -- Keystone trusts (service/trusts.py; workers/steps/serve.py release_trust) ---------------


def trust_debts(s: Session, limit: int = 100) -> list[tuple[str, str]]:
    """(endpoint id, trust id) of DELETED endpoints whose Keystone trust is not yet deleted
    (every replica of a DELETED endpoint is deleted: only its tag's sweep and the trust are
    left)."""
    rows = s.execute(
        select(Endpoint.id, Endpoint.trust_id)
        .where(
            Endpoint.trust_id.is_not(None),
            Endpoint.state == dom.EndpointState.DELETED.value,
        )
        # in random order: one trust that keeps failing does not hold up the others
        .order_by(func.random())
        .limit(limit)
    ).all()
    return [(ep_id, trust_id) for ep_id, trust_id in rows if trust_id is not None]


def trusted_live(s: Session) -> list[tuple[str, str]]:
    """(endpoint id, trust id) of the endpoints not DELETED that act through a trust: their
    replicas are in their project, where only their trust sees them."""
    rows = s.execute(
        select(Endpoint.id, Endpoint.trust_id)
        .where(
            Endpoint.trust_id.is_not(None),
            Endpoint.state != dom.EndpointState.DELETED.value,
        )
        .order_by(Endpoint.id)
    ).all()
    return [(ep_id, trust_id) for ep_id, trust_id in rows if trust_id is not None]


def clear_trust(s: Session, endpoint_id: str, trust_id: str) -> bool:
    """Forget the endpoint's trust once Keystone deleted it (or it was gone): True when this
    call cleared it."""
    cleared = s.execute(
        update(Endpoint)
        .where(Endpoint.id == endpoint_id, Endpoint.trust_id == trust_id)
        .values(trust_id=None)
    ).rowcount  # type: ignore[attr-defined]
    return bool(cleared)
