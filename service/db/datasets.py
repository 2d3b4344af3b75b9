"""Dataset repository: datasets (by name, in one project) and their versions (builds).

A version's number comes from `datasets.next_version` by an atomic UPDATE, as a model's
versions do: concurrent builds of one dataset get distinct numbers. A version is BUILDING
until the task `stackml.build_dataset` (workers/steps/datasets.py) has written it, then
READY (with its manifest) or FAILED (with a sentence).

`start_build` is what both the API (POST /v1/datasets) and a schedule's "dataset to rebuild
first" call; `rebuild` builds a dataset again with its latest version's settings and a window
that ends now. Both leave enqueueing the build task (queue.BUILD_DATASET with the version's
id) to the caller, after its commit.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from service.backends.interfaces import ObjectStore
from service.db.models import Dataset, DatasetVersion, Model, iso, utcnow
from service.domain.errors import NotFound

BUILDING = "BUILDING"
READY = "READY"
FAILED = "FAILED"
STATES = (BUILDING, READY, FAILED)
FORMATS = ("csv", "jsonl")
DEFAULT_HOLDOUT = 0.2
AREA = "datasets/"  # <project area>datasets/<name>/<version>/


@dataclass(frozen=True)
class BuildSpec:
    model: str
    start: datetime | None = None
    end: datetime | None = None  # None: the time the build is asked
    holdout_fraction: float = DEFAULT_HOLDOUT
    format: str = "csv"


@dataclass(frozen=True)
class Started:
    """A build started: the caller enqueues queue.BUILD_DATASET with `version_id` after its
    commit. `reason` is set (and the rest None) when no build could start."""

    version_id: int | None
    version: int | None
    reason: str | None = None


def new_dataset_id() -> str:
    return "ds-" + secrets.token_hex(8)


def prefix(store: ObjectStore, project: str, name: str, version: int) -> str:
    return f"{store.project_prefix(project)}{AREA}{name}/{version}/"


def find(s: Session, project: str, name: str) -> Dataset:
    ds = s.scalars(
        select(Dataset).where(Dataset.project_id == project, Dataset.name == name)
    ).one_or_none()
    if ds is None:
        raise NotFound(f"no dataset {name[:64]!r} in this project", details={"dataset": name[:64]})
    return ds


def list_datasets(s: Session, project: str) -> list[Dataset]:
    return list(
        s.scalars(select(Dataset).where(Dataset.project_id == project).order_by(Dataset.name))
    )


def versions(s: Session, ds: Dataset) -> list[DatasetVersion]:
    return list(
        s.scalars(
            select(DatasetVersion)
            .where(DatasetVersion.dataset_id == ds.id)
            .order_by(DatasetVersion.version)
        )
    )


def get_version(s: Session, ds: Dataset, version: int) -> DatasetVersion:
    dv = s.scalars(
        select(DatasetVersion).where(
            DatasetVersion.dataset_id == ds.id, DatasetVersion.version == version
        )
    ).one_or_none()
    if dv is None:
        raise NotFound(
            f"dataset {ds.name!r} has no version {version}",
            details={"dataset": ds.name, "version": version},
        )
    return dv


def latest(s: Session, ds: Dataset) -> DatasetVersion | None:
    return s.scalars(
        select(DatasetVersion)
        .where(DatasetVersion.dataset_id == ds.id)
        .order_by(DatasetVersion.version.desc())
        .limit(1)
    ).first()


def _ensure(s: Session, project: str, name: str, by: str) -> Dataset:
    q = select(Dataset).where(Dataset.project_id == project, Dataset.name == name)
    ds = s.scalars(q).one_or_none()
    if ds is not None:
        return ds
    try:
        with s.begin_nested():
            ds = Dataset(id=new_dataset_id(), project_id=project, name=name, created_by=by)
            s.add(ds)
    except IntegrityError:  # a concurrent first build of the same name made it
        ds = s.scalars(q).one()
    return ds


def start_build(
    s: Session,
    project: str,
    name: str,
    spec: BuildSpec,
    *,
    store: ObjectStore,
    by: str,
    now: datetime | None = None,
) -> DatasetVersion:
    """A new BUILDING version of dataset `name` (made on its first build). The model must
    exist in the project (NotFound otherwise). The window's end defaults to `now`, so a
    version is a fixed snapshot of what was logged when it was asked."""
    now = now or utcnow()
    model = s.scalars(
        select(Model).where(Model.project_id == project, Model.name == spec.model)
    ).one_or_none()
    if model is None:
        raise NotFound(
            f"no model {spec.model[:64]!r} in this project", details={"model": spec.model[:64]}
        )
    ds = _ensure(s, project, name, by)
    s.execute(
        update(Dataset).where(Dataset.id == ds.id).values(next_version=Dataset.next_version + 1)
    )
    number = s.scalar(select(Dataset.next_version).where(Dataset.id == ds.id))
    assert number is not None
    version = int(number) - 1
    end = spec.end or now
    dv = DatasetVersion(
        dataset_id=ds.id,
        version=version,
        state=BUILDING,
        model_name=spec.model,
        spec={
            "window": {"start": iso(spec.start), "end": iso(end)},
            "holdout_fraction": spec.holdout_fraction,
            "format": spec.format,
        },
        prefix_uri=store.uri(prefix(store, project, name, version)),
        created_by=by,
        created_at=now,
        updated_at=now,
    )
    s.add(dv)
    s.flush()
    return dv


def rebuild(
    s: Session, project: str, name: str, *, store: ObjectStore, by: str, now: datetime | None = None
) -> Started:
    """Start a new version of dataset `name` with its latest version's model, holdout
    fraction, format and window start, and a window that ends `now` (what a schedule's
    retraining rebuilds first). A reason instead when the dataset does not exist or its
    model is gone; the caller enqueues queue.BUILD_DATASET with `version_id` after its commit."""
    ds = s.scalars(
        select(Dataset).where(Dataset.project_id == project, Dataset.name == name)
    ).one_or_none()
    prev = latest(s, ds) if ds is not None else None
    if ds is None or prev is None:
        return Started(None, None, f"no dataset {name!r} in this project; create it first")
    window = prev.spec.get("window") or {}
    start = window.get("start")
    spec = BuildSpec(
        model=prev.model_name,
        start=datetime.fromisoformat(start.replace("Z", "+00:00")) if start else None,
        end=None,
        holdout_fraction=float(prev.spec.get("holdout_fraction", DEFAULT_HOLDOUT)),
        format=str(prev.spec.get("format", "csv")),
    )
    try:
        with s.begin_nested():
            dv = start_build(s, project, name, spec, store=store, by=by, now=now)
    except NotFound as e:
        return Started(None, None, f"dataset {name!r} cannot be rebuilt: {e.message}")
    return Started(dv.id, dv.version)


def finish(
    s: Session,
    dv: DatasetVersion,
    *,
    manifest: dict[str, Any] | None = None,
    failure: str | None = None,
) -> bool:
    """BUILDING -> READY (with the manifest) or FAILED (with the sentence), compare-and-set:
    False when the version was no longer BUILDING."""
    now = utcnow()
    values: dict[str, Any] = {"updated_at": now}
    if failure is None:
        values.update(state=READY, manifest=manifest, failure_message=None)
    else:
        values.update(state=FAILED, failure_message=failure[:2000])
    res = s.execute(
        update(DatasetVersion)
        .where(DatasetVersion.id == dv.id, DatasetVersion.state == BUILDING)
        .values(**values)
    )
    s.flush()
    return bool(res.rowcount)  # type: ignore[attr-defined]


def serialize_version(ds: Dataset, dv: DatasetVersion) -> dict[str, Any]:
    base = dv.prefix_uri
    ready = dv.state == READY
    return {
        "dataset": ds.name,
        "version": dv.version,
        "state": dv.state,
        "model": dv.model_name,
        "window": (dv.spec or {}).get("window"),
        "holdout_fraction": (dv.spec or {}).get("holdout_fraction"),
        "format": (dv.spec or {}).get("format"),
        "uri": base,
        "data_uri": f"{base}train/" if ready else None,
        "holdout_uri": f"{base}holdout/" if ready else None,
        "manifest": dv.manifest if ready else None,
        "failure_message": dv.failure_message,
        "created_by": dv.created_by,
        "created_at": iso(dv.created_at),
        "updated_at": iso(dv.updated_at),
    }


def serialize(s: Session, ds: Dataset, *, detail: bool = False) -> dict[str, Any]:
    rows = versions(s, ds)
    last = rows[-1] if rows else None
    ready = [v for v in rows if v.state == READY]
    out: dict[str, Any] = {
        "id": ds.id,
        "name": ds.name,
        "project_id": ds.project_id,
        "created_by": ds.created_by,
        "created_at": iso(ds.created_at),
        "versions": len(rows),
        "latest_version": last.version if last else None,
        "latest_state": last.state if last else None,
        "latest_ready_version": ready[-1].version if ready else None,
    }
    if detail:
        out["version_list"] = [serialize_version(ds, v) for v in rows]
    return out


__all__ = [
    "BUILDING",
    "FAILED",
    "READY",
    "BuildSpec",
    "Started",
    "find",
    "finish",
    "rebuild",
    "start_build",
]
