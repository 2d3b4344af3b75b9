"""GET /v1/quotas, admin PUT/DELETE /v1/quotas/{project}, GET /v1/usage, and a job's `usage`."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace
from typing import Any

import pytest
from flask.testing import FlaskClient

from service.api import auth
from service.backends.interfaces import Flavor
from service.db import jobs as repo
from service.db import quotas as quotas_repo
from service.db.models import Resource
from service.db.session import session_scope
from service.domain.spec import JobSpec
from service.domain.states import JobState, ResourceState

T0 = datetime(2026, 11, 1, 12, 0, tzinfo=UTC)
FLAVORS = {
    "local.small": Flavor("local.small", 1, 2048, price_per_hour=0.05),
    "gpu.2": Flavor("gpu.2", 8, 65536, gpus=2, gpu_type="A100", price_per_hour=4.0),
}


@pytest.fixture(autouse=True)
def flavors(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(quotas_repo, "flavor_table", lambda settings=None: dict(FLAVORS))


@pytest.fixture
def as_caller(monkeypatch: pytest.MonkeyPatch) -> Callable[..., None]:
    """Act as a caller of `project` with `roles` (keystone-like), whichever auth is in place."""

    def use(project: str, *roles: str) -> None:
        caller_cls = getattr(auth, "Caller", None)
        caller: Any = (
            caller_cls(project, "user-1", frozenset(roles))
            if caller_cls is not None
            else SimpleNamespace(project_id=project, roles=frozenset(roles))
        )
        monkeypatch.setattr(auth, "current", lambda: caller, raising=False)
        monkeypatch.setattr(auth, "current_project", lambda: project)

    return use


def _spec(**resources: Any) -> JobSpec:
    return JobSpec.model_validate(
        {
            "name": "q",
            "trainer": {"package_uri": "local://projects/x/p.tar.gz", "module": "trainer.task"},
            "resources": resources or {"flavor": "local.small"},
        }
    )


def _job(
    db_url: str,
    project: str,
    state: JobState = JobState.QUEUED,
    servers: list[tuple[str, datetime | None, datetime | None]] = (),  # type: ignore[assignment]
    **resources: Any,
) -> str:
    """A job in `state` with servers (flavor, active_at, deleted_at)."""
    path = {
        JobState.QUEUED: [],
        JobState.RUNNING: [JobState.ALLOCATING, JobState.PROVISIONING, JobState.RUNNING],
        JobState.SUCCEEDED: [
            JobState.ALLOCATING,
            JobState.PROVISIONING,
            JobState.RUNNING,
            JobState.EXPORTING,
            JobState.SUCCEEDED,
        ],
    }[state]
    with session_scope(db_url) as s:
        job = repo.create_job(s, project, _spec(**resources))
        prev = JobState.QUEUED
        for nxt in path:
            assert repo.transition(s, job.id, prev, nxt)
            prev = nxt
        for i, (flavor, active, deleted) in enumerate(servers):
            s.add(
                Resource(
                    job_id=job.id,
                    project_id=project,
                    backend="sandbox",
                    name=f"stackml-{job.id}-chief-{i}",
                    flavor=flavor,
                    state=(ResourceState.DELETED if deleted else ResourceState.ACTIVE).value,
                    created_at=active or T0,
                    active_at=active,
                    deleted_at=deleted,
                )
            )
        return job.id


@pytest.fixture
def client_db(client: FlaskClient, db_url: str) -> Iterator[tuple[FlaskClient, str]]:
    yield client, db_url


# -- quotas -------------------------------------------------------------------------------


def test_get_quotas_shows_defaults_and_what_the_project_uses(client_db, as_caller) -> None:
    client, db = client_db
    as_caller("local", "member", "reader")
    _job(db, "local", JobState.RUNNING, [("gpu.2", T0, None)], flavor="gpu.2")
    _job(db, "local")
    _job(db, "other", JobState.RUNNING, [("local.small", T0, None)])
    body = client.get("/v1/quotas").get_json()
    assert body == {
        "project_id": "local",
        "limits": {"jobs": 10, "servers": 10, "gpus": 4},
        "in_use": {"jobs": 1, "servers": 1, "gpus": 2},
        "queued": 1,
        "defaults": {"jobs": 10, "servers": 10, "gpus": 4},
        "overrides": {"jobs": None, "servers": None, "gpus": None},
    }
    assert client.get("/v1/quotas/local").get_json() == body


def test_a_finished_job_still_owing_its_server_counts_a_server_not_a_job(
    client_db, as_caller
) -> None:
    client, db = client_db
    as_caller("local", "reader")
    _job(db, "local", JobState.SUCCEEDED, [("gpu.2", T0, None)], flavor="gpu.2")
    assert client.get("/v1/quotas").get_json()["in_use"] == {"jobs": 0, "servers": 1, "gpus": 2}


def test_admin_sets_and_resets_a_projects_quota(client_db, as_caller) -> None:
    client, _ = client_db
    as_caller("ops", "admin")
    resp = client.put("/v1/quotas/p2", json={"jobs": 3, "gpus": 0})
    assert resp.status_code == 200, resp.get_data(as_text=True)
    body = resp.get_json()
    assert body["project_id"] == "p2"
    assert body["limits"] == {"jobs": 3, "servers": 10, "gpus": 0}
    assert body["overrides"] == {"jobs": 3, "servers": None, "gpus": 0}
    # a key left out is kept; null drops the override
    body = client.put("/v1/quotas/p2", json={"servers": 1, "jobs": None}).get_json()
    assert body["limits"] == {"jobs": 10, "servers": 1, "gpus": 0}
    assert client.get("/v1/quotas?project=p2").get_json()["limits"] == body["limits"]
    assert client.get("/v1/quotas/p2").get_json()["limits"] == body["limits"]
    assert client.delete("/v1/quotas/p2").status_code == 204
    assert client.get("/v1/quotas/p2").get_json()["overrides"] == {
        "jobs": None,
        "servers": None,
        "gpus": None,
    }
    assert client.delete("/v1/quotas/p2").status_code == 204  # idempotent
    assert client.put("/v1/quotas/p3", json={}).get_json()["overrides"]["jobs"] is None
    assert client.put("/v1/quotas/p3", json={"jobs": None}).status_code == 200


@pytest.mark.parametrize(
    "body",
    [
        {"jobs": -1},
        {"jobs": "3"},
        {"jobs": True},
        {"gpus": 1.5},
        {"cpus": 4},
        {"jobs": 2, "ram": 1},
        {"servers": 10**7},
    ],
)
def test_put_quota_rejects_bad_values_with_422(client_db, as_caller, error_of, body) -> None:
    client, _ = client_db
    as_caller("ops", "admin")
    err = error_of(client.put("/v1/quotas/p2", json=body), 422, "validation_failed")
    assert err["details"]["fields"]
    assert client.get("/v1/quotas/p2").get_json()["overrides"]["jobs"] is None


def test_put_quota_malformed_requests(client_db, as_caller, error_of) -> None:
    client, _ = client_db
    as_caller("ops", "admin")
    error_of(client.put("/v1/quotas/p2", json=[1]), 400)
    error_of(client.put("/v1/quotas/p2", data="jobs=1"), 415)
    error_of(client.put("/v1/quotas/bad$id", json={"jobs": 1}), 400, "invalid_request")
    error_of(client.get("/v1/quotas?project=bad$id"), 400, "invalid_request")


def test_non_admins_cannot_set_quotas_or_read_other_projects(
    client_db, as_caller, error_of
) -> None:
    client, _ = client_db
    as_caller("p1", "member", "reader")
    error_of(client.put("/v1/quotas/p1", json={"jobs": 50}), 403, "forbidden")
    error_of(client.delete("/v1/quotas/p1"), 403, "forbidden")
    error_of(client.get("/v1/quotas?project=p2"), 403, "forbidden")
    error_of(client.get("/v1/quotas/p2"), 403, "forbidden")
    error_of(client.get("/v1/quotas/no-such-project"), 403, "forbidden")  # same answer
    assert client.get("/v1/quotas/p1").status_code == 200
    assert client.get("/v1/quotas?project=p1").status_code == 200


def test_noauth_caller_is_admin(client_db) -> None:
    client, _ = client_db
    resp = client.put("/v1/quotas/local", json={"jobs": 1})
    assert resp.status_code == 200, resp.get_data(as_text=True)
    assert client.get("/v1/quotas").get_json()["limits"]["jobs"] == 1


# -- usage --------------------------------------------------------------------------------


def _iso(dt: datetime) -> str:
    return dt.isoformat().replace("+00:00", "Z")


def test_usage_clips_each_server_to_the_window(client_db, as_caller) -> None:
    client, db = client_db
    as_caller("p1", "reader")
    h = timedelta(hours=1)
    # 2 h of a 2-GPU server at 4.0/h, fully inside the window
    a = _job(db, "p1", JobState.SUCCEEDED, [("gpu.2", T0, T0 + 2 * h)], flavor="gpu.2")
    # 1 h before the window and 1 h inside it, on two servers (a retried attempt)
    b = _job(
        db,
        "p1",
        JobState.SUCCEEDED,
        [("local.small", T0 - 2 * h, T0 - h), ("local.small", T0 - h, T0 + h)],
    )
    # outside the window, never active, and another project: left out
    _job(db, "p1", JobState.SUCCEEDED, [("local.small", T0 - 5 * h, T0 - 4 * h)])
    _job(db, "p1", JobState.SUCCEEDED, [("local.small", None, T0 + h)])
    _job(db, "p2", JobState.SUCCEEDED, [("gpu.2", T0, T0 + h)], flavor="gpu.2")
    resp = client.get(f"/v1/usage?since={_iso(T0)}&until={_iso(T0 + 3 * h)}")
    assert resp.status_code == 200, resp.get_data(as_text=True)
    body = resp.get_json()
    assert body["project_id"] == "p1"
    assert body["since"] == "2026-11-01T12:00:00.000000Z"  # microseconds always: sorts as times
    assert body["until"] == "2026-11-01T15:00:00.000000Z"
    rows = {r["id"]: r for r in body["jobs"]}
    assert set(rows) == {a, b}
    assert rows[a] == {
        "id": a,
        "name": "q",
        "project_id": "p1",
        "state": "SUCCEEDED",
        "vm_seconds": 7200.0,
        "gpu_hours": 4.0,
        "cost": 8.0,
    }
    assert (rows[b]["vm_seconds"], rows[b]["gpu_hours"], rows[b]["cost"]) == (3600.0, 0.0, 0.05)
    assert body["totals"] == {"vm_seconds": 10800.0, "gpu_hours": 4.0, "cost": 8.05, "jobs": 2}
    assert body["projects"] == [
        {"project_id": "p1", "vm_seconds": 10800.0, "gpu_hours": 4.0, "cost": 8.05, "jobs": 2}
    ]
    # a narrower window (naive times are UTC): half an hour of job a only
    narrow = client.get("/v1/usage?since=2026-11-01T13:30:00&until=2026-11-01T14:00:00")
    assert narrow.get_json()["totals"] == {
        "vm_seconds": 1800.0,
        "gpu_hours": 1.0,
        "cost": 2.0,
        "jobs": 1,
    }


def test_usage_totals_are_the_sum_of_the_rows_shown(client_db, as_caller) -> None:
    """Three servers of 1.0006 s each show 1.001 s apiece; the totals must say 3.003 s, not the
    3.002 s that rounding the exact sum would give (a report whose rows don't add up)."""
    client, db = client_db
    as_caller("p1", "reader")
    d = timedelta(microseconds=1_000_600)
    for i in range(3):
        start = T0 + i * timedelta(minutes=1)
        _job(db, "p1", JobState.SUCCEEDED, [("local.small", start, start + d)])
    window = f"since={_iso(T0)}&until={_iso(T0 + timedelta(hours=1))}"
    body = client.get(f"/v1/usage?{window}").get_json()
    assert [r["vm_seconds"] for r in body["jobs"]] == [1.001, 1.001, 1.001]
    assert body["totals"]["vm_seconds"] == 3.003
    assert body["projects"][0]["vm_seconds"] == 3.003


def test_usage_of_a_running_server_counts_up_to_now(client_db, as_caller) -> None:
    client, db = client_db
    as_caller("p1", "reader")
    start = datetime.now(UTC) - timedelta(minutes=10)
    job_id = _job(db, "p1", JobState.RUNNING, [("local.small", start, None)])
    row = client.get("/v1/usage").get_json()["jobs"][0]
    assert row["id"] == job_id
    assert 600 <= row["vm_seconds"] < 700


def test_usage_admin_scopes(client_db, as_caller, error_of) -> None:
    client, db = client_db
    _job(db, "p1", JobState.SUCCEEDED, [("local.small", T0, T0 + timedelta(hours=1))])
    _job(db, "p2", JobState.SUCCEEDED, [("local.small", T0, T0 + timedelta(hours=2))])
    window = f"since={_iso(T0)}&until={_iso(T0 + timedelta(days=1))}"
    as_caller("p1", "member", "reader")
    error_of(client.get(f"/v1/usage?{window}&all_projects=true"), 403, "forbidden")
    error_of(client.get(f"/v1/usage?{window}&project=p2"), 403, "forbidden")
    assert client.get(f"/v1/usage?{window}&project=p1").get_json()["totals"]["jobs"] == 1
    as_caller("ops", "admin")
    assert client.get(f"/v1/usage?{window}").get_json()["totals"]["jobs"] == 0
    p2 = client.get(f"/v1/usage?{window}&project=p2").get_json()
    assert (p2["project_id"], p2["totals"]["vm_seconds"]) == ("p2", 7200.0)
    every = client.get(f"/v1/usage?{window}&all_projects=true").get_json()
    assert every["project_id"] is None
    assert [(p["project_id"], p["vm_seconds"]) for p in every["projects"]] == [
        ("p1", 3600.0),
        ("p2", 7200.0),
    ]
    assert every["totals"]["jobs"] == 2
    error_of(client.get(f"/v1/usage?{window}&all_projects=true&project=p1"), 400)


@pytest.mark.parametrize(
    "query",
    [
        "since=yesterday",
        "until=2026-13-01",
        "since=2026-11-02T00:00:00Z&until=2026-11-01T00:00:00Z",
        "since=2026-11-01T00:00:00Z&until=2026-11-01T00:00:00Z",
        "all_projects=maybe",
    ],
)
def test_usage_bad_parameters_are_400(client_db, error_of, query) -> None:
    client, _ = client_db
    error_of(client.get(f"/v1/usage?{query}"), 400, "invalid_request")


def test_a_job_carries_its_usage(client_db) -> None:
    client, db = client_db
    job_id = _job(
        db,
        "local",
        JobState.SUCCEEDED,
        [("gpu.2", T0, T0 + timedelta(minutes=30)), ("gpu.2", None, T0)],
        flavor="gpu.2",
    )
    job = client.get(f"/v1/jobs/{job_id}").get_json()
    assert job["usage"] == {"vm_seconds": 1800.0, "gpu_hours": 1.0, "cost": 2.0}
    listed = client.get("/v1/jobs").get_json()["jobs"][0]
    assert listed["usage"] == job["usage"]
    # each server carries its own share: the one that ran, and the one that never did
    assert [r["usage"] for r in job["resources"]] == [
        {"vm_seconds": 1800.0, "gpu_hours": 1.0, "cost": 2.0},
        {"vm_seconds": 0.0, "gpu_hours": 0.0, "cost": 0.0},
    ]
    assert [r["usage"] for r in listed["resources"]] == [r["usage"] for r in job["resources"]]
    fresh = _job(db, "local")
    assert client.get(f"/v1/jobs/{fresh}").get_json()["usage"] == {
        "vm_seconds": 0.0,
        "gpu_hours": 0.0,
        "cost": 0.0,
    }
