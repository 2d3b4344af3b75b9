"""A schedule that rebuilds a dataset before each slot's job (POST /v1/schedules `dataset`),
over a real SQLite database: what is refused at creation (no such dataset, a template naming
its own data, a gate without a holdout outside such a schedule), and a slot driven through
the firing pass: `building` with the build enqueued, then the job on the new version's
train/ with its gate scored on the version's holdout/."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from flask.testing import FlaskClient
from sqlalchemy import func, select

from service.backends.storage.local import LocalStore
from service.config import Settings
from service.db import datasets as ds_repo
from service.db import registry as models_repo
from service.db.models import DatasetVersion, Schedule, ScheduleRun
from service.db.session import session_scope
from service.domain import schedules as dom
from service.queue import ALLOCATE, BUILD_DATASET
from workers.steps import schedules as firing

PROJECT = "local"


class Sent:
    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []

    def __call__(self, task: str, ref: str) -> None:
        self.calls.append((task, ref))


def _dataset(db_url: str, store: LocalStore, name: str = "fb") -> str:
    """Dataset `name` of model m with a READY version 1 (objects under its holdout/)."""
    with session_scope(db_url) as s:
        models_repo.ensure_model(s, PROJECT, "m", "test")
        dv = ds_repo.start_build(
            s, PROJECT, name, ds_repo.BuildSpec(model="m"), store=store, by="test"
        )
        assert ds_repo.finish(s, dv, manifest={"rows": 3})
        prefix = dv.prefix_uri
    store.put(store.key_of(f"{prefix}holdout/part-00000.csv"), b"x0,y\n1,2\n")
    return prefix


def _gate(**over: Any) -> dict[str, Any]:
    return {"register_as": "m", "gate": {"metric": "rmse", "threshold": 1.0, **over}}


def _body(job: dict[str, Any], **over: Any) -> dict[str, Any]:
    return {"name": "retrain", "cron": "* * * * *", "job": job, **over}


def _count(db_url: str, model: Any) -> int:
    with session_scope(db_url) as s:
        return int(s.scalar(select(func.count()).select_from(model)) or 0)


def test_refusals_name_the_field_and_store_nothing(
    client: FlaskClient, package_uri: str, spec: Any, error_of: Any, db_url: str, store: LocalStore
) -> None:
    job = spec(package_uri)
    err = error_of(client.post("/v1/schedules", json=_body(job, dataset="nope")), 422)
    assert [f["field"] for f in err["details"]["fields"]] == ["dataset"]
    assert "no dataset 'nope' with a version" in err["details"]["fields"][0]["message"]
    _dataset(db_url, store)
    with_data = spec(package_uri, inputs={"data_uri": f"local://projects/{PROJECT}/data/"})
    err = error_of(client.post("/v1/schedules", json=_body(with_data, dataset="fb")), 422)
    assert [f["field"] for f in err["details"]["fields"]] == ["job.inputs.data_uri"]
    # a gate without its holdout: only a schedule that rebuilds a dataset fills it
    gated = spec(package_uri, output=_gate())
    err = error_of(client.post("/v1/schedules", json=_body(gated)), 422)
    assert [f["field"] for f in err["details"]["fields"]] == ["job.output.gate.holdout_uri"]
    err = error_of(client.post("/v1/jobs", json=gated), 422)
    assert [f["field"] for f in err["details"]["fields"]] == ["output.gate.holdout_uri"]
    assert _count(db_url, Schedule) == 0


def test_a_slot_rebuilds_then_trains_on_the_version_with_its_holdout(
    client: FlaskClient,
    package_uri: str,
    spec: Any,
    db_url: str,
    store: LocalStore,
    settings: Settings,
) -> None:
    _dataset(db_url, store)
    resp = client.post("/v1/schedules", json=_body(spec(package_uri, output=_gate()), dataset="fb"))
    assert resp.status_code == 201, resp.get_json()
    sch = resp.get_json()
    assert sch["dataset"] == "fb"
    assert (
        "holdout_uri" not in sch["job"]["output"]["gate"]
        or not sch["job"]["output"]["gate"]["holdout_uri"]
    )
    with session_scope(db_url) as s:
        created = dom._aware(s.get(Schedule, sch["id"]).created_at)
    slot = created.replace(second=0, microsecond=0) + timedelta(minutes=1)
    sent = Sent()
    firing.run(slot + timedelta(seconds=1), settings=settings, enqueue=sent)
    (run,) = client.get(f"/v1/schedules/{sch['id']}/runs").get_json()["runs"]
    assert (run["outcome"], run["dataset_version"], run["job_id"]) == ("building", 2, None)
    with session_scope(db_url) as s:
        dv = s.scalars(select(DatasetVersion).where(DatasetVersion.version == 2)).one()
        assert sent.calls == [(BUILD_DATASET, str(dv.id))]
        assert ds_repo.finish(s, dv, manifest={"rows": 4})
        prefix = dv.prefix_uri
    firing.run(slot + timedelta(seconds=6), settings=settings, enqueue=sent)
    (run,) = client.get(f"/v1/schedules/{sch['id']}/runs").get_json()["runs"]
    assert run["outcome"] == "started", run
    job = client.get(f"/v1/jobs/{run['job_id']}").get_json()
    assert job["spec"]["inputs"]["data_uri"] == f"{prefix}train/"
    assert job["spec"]["output"]["gate"]["holdout_uri"] == f"{prefix}holdout/"
    assert sent.calls[-1] == (ALLOCATE, run["job_id"])
    assert _count(db_url, ScheduleRun) == 1
