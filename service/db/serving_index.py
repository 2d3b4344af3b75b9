"""The serving log's index in the database: which models to look at, which of their
serving-log objects were already read (serving_log_objects, unique (model_id, key)), the
logged predictions (unique (model_id, request_id)) and each model's listing cursor.

Inserts go through INSERT ... ON CONFLICT DO NOTHING: an object claimed by another pass (on
PostgreSQL the second insert waits for the first transaction and then does nothing) and a
request id already indexed are no-ops, so two passes at once, or a pass killed mid-way and
run again, index each object once."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import func, or_, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from service.db.models import (
    DatasetVersion,
    Endpoint,
    LoggedPrediction,
    Model,
    ServingLogCursor,
    ServingLogObject,
    utcnow,
)

GONE_ENDPOINT_GRACE = timedelta(hours=2)  # a deleted endpoint's late batches are still read


@dataclass(frozen=True)
class Target:
    model_id: str
    project_id: str
    name: str
    since: datetime  # the first listing starts here: its endpoint's creation (no log before)
    listed_through: datetime | None
    trust_id: str | None


def _insert(s: Session, table: Any) -> Any:
    dialect = s.get_bind().dialect.name
    if dialect == "postgresql":
        return postgresql.insert(table)
    if dialect == "sqlite":
        return sqlite.insert(table)
    raise RuntimeError(f"unsupported database {dialect}")  # pragma: no cover


def targets(s: Session, now: datetime, limit: int) -> list[Target]:
    """The models whose serving logs may have new objects: those with an endpoint that is
    not DELETED (or was deleted within GONE_ENDPOINT_GRACE), least recently listed first. A
    model never listed is listed from its (oldest such) endpoint's creation."""
    recent = now - GONE_ENDPOINT_GRACE
    live = (
        select(
            Endpoint.model_id,
            func.max(Endpoint.trust_id).label("trust_id"),
            func.min(Endpoint.created_at).label("since"),
        )
        .where(or_(Endpoint.state != "DELETED", Endpoint.updated_at >= recent))
        .group_by(Endpoint.model_id)
        .subquery()
    )
    q = (
        select(Model, ServingLogCursor.listed_through, live.c.trust_id, live.c.since)
        .join(live, live.c.model_id == Model.id)
        .outerjoin(ServingLogCursor, ServingLogCursor.model_id == Model.id)
        .order_by(ServingLogCursor.listed_through.asc().nulls_first(), Model.id)
        .limit(limit)
    )
    return [
        Target(m.id, m.project_id, m.name, since or m.created_at, through, trust)
        for m, through, trust, since in s.execute(q).all()
    ]


def known_keys(s: Session, model_id: str, keys: list[str]) -> set[str]:
    if not keys:
        return set()
    q = select(ServingLogObject.key).where(
        ServingLogObject.model_id == model_id, ServingLogObject.key.in_(keys)
    )
    return set(s.scalars(q))


def claim_object(s: Session, project: str, model_id: str, key: str) -> int | None:
    """The object's row, inserted now; None when another pass has it (already indexed)."""
    stmt = _insert(s, ServingLogObject).values(
        project_id=project,
        model_id=model_id,
        key=key,
        lines=0,
        indexed=0,
        skipped=0,
        note="",
        indexed_at=utcnow(),
    )
    stmt = stmt.on_conflict_do_nothing(index_elements=["model_id", "key"])
    oid = s.execute(stmt.returning(ServingLogObject.id)).scalar_one_or_none()
    return None if oid is None else int(oid)


def add_predictions(s: Session, rows: list[dict[str, Any]], chunk: int = 500) -> int:
    """Insert logged predictions; those whose (model_id, request_id) is indexed already are
    left alone. How many were new."""
    added = 0
    for i in range(0, len(rows), chunk):
        part = rows[i : i + chunk]
        stmt = _insert(s, LoggedPrediction).values(part)
        stmt = stmt.on_conflict_do_nothing(index_elements=["model_id", "request_id"])
        added += len(s.execute(stmt.returning(LoggedPrediction.id)).all())
    return added


def finish_object(
    s: Session, oid: int, *, lines: int, indexed: int, skipped: int, note: str = ""
) -> None:
    s.execute(
        update(ServingLogObject)
        .where(ServingLogObject.id == oid)
        .values(lines=lines, indexed=indexed, skipped=skipped, note=note[:2000])
    )


def set_cursor(s: Session, model_id: str, project: str, through: datetime) -> None:
    now = utcnow()
    stmt = _insert(s, ServingLogCursor).values(
        model_id=model_id, project_id=project, listed_through=through, updated_at=now
    )
    stmt = stmt.on_conflict_do_update(
        index_elements=["model_id"], set_={"listed_through": through, "updated_at": now}
    )
    s.execute(stmt)


def stalled_builds(s: Session, now: datetime, redrive_after: timedelta, limit: int) -> list[int]:
    """BUILDING dataset versions no build holds (lease lapsed or never taken) and not
    re-driven for `redrive_after`: each is stamped (compare-and-set on updated_at), so one
    pass re-drives it once per stamp."""
    cutoff = now - redrive_after
    rows = s.execute(
        select(DatasetVersion.id, DatasetVersion.updated_at)
        .where(
            DatasetVersion.state == "BUILDING",
            DatasetVersion.updated_at < cutoff,
            or_(DatasetVersion.lease_until.is_(None), DatasetVersion.lease_until < now),
        )
        .order_by(DatasetVersion.updated_at)
        .limit(limit)
    ).all()
    out = []
    for vid, stamp in rows:
        res = s.execute(
            update(DatasetVersion)
            .where(DatasetVersion.id == vid, DatasetVersion.updated_at == stamp)
            .values(updated_at=now)
        )
        if res.rowcount:  # type: ignore[attr-defined]
            out.append(int(vid))
    return out


def claim_build(s: Session, version_id: int, now: datetime, lease: timedelta) -> bool:
    """Take the build of a BUILDING version until now + lease; False when it is no longer
    BUILDING or another build holds it."""
    res = s.execute(
        update(DatasetVersion)
        .where(
            DatasetVersion.id == version_id,
            DatasetVersion.state == "BUILDING",
            or_(DatasetVersion.lease_until.is_(None), DatasetVersion.lease_until < now),
        )
        .values(lease_until=now + lease, updated_at=now)
    )
    return bool(res.rowcount)  # type: ignore[attr-defined]


__all__ = [
    "Target",
    "add_predictions",
    "claim_build",
    "claim_object",
    "finish_object",
    "known_keys",
    "set_cursor",
    "stalled_builds",
    "targets",
]
