"""/v1/models (the registry) through the Flask test client on a real SQLite database: models,
versions from jobs or store URIs, labels with compare-and-set and their append-only history,
per-project isolation, roles, and bad input answered with a 4xx that changes nothing."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import func, select

from service import queue
from service.api import auth
from service.db import jobs as jobs_repo
from service.db import registry as repo
from service.db.models import Endpoint, MetricRow, ModelLabelHistory, ModelVersion
from service.db.session import session_scope
from service.domain.spec import JobSpec
from tests.unit.test_auth import HeaderAuth, who

P = "local"


def _make_job(url: str, project: str, package_uri: str, state: str = "SUCCEEDED") -> str:
    spec = JobSpec.model_validate(
        {"name": "j", "trainer": {"package_uri": package_uri, "module": "m"}}
    )
    with session_scope(url) as s:
        job = jobs_repo.create_job(s, project, spec)
        job.state = state
        job.output = {"model_uri": f"local://projects/{project}/models/{job.id}/"}
        for offset, (name, value) in enumerate([("loss", 0.5), ("loss", 0.25), ("mae", 0.1)]):
            s.add(MetricRow(job_id=job.id, name=name, value=value, log_offset=offset))
        return job.id


def _ready(url: str, name: str, version: int, project: str = P) -> None:
    with session_scope(url) as s:
        model = repo.find_model(s, project, name)
        mv = repo.get_version(s, model, version)
        assert repo.finish_version(s, mv, checksums={}, signature={"method_name": "m"})


def _add_endpoint(url: str, name: str, **target: Any) -> None:
    """A READY endpoint `ep-0123456789ab` of model `name` (project P) following `target`."""
    with session_scope(url) as s:
        m = repo.find_model(s, P, name)
        s.add(
            Endpoint(
                id="ep-0123456789ab",
                project_id=P,
                model_id=m.id,
                state="READY",
                replicas=1,
                flavor="m1.small",
                created_by="u",
                **target,
            )
        )


def _history_rows(url: str) -> int:
    with session_scope(url) as s:
        return int(s.scalar(select(func.count()).select_from(ModelLabelHistory)) or 0)


@pytest.fixture
def model(client: FlaskClient) -> str:
    r = client.post("/v1/models", json={"name": "mnist", "description": "digits"})
    assert r.status_code == 201, r.get_json()
    return "mnist"


def _version(client: FlaskClient, name: str, project_uri: str | None = None) -> int:
    uri = project_uri or f"local://projects/{P}/models/exported/"
    r = client.post(f"/v1/models/{name}/versions", json={"artifact_uri": uri})
    assert r.status_code == 202, r.get_json()
    return int(r.get_json()["version"])


# -- models -----------------------------------------------------------------------------------


def test_create_list_get_delete_model(client: FlaskClient, error_of: Any) -> None:
    r = client.post("/v1/models", json={"name": "mnist", "description": "digits"})
    assert r.status_code == 201
    body = r.get_json()
    assert body["id"].startswith("mdl-") and len(body["id"]) == 16
    assert body["name"] == "mnist" and body["labels"] == {} and body["endpoint"] is None
    assert r.headers["Location"].endswith("/v1/models/mnist")
    error_of(client.post("/v1/models", json={"name": "mnist"}), 409, "model_exists")
    assert [m["name"] for m in client.get("/v1/models").get_json()["models"]] == ["mnist"]
    assert client.get("/v1/models/mnist").get_json()["description"] == "digits"
    assert client.delete("/v1/models/mnist").status_code == 204
    error_of(client.get("/v1/models/mnist"), 404, "not_found")


@pytest.mark.parametrize(
    "body",
    [
        {"name": "Mnist"},
        {"name": "a:predict"},
        {"name": "a/b"},
        {"name": "9lives"},
        {"name": "x" * 64},
        {"name": ""},
        {"name": 3},
        {},
        {"name": "ok", "extra": 1},
        {"name": "ok", "description": "d" * 5000},
    ],
)
def test_bad_model_bodies_are_422_and_create_nothing(
    client: FlaskClient, error_of: Any, body: dict[str, Any]
) -> None:
    error_of(client.post("/v1/models", json=body), 422, "validation_failed")
    assert client.get("/v1/models").get_json()["models"] == []


def test_model_delete_refused_while_an_endpoint_exists(
    client: FlaskClient, db_url: str, model: str, error_of: Any
) -> None:
    _add_endpoint(db_url, model, target_label="default")
    error_of(client.delete(f"/v1/models/{model}"), 409, "endpoint_exists")
    assert client.get(f"/v1/models/{model}").get_json()["endpoint"]["id"] == "ep-0123456789ab"
    with session_scope(db_url) as s:
        s.get(Endpoint, "ep-0123456789ab").state = "DELETED"  # type: ignore[union-attr]
    assert client.delete(f"/v1/models/{model}").status_code == 204


def test_model_delete_waits_for_a_deleted_endpoints_trust(
    client: FlaskClient, db_url: str, model: str, error_of: Any
) -> None:
    # the endpoint is DELETED but its Keystone trust is not released yet (Keystone was down):
    # deleting the model would drop the row the reconciler retries from, leaking the trust
    _add_endpoint(db_url, model, target_label="default")
    with session_scope(db_url) as s:
        ep = s.get(Endpoint, "ep-0123456789ab")
        assert ep is not None
        ep.state, ep.trust_id = "DELETED", "trust-0123"
    err = error_of(client.delete(f"/v1/models/{model}"), 409, "teardown_pending")
    assert err["details"]["trust_held"] is True and "trust-0123" not in str(err)
    assert client.get(f"/v1/models/{model}").status_code == 200  # nothing deleted
    with session_scope(db_url) as s:
        ep = s.get(Endpoint, "ep-0123456789ab")
        assert ep is not None
        ep.trust_id = None  # released
    assert client.delete(f"/v1/models/{model}").status_code == 204


# -- versions ---------------------------------------------------------------------------------


def test_version_from_a_succeeded_job_records_its_metrics_and_is_registered_by_a_worker(
    client: FlaskClient, db_url: str, model: str, package_uri: str, enqueued: Any
) -> None:
    job_id = _make_job(db_url, P, package_uri)
    r = client.post(f"/v1/models/{model}/versions", json={"job_id": job_id})
    assert r.status_code == 202, r.get_json()
    v = r.get_json()
    assert v["version"] == 1 and v["state"] == "CREATING"
    assert v["source_job_id"] == job_id
    assert v["artifact_uri"] == f"local://projects/{P}/models/{job_id}/"
    assert v["metrics"] == {"loss": 0.25, "mae": 0.1}  # the final value of each
    assert r.headers["Location"].endswith(f"/v1/models/{model}/versions/1")
    with session_scope(db_url) as s:
        mv_id = s.scalar(select(ModelVersion.id))
    assert enqueued.calls == [(queue.REGISTER_VERSION, str(mv_id))]
    assert client.get(f"/v1/models/{model}/versions/1").get_json()["state"] == "CREATING"


def test_version_from_a_job_not_succeeded_or_of_another_project(
    client: FlaskClient, db_url: str, model: str, package_uri: str, error_of: Any, enqueued: Any
) -> None:
    running = _make_job(db_url, P, package_uri, state="RUNNING")
    error_of(
        client.post(f"/v1/models/{model}/versions", json={"job_id": running}),
        409,
        "job_not_succeeded",
    )
    theirs = _make_job(db_url, "other", package_uri)
    error_of(client.post(f"/v1/models/{model}/versions", json={"job_id": theirs}), 404)
    error_of(client.post(f"/v1/models/{model}/versions", json={"job_id": "job-nope"}), 404)
    assert client.get(f"/v1/models/{model}/versions").get_json()["versions"] == []
    assert enqueued.calls == []


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"job_id": "job-x", "artifact_uri": "local://projects/local/models/a/"},
        {"artifact_uri": "file://projects/local/models/a/"},
        {"artifact_uri": "local://projects/other/models/a/"},
        {"artifact_uri": "local://projects/local/"},
        {"artifact_uri": "local://projects/local/../other/models/"},
        {"artifact_uri": "local://projects/local//x/"},
        {"artifact_uri": "local://projects/local/models/a\tb/"},
        {"artifact_uri": "local://projects/local/./models/"},
        {"artifact_uri": "local://projects/local/" + "m" * 1100 + "/"},
        {"artifact_uri": "not a uri"},
        {"artifact_uri": 5},
        {"job_id": ["x"]},
        {"artifact_uri": "local://projects/local/models/a/", "extra": True},
    ],
)
def test_bad_version_bodies_are_422_and_create_nothing(
    client: FlaskClient, model: str, error_of: Any, enqueued: Any, body: dict[str, Any]
) -> None:
    error_of(client.post(f"/v1/models/{model}/versions", json=body), 422, "validation_failed")
    assert client.get(f"/v1/models/{model}/versions").get_json()["versions"] == []
    assert enqueued.calls == []


def test_version_numbers_are_in_order_and_never_reused(
    client: FlaskClient, model: str, error_of: Any
) -> None:
    assert [_version(client, model) for _ in range(3)] == [1, 2, 3]
    assert client.delete(f"/v1/models/{model}/versions/3").status_code == 204
    error_of(client.get(f"/v1/models/{model}/versions/3"), 404)
    assert _version(client, model) == 4
    listed = client.get(f"/v1/models/{model}/versions").get_json()["versions"]
    assert [v["version"] for v in listed] == [1, 2, 4]
    assert client.get(f"/v1/models/{model}").get_json()["latest_version"] == 4
    error_of(client.get(f"/v1/models/{model}/versions/99999999999999999999"), 404)
    error_of(client.delete(f"/v1/models/{model}/versions/0"), 404)


# -- labels -----------------------------------------------------------------------------------


def test_labels_move_with_compare_and_set_and_every_move_is_history(
    client: FlaskClient, db_url: str, model: str, error_of: Any
) -> None:
    v1, v2 = _version(client, model), _version(client, model)
    url = f"/v1/models/{model}/labels/default"
    error_of(client.put(url, json={"version": v1}), 409, "version_not_ready")
    _ready(db_url, model, v1)
    _ready(db_url, model, v2)
    error_of(client.put(url, json={"version": v1, "expected_version": 7}), 409, "label_moved")
    r = client.put(url, json={"version": v1, "expected_version": None, "why": "first"})
    assert r.status_code == 200, r.get_json()
    assert r.get_json() == {
        "model": model,
        "label": "default",
        "version": v1,
        "from_version": None,
        "moved": True,
    }
    # the label exists now: "expected absent" loses, a stale expectation loses, nothing changes
    error_of(client.put(url, json={"version": v2, "expected_version": None}), 409, "label_moved")
    moved = error_of(client.put(url, json={"version": v2, "expected_version": v2}), 409)
    assert moved["details"]["version"] == v1
    assert _history_rows(db_url) == 1
    r = client.post(f"/v1/models/{model}/default", json={"version": v2, "expected_version": v1})
    assert r.get_json()["from_version"] == v1
    # the same target again is not a move
    assert client.put(url, json={"version": v2}).get_json()["moved"] is False
    assert client.put(f"/v1/models/{model}/labels/canary", json={"version": v1}).status_code == 200
    assert client.get(f"/v1/models/{model}").get_json()["labels"] == {"canary": v1, "default": v2}
    assert client.get(f"/v1/models/{model}/versions/{v1}").get_json()["labels"] == ["canary"]
    r = client.delete(f"/v1/models/{model}/labels/canary?why=done")
    assert r.status_code == 200 and r.get_json()["from_version"] == v1
    rows = client.get(f"/v1/models/{model}/history").get_json()["history"]
    assert [(h["label"], h["from_version"], h["to_version"]) for h in rows] == [
        ("default", None, v1),
        ("default", v1, v2),
        ("canary", None, v1),
        ("canary", v1, None),
    ]
    assert rows[0]["why"] == "first" and rows[-1]["why"] == "done"
    assert rows[0]["by"] == "local"
    only = client.get(f"/v1/models/{model}/history?label=canary").get_json()["history"]
    assert len(only) == 2
    error_of(client.delete(f"/v1/models/{model}/labels/canary"), 404)


def test_history_at_answers_which_version_each_label_pointed_at(
    client: FlaskClient, db_url: str, model: str
) -> None:
    v1, v2 = _version(client, model), _version(client, model)
    _ready(db_url, model, v1)
    _ready(db_url, model, v2)
    before = datetime.now(UTC) - timedelta(seconds=1)
    client.put(f"/v1/models/{model}/labels/default", json={"version": v1})
    client.put(f"/v1/models/{model}/labels/canary", json={"version": v2})
    rows = client.get(f"/v1/models/{model}/history").get_json()["history"]
    t_first = rows[1]["at"]  # after both were set
    client.put(f"/v1/models/{model}/labels/default", json={"version": v2})
    client.delete(f"/v1/models/{model}/labels/canary")

    def at(t: str) -> dict[str, Any]:
        r = client.get(f"/v1/models/{model}/history", query_string={"at": t})
        assert r.status_code == 200, r.get_json()
        return dict(r.get_json()["labels"])

    assert at(before.isoformat()) == {}
    assert at(t_first) == {"default": v1, "canary": v2}
    assert at(datetime.now(UTC).isoformat()) == {"default": v2, "canary": None}
    # a naive time is UTC; another zone is converted
    naive = datetime.now(UTC).replace(tzinfo=None).isoformat()
    assert at(naive)["default"] == v2
    assert at((before + timedelta(hours=5)).astimezone(UTC).isoformat())["default"] == v2


def test_labelled_or_served_versions_cannot_be_deleted(
    client: FlaskClient, db_url: str, model: str, error_of: Any
) -> None:
    v1, v2 = _version(client, model), _version(client, model)
    _ready(db_url, model, v1)
    _ready(db_url, model, v2)
    client.put(f"/v1/models/{model}/labels/default", json={"version": v1})
    err = error_of(client.delete(f"/v1/models/{model}/versions/{v1}"), 409, "version_in_use")
    assert err["details"]["labels"] == ["default"]
    _add_endpoint(db_url, model, target_version=v2, serving_version=v2)
    error_of(client.delete(f"/v1/models/{model}/versions/{v2}"), 409, "version_in_use")
    assert len(client.get(f"/v1/models/{model}/versions").get_json()["versions"]) == 2


def test_a_label_an_endpoint_follows_cannot_be_removed(
    client: FlaskClient, db_url: str, model: str, error_of: Any
) -> None:
    v1 = _version(client, model)
    _ready(db_url, model, v1)
    client.put(f"/v1/models/{model}/labels/default", json={"version": v1})
    _add_endpoint(db_url, model, target_label="default")
    error_of(client.delete(f"/v1/models/{model}/labels/default"), 409, "label_in_use")
    assert client.get(f"/v1/models/{model}").get_json()["labels"] == {"default": v1}


@pytest.mark.parametrize(
    "path, body, status",
    [
        ("labels/default", {"version": 0}, 422),
        ("labels/default", {"version": "1"}, 422),
        ("labels/default", {"version": True}, 422),
        ("labels/default", {"version": 2**40}, 422),
        ("labels/default", {}, 422),
        ("labels/default", {"version": 1, "why": "w" * 2000}, 422),
        ("labels/default", {"version": 1, "expected_version": "x"}, 422),
        ("labels/Bad:Label", {"version": 1}, 422),
        ("labels/default", {"version": 99}, 404),
        ("default", {"version": 99}, 404),
        ("default", {"version": 1, "label": "x"}, 422),
    ],
)
def test_bad_label_moves_change_nothing(
    client: FlaskClient,
    db_url: str,
    model: str,
    error_of: Any,
    path: str,
    body: dict[str, Any],
    status: int,
) -> None:
    _ready(db_url, model, _version(client, model))
    method = client.post if path == "default" else client.put
    error_of(method(f"/v1/models/{model}/{path}", json=body), status)
    assert _history_rows(db_url) == 0
    assert client.get(f"/v1/models/{model}").get_json()["labels"] == {}


@pytest.mark.parametrize(
    "query", ["at=yesterday", "at=2026-13-01", "at=0001-01-01T00:00:00%2B05:00", "label=Bad!"]
)
def test_bad_history_queries_are_400(
    client: FlaskClient, model: str, error_of: Any, query: str
) -> None:
    error_of(client.get(f"/v1/models/{model}/history?{query}"), 400, "invalid_request")


def test_non_json_bodies_are_415(client: FlaskClient, model: str, error_of: Any) -> None:
    error_of(client.post("/v1/models", data="name=x"), 415)
    error_of(client.put(f"/v1/models/{model}/labels/default", data="1"), 415)


# -- projects and roles -----------------------------------------------------------------------


@pytest.fixture
def rc(app: Flask) -> FlaskClient:
    app.extensions[auth.EXTENSION] = HeaderAuth()
    return app.test_client()


def test_models_are_invisible_across_projects(rc: FlaskClient, error_of: Any) -> None:
    a, b = who("proj-a", "member"), who("proj-b", "member")
    assert rc.post("/v1/models", json={"name": "m"}, headers=a).status_code == 201
    assert (
        rc.post(
            "/v1/models/m/versions", json={"artifact_uri": "local://projects/proj-a/x/"}, headers=a
        ).status_code
        == 202
    )
    assert rc.get("/v1/models", headers=b).get_json()["models"] == []
    for method, path in [
        ("get", "/v1/models/m"),
        ("delete", "/v1/models/m"),
        ("get", "/v1/models/m/versions"),
        ("get", "/v1/models/m/versions/1"),
        ("delete", "/v1/models/m/versions/1"),
        ("get", "/v1/models/m/history"),
        ("delete", "/v1/models/m/labels/default"),
    ]:
        error_of(getattr(rc, method)(path, headers=b), 404)
    error_of(rc.put("/v1/models/m/labels/default", json={"version": 1}, headers=b), 404)
    # b has its own namespace: the same name is free there
    assert rc.post("/v1/models", json={"name": "m"}, headers=b).status_code == 201
    assert rc.get("/v1/models/m/versions", headers=b).get_json()["versions"] == []
    assert len(rc.get("/v1/models/m/versions", headers=a).get_json()["versions"]) == 1


def test_readers_read_members_write(rc: FlaskClient, error_of: Any) -> None:
    member, reader = who("p", "member"), who("p", "reader")
    assert rc.post("/v1/models", json={"name": "m"}, headers=member).status_code == 201
    assert rc.get("/v1/models/m", headers=reader).status_code == 200
    assert rc.get("/v1/models/m/history", headers=reader).status_code == 200
    error_of(rc.post("/v1/models", json={"name": "n"}, headers=reader), 403, "forbidden")
    error_of(rc.delete("/v1/models/m", headers=reader), 403)
    error_of(
        rc.post(
            "/v1/models/m/versions", json={"artifact_uri": "local://projects/p/x/"}, headers=reader
        ),
        403,
    )
    assert [m["name"] for m in rc.get("/v1/models", headers=member).get_json()["models"]] == ["m"]


# -- output.register_as -------------------------------------------------------------------------


def test_a_job_may_ask_to_register_its_model(
    client: FlaskClient, package_uri: str, spec: Any, error_of: Any
) -> None:
    r = client.post("/v1/jobs", json=spec(package_uri, output={"register_as": "mnist"}))
    assert r.status_code == 202, r.get_json()
    assert r.get_json()["spec"]["output"]["register_as"] == "mnist"
    # a model name, not a job name: no capitals, dots or ':'
    for bad in ("Mnist", "m.v2", "m:predict"):
        err = error_of(
            client.post("/v1/jobs", json=spec(package_uri, output={"register_as": bad})), 422
        )
        assert "output.register_as" in [f["field"] for f in err["details"]["fields"]]
