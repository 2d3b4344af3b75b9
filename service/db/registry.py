"""The model registry's rows: models, their versions, labels and the labels' history.

Rules kept here (the API and the workers both go through this module):
- names (models, labels) match NAME_RE; version numbers come from models.next_version, taken
  with an atomic UPDATE, so they are assigned in order and never reused, even after a delete;
- every move of a label writes one model_label_history row (append-only, never updated);
- label moves of one model are serialised by a write to the model's row (a row lock on
  PostgreSQL, the database's write lock on SQLite) taken before the label is read, so a
  compare-and-set (`expected_version`) cannot pass for two movers at once.
"""

from __future__ import annotations

import re
import secrets
from datetime import datetime
from typing import Any

from sqlalchemy import delete, func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from service.db.models import (
    Endpoint,
    Model,
    ModelEvaluation,
    ModelLabel,
    ModelLabelHistory,
    ModelVersion,
    Resource,
    iso,
    utcnow,
)
from service.domain.errors import Conflict, NotFound

NAME_RE = re.compile(r"^[a-z][a-z0-9_-]{0,62}$")
DEFAULT_LABEL = "default"
SYSTEM = "system"
MAX_DESCRIPTION = 4096
MAX_WHY = 1024
HISTORY_LIMIT = 1000
# model_label_history.kind
MOVE, ROLLBACK, REFUSAL, EVALUATED = "move", "rollback", "refusal", "evaluated"
MOVES = (MOVE, ROLLBACK)  # the kinds that moved the label (refusal, evaluated: a gate's record)

CREATING, READY, FAILED = "CREATING", "READY", "FAILED"
VERSION_STATES = (CREATING, READY, FAILED)
_GONE_ENDPOINT = "DELETED"
_GONE_RESOURCE = "deleted"


class ModelExists(Conflict):
    code = "model_exists"


class EndpointExists(Conflict):
    """The model has an endpoint (not DELETED): delete the endpoint first."""

    code = "endpoint_exists"


class VersionInUse(Conflict):
    """A label points at the version, or an endpoint targets or serves it."""

    code = "version_in_use"


class VersionNotReady(Conflict):
    code = "version_not_ready"


class TeardownPending(Conflict):
    """What the model's deleted endpoint holds is still being released."""

    code = "teardown_pending"


class LabelMoved(Conflict):
    """Compare-and-set: the label does not point where the caller expected."""

    code = "label_moved"


class RollbackUnavailable(Conflict):
    """The label has no earlier version to go back to, or that version is not READY."""

    code = "rollback_unavailable"


class LabelInUse(Conflict):
    """An endpoint follows the label: it cannot be removed."""

    code = "label_in_use"


def new_model_id() -> str:
    return f"mdl-{secrets.token_hex(6)}"


# -- models ---------------------------------------------------------------------------------


def create_model(s: Session, project: str, name: str, description: str, by: str) -> Model:
    model = Model(
        id=new_model_id(),
        project_id=project,
        name=name,
        description=description,
        created_by=by,
        created_at=utcnow(),
        next_version=1,
    )
    try:
        with s.begin_nested():
            s.add(model)
    except IntegrityError as e:
        raise ModelExists(
            f"a model named {name!r} already exists in this project", details={"model": name}
        ) from e
    return model


def ensure_model(s: Session, project: str, name: str, by: str, description: str = "") -> Model:
    """The model `name` of the project, created when missing (a job's output.register_as)."""
    found = s.scalars(
        select(Model).where(Model.project_id == project, Model.name == name)
    ).one_or_none()
    if found is not None:
        return found
    try:
        return create_model(s, project, name, description, by)
    except ModelExists:  # created by someone else in between
        return find_model(s, project, name)


def find_model(s: Session, project: str, name: str) -> Model:
    """The project's model `name`, or NotFound (another project's model is not found either)."""
    model = None
    if NAME_RE.match(name):
        model = s.scalars(
            select(Model).where(Model.project_id == project, Model.name == name)
        ).one_or_none()
    if model is None:
        raise NotFound(f"no model {name[:64]!r} in this project", details={"model": name[:64]})
    return model


def list_models(s: Session, project: str) -> list[Model]:
    return list(s.scalars(select(Model).where(Model.project_id == project).order_by(Model.name)))


def live_endpoint(s: Session, model: Model) -> Endpoint | None:
    return s.scalars(
        select(Endpoint).where(Endpoint.model_id == model.id, Endpoint.state != _GONE_ENDPOINT)
    ).first()


def delete_model(s: Session, model: Model) -> None:
    _lock_model(s, model)
    ep = live_endpoint(s, model)
    if ep is not None:
        raise EndpointExists(
            f"model {model.name!r} has endpoint {ep.id} ({ep.state}); delete the endpoint first",
            details={"model": model.name, "endpoint_id": ep.id},
        )
    held = s.scalars(
        select(Endpoint.id).where(Endpoint.model_id == model.id, Endpoint.trust_id.is_not(None))
    ).first()
    if held is not None:
        # a DELETED endpoint whose Keystone trust the workers have not let go yet (Keystone was
        # down): the row is what the reconciler retries from; deleting it with the model would
        # leave the trust in Keystone for ever
        raise TeardownPending(
            f"model {model.name!r}'s endpoint {held} is deleted but still holds its Keystone "
            "trust (being released); retry later",
            details={"model": model.name, "endpoint_id": held, "trust_held": True},
        )
    s.delete(model)
    s.flush()


def _lock_model(s: Session, model: Model) -> None:
    """Serialise writers of one model for the rest of the transaction: a write to its row
    (PostgreSQL: the row lock; SQLite: the database write lock, taken before reading)."""
    s.execute(update(Model).where(Model.id == model.id).values(next_version=Model.next_version))


# -- versions ---------------------------------------------------------------------------------


def create_version(
    s: Session,
    model: Model,
    *,
    artifact_uri: str,
    by: str,
    source_job_id: str | None = None,
    metrics: dict[str, Any] | None = None,
) -> ModelVersion:
    """A new version in CREATING, numbered next (atomically: concurrent creators get
    distinct numbers; a deleted version's number is never handed out again)."""
    s.execute(update(Model).where(Model.id == model.id).values(next_version=Model.next_version + 1))
    number = s.scalar(select(Model.next_version).where(Model.id == model.id))
    assert number is not None
    now = utcnow()
    mv = ModelVersion(
        model_id=model.id,
        version=number - 1,
        state=CREATING,
        artifact_uri=artifact_uri,
        checksums={},
        signature=None,
        metrics=dict(metrics or {}),
        source_job_id=source_job_id,
        created_by=by,
        created_at=now,
        updated_at=now,
    )
    s.add(mv)
    s.flush()
    return mv


def get_version(s: Session, model: Model, version: int) -> ModelVersion:
    mv = s.scalars(
        select(ModelVersion).where(
            ModelVersion.model_id == model.id, ModelVersion.version == version
        )
    ).one_or_none()
    if mv is None:
        raise NotFound(
            f"model {model.name!r} has no version {version}",
            details={"model": model.name, "version": version},
        )
    return mv


def version_by_id(s: Session, version_id: int) -> ModelVersion | None:
    return s.get(ModelVersion, version_id)


def list_versions(s: Session, model: Model) -> list[ModelVersion]:
    return list(
        s.scalars(
            select(ModelVersion)
            .where(ModelVersion.model_id == model.id)
            .order_by(ModelVersion.version)
        )
    )


def delete_version(s: Session, model: Model, version: int) -> None:
    _lock_model(s, model)
    mv = get_version(s, model, version)
    labels = sorted(
        s.scalars(
            select(ModelLabel.name).where(
                ModelLabel.model_id == model.id, ModelLabel.version == version
            )
        )
    )
    if labels:
        raise VersionInUse(
            f"version {version} of {model.name!r} is labelled {', '.join(labels)}; "
            "move or remove the label(s) first",
            details={"model": model.name, "version": version, "labels": labels},
        )
    ep = live_endpoint(s, model)
    if ep is not None:
        serving = s.scalar(
            select(func.count())
            .select_from(Resource)
            .where(
                Resource.owner_kind == "endpoint",
                Resource.owner_id == ep.id,
                Resource.version == version,
                Resource.state != _GONE_RESOURCE,
            )
        )
        if serving or version in (ep.target_version, ep.serving_version):
            raise VersionInUse(
                f"endpoint {ep.id} serves version {version} of {model.name!r}; "
                "deploy another version first",
                details={"model": model.name, "version": version, "endpoint_id": ep.id},
            )
    s.delete(mv)
    s.flush()


def finish_version(
    s: Session,
    mv: ModelVersion,
    *,
    checksums: dict[str, Any] | None = None,
    signature: dict[str, Any] | None = None,
    failure: str | None = None,
) -> bool:
    """CREATING -> READY (with checksums and signature) or FAILED (with a sentence); False
    when the version is no longer CREATING (already finished by another run: nothing done)."""
    values: dict[str, Any] = {"updated_at": utcnow()}
    if failure is not None:
        values.update(state=FAILED, failure_message=failure)
    else:
        values.update(state=READY, checksums=checksums or {}, signature=signature)
    done = s.execute(
        update(ModelVersion)
        .where(ModelVersion.id == mv.id, ModelVersion.state == CREATING)
        .values(**values)
    ).rowcount  # type: ignore[attr-defined]
    s.flush()
    s.refresh(mv)
    return bool(done)


# -- labels -----------------------------------------------------------------------------------

_UNSET: Any = object()


def labels_of(s: Session, model: Model) -> dict[str, int]:
    rows = s.execute(
        select(ModelLabel.name, ModelLabel.version)
        .where(ModelLabel.model_id == model.id)
        .order_by(ModelLabel.name)
    )
    return {name: version for name, version in rows}


def set_label(
    s: Session,
    model: Model,
    label: str,
    version: int,
    *,
    by: str,
    why: str = "",
    expected: Any = _UNSET,
    kind: str = MOVE,
) -> tuple[int | None, bool]:
    """Point `label` at `version` (READY). With `expected` (an int, or None for "the label
    does not exist yet"), only when the label is there now: else LabelMoved. Returns (the
    version it pointed at before, whether it moved); a move writes one history row."""
    _lock_model(s, model)
    mv = get_version(s, model, version)
    if mv.state != READY:
        raise VersionNotReady(
            f"version {version} of {model.name!r} is {mv.state}; only a READY version can be "
            "labelled",
            details={"model": model.name, "version": version, "state": mv.state},
        )
    row = s.get(ModelLabel, (model.id, label))
    before = row.version if row is not None else None
    if expected is not _UNSET and expected != before:
        raise LabelMoved(
            f"label {label!r} of {model.name!r} points at "
            f"{'nothing' if before is None else f'version {before}'}, not "
            f"{'nothing' if expected is None else f'version {expected}'}; read it and retry",
            details={"label": label, "version": before, "expected_version": expected},
        )
    if before == version:
        return before, False
    now = utcnow()
    if row is None:
        s.add(ModelLabel(model_id=model.id, name=label, version=version, updated_at=now))
    else:
        row.version, row.updated_at = version, now
    s.add(
        ModelLabelHistory(
            model_id=model.id,
            label=label,
            from_version=before,
            to_version=version,
            at=now,
            by=by,
            why=why[:MAX_WHY],
            kind=kind,
        )
    )
    s.flush()
    return before, True


def adopt_default(s: Session, model: Model, version: int) -> bool:
    """Point `default` at `version` when the model has never had a `default` label: its first
    READY version is what a plain deploy and the default predict route use, with no extra call.
    A label someone set or removed on purpose is never touched (its history has a row); a
    concurrent move wins. True when the label was set (one history row, by `system`)."""
    _lock_model(s, model)
    ever = s.scalar(
        select(func.count())
        .select_from(ModelLabelHistory)
        .where(ModelLabelHistory.model_id == model.id, ModelLabelHistory.label == DEFAULT_LABEL)
    )
    if ever:
        return False
    try:
        _, moved = set_label(
            s,
            model,
            DEFAULT_LABEL,
            version,
            by=SYSTEM,
            why="the model's first READY version",
            expected=None,
        )
    except LabelMoved:
        return False
    return moved


def remove_label(
    s: Session, model: Model, label: str, *, by: str, why: str = "", expected: Any = _UNSET
) -> int:
    """Remove `label` (NotFound when absent; LabelInUse while an endpoint follows it);
    returns the version it pointed at. Writes a history row with to_version None."""
    _lock_model(s, model)
    row = s.get(ModelLabel, (model.id, label))
    if row is None:
        raise NotFound(
            f"model {model.name!r} has no label {label!r}",
            details={"model": model.name, "label": label},
        )
    if expected is not _UNSET and expected != row.version:
        raise LabelMoved(
            f"label {label!r} of {model.name!r} points at version {row.version}, not "
            f"{'nothing' if expected is None else f'version {expected}'}; read it and retry",
            details={"label": label, "version": row.version, "expected_version": expected},
        )
    ep = live_endpoint(s, model)
    if ep is not None and ep.target_label == label:
        raise LabelInUse(
            f"endpoint {ep.id} follows label {label!r}; point it at another label or version first",
            details={"label": label, "endpoint_id": ep.id},
        )
    before = row.version
    s.execute(delete(ModelLabel).where(ModelLabel.model_id == model.id, ModelLabel.name == label))
    s.add(
        ModelLabelHistory(
            model_id=model.id,
            label=label,
            from_version=before,
            to_version=None,
            at=utcnow(),
            by=by,
            why=why,
        )
    )
    s.flush()
    return before


def history(
    s: Session, model: Model, label: str | None = None, limit: int = HISTORY_LIMIT
) -> list[ModelLabelHistory]:
    """The label moves, oldest first (the last `limit`)."""
    q = select(ModelLabelHistory).where(ModelLabelHistory.model_id == model.id)
    if label is not None:
        q = q.where(ModelLabelHistory.label == label)
    q = q.order_by(ModelLabelHistory.at.desc(), ModelLabelHistory.id.desc()).limit(limit)
    return list(reversed(list(s.scalars(q))))


def labels_at(
    s: Session, model: Model, at: datetime, label: str | None = None
) -> dict[str, int | None]:
    """Which version each label pointed at, at time `at` (None: the label did not exist
    then, though it did at some time before)."""
    q = select(ModelLabelHistory).where(
        ModelLabelHistory.model_id == model.id,
        ModelLabelHistory.at <= at,
        ModelLabelHistory.kind.in_(MOVES),  # a gate's refusal moved nothing
    )
    if label is not None:
        q = q.where(ModelLabelHistory.label == label)
    out: dict[str, int | None] = {}
    for row in s.scalars(q.order_by(ModelLabelHistory.at, ModelLabelHistory.id)):
        out[row.label] = row.to_version
    return dict(sorted(out.items()))


def record_refusal(
    s: Session, model: Model, label: str, *, by: str, why: str, kind: str = REFUSAL
) -> int | None:
    """A history row for a gate that did not move `label`: from and to are where the label
    points now (kind `refusal`, or `evaluated` for a pass with `promote: false`; "where was it
    at T" and rollback skip both). Returns that version."""
    _lock_model(s, model)
    row = s.get(ModelLabel, (model.id, label))
    here = row.version if row is not None else None
    s.add(
        ModelLabelHistory(
            model_id=model.id,
            label=label,
            from_version=here,
            to_version=here,
            at=utcnow(),
            by=by,
            why=why[:MAX_WHY],
            kind=kind,
        )
    )
    s.flush()
    return here


def promote(
    s: Session, model: Model, label: str, version: int, *, champion: int | None, by: str, why: str
) -> bool:
    """A gate's promotion: `label` to `version` only if it still points at `champion` (the
    version scored against; None: the label did not exist). LabelMoved when it moved since:
    the caller records `champion_changed`. True when it moved (one history row)."""
    _, moved = set_label(s, model, label, version, by=by, why=why, expected=champion)
    return moved


def rollback(s: Session, model: Model, label: str, *, by: str, why: str = "") -> tuple[int, int]:
    """Move `label` back to the version it pointed at before its last move (a rollback is a
    move too: rolling back twice goes forward again). Returns (from, to). RollbackUnavailable
    when the label never pointed anywhere before, or that version is gone or not READY."""
    _lock_model(s, model)
    last = s.scalars(
        select(ModelLabelHistory)
        .where(
            ModelLabelHistory.model_id == model.id,
            ModelLabelHistory.label == label,
            ModelLabelHistory.kind.in_(MOVES),
        )
        .order_by(ModelLabelHistory.at.desc(), ModelLabelHistory.id.desc())
        .limit(1)
    ).first()
    row = s.get(ModelLabel, (model.id, label))
    if last is None and row is None:
        raise NotFound(
            f"model {model.name!r} has no label {label!r}",
            details={"model": model.name, "label": label},
        )
    here = row.version if row is not None else None
    back = last.from_version if last is not None else None
    if back is None or back == here:
        raise RollbackUnavailable(
            f"label {label!r} of {model.name!r} pointed at no other version before its last "
            "move: there is nothing to roll back to",
            details={"label": label, "version": here, "reason": "no_previous_version"},
        )
    mv = s.scalars(
        select(ModelVersion).where(ModelVersion.model_id == model.id, ModelVersion.version == back)
    ).one_or_none()
    if mv is None or mv.state != READY:
        state = "deleted" if mv is None else mv.state
        raise RollbackUnavailable(
            f"label {label!r} of {model.name!r} pointed at version {back} before its last "
            f"move, and that version is {state}: it cannot be labelled again",
            details={
                "label": label,
                "version": here,
                "previous_version": back,
                "reason": "previous_version_not_ready",
                "state": state,
            },
        )
    text = f"rollback: back to version {back} from {here if here is not None else 'nothing'}"
    set_label(
        s,
        model,
        label,
        back,
        by=by,
        why=f"{text}; {why}" if why else text,
        expected=here,
        kind=ROLLBACK,
    )
    return (here if here is not None else 0), back


def evaluations_of(s: Session, model: Model) -> dict[int, ModelEvaluation]:
    """The latest evaluation of each version of the model that has one."""
    out: dict[int, ModelEvaluation] = {}
    for ev in s.scalars(
        select(ModelEvaluation)
        .where(ModelEvaluation.model_id == model.id)
        .order_by(ModelEvaluation.id)
    ):
        out[ev.version] = ev
    return out


# -- serialisation -----------------------------------------------------------------------------


def serialize_model(s: Session, model: Model, *, detail: bool = False) -> dict[str, Any]:
    versions = s.execute(
        select(func.count(), func.max(ModelVersion.version)).where(
            ModelVersion.model_id == model.id
        )
    ).one()
    out: dict[str, Any] = {
        "id": model.id,
        "name": model.name,
        "project_id": model.project_id,
        "description": model.description,
        "created_by": model.created_by,
        "created_at": iso(model.created_at),
        "versions": versions[0],
        "latest_version": versions[1],
        "labels": labels_of(s, model),
    }
    if detail:
        ep = live_endpoint(s, model)
        out["endpoint"] = (
            None
            if ep is None
            else {
                "id": ep.id,
                "name": ep.name,
                "state": ep.state,
                "label": ep.target_label,
                "version": ep.target_version,
                "serving_version": ep.serving_version,
                "replicas": ep.replicas,
            }
        )
    return out


def serialize_evaluation(ev: ModelEvaluation) -> dict[str, Any]:
    gate = ev.gate or {}
    return {
        "job_id": ev.job_id,
        "state": ev.state,
        "metric": gate.get("metric"),
        "direction": gate.get("direction"),
        "threshold": gate.get("threshold"),
        "min_improvement": gate.get("min_improvement"),
        "label": gate.get("label"),
        "promote": gate.get("promote", True),
        "holdout_uri": gate.get("holdout_uri"),
        "holdout_rows": ev.holdout_rows,
        "champion_version": ev.champion_version,
        "candidate_score": ev.candidate_score,
        "champion_score": ev.champion_score,
        "decision": ev.decision,
        "reason": ev.reason,
        "message": ev.message,
        "created_at": iso(ev.created_at),
        "finished_at": iso(ev.finished_at),
    }


def serialize_version(
    mv: ModelVersion,
    model: Model,
    labels: dict[str, int],
    evaluation: ModelEvaluation | None = None,
) -> dict[str, Any]:
    return {
        "model": model.name,
        "version": mv.version,
        "state": mv.state,
        "artifact_uri": mv.artifact_uri,
        "checksums": mv.checksums or {},
        "signature": mv.signature,
        "metrics": mv.metrics or {},
        "source_job_id": mv.source_job_id,
        "labels": sorted(k for k, v in labels.items() if v == mv.version),
        "created_by": mv.created_by,
        "created_at": iso(mv.created_at),
        "updated_at": iso(mv.updated_at),
        "failure_message": mv.failure_message,
        "evaluation": None if evaluation is None else serialize_evaluation(evaluation),
    }


def serialize_history(row: ModelLabelHistory) -> dict[str, Any]:
    return {
        "label": row.label,
        "from_version": row.from_version,
        "to_version": row.to_version,
        "at": iso(row.at),
        "by": row.by,
        "why": row.why,
        "kind": row.kind,
    }
