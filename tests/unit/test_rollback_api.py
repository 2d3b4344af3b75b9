"""POST /v1/models/{name}/labels/{label}:rollback on a real SQLite database: one step back to
the version the label pointed at before its last move, as a history row (kind rollback); 409
rollback_unavailable when there is nothing to go back to or that version is not READY; a gate's
refusal rows are skipped; another project's model is a 404; nothing changes on a refusal."""

from __future__ import annotations

from typing import Any

from flask import Flask
from flask.testing import FlaskClient

from service.api import auth
from service.db import registry as repo
from service.db.session import session_scope
from tests.unit.test_auth import HeaderAuth, who
from tests.unit.test_registry_api import P, _history_rows, _ready, _version


def _model(client: FlaskClient) -> str:
    assert client.post("/v1/models", json={"name": "demo"}).status_code == 201
    return "demo"


def _label(client: FlaskClient, name: str, label: str) -> int | None:
    labels: dict[str, int] = client.get(f"/v1/models/{name}").get_json()["labels"]
    return labels.get(label)


def test_rollback_moves_the_label_back_one_step_as_history(
    client: FlaskClient, db_url: str
) -> None:
    name = _model(client)
    v1, v2, v3 = (_version(client, name) for _ in range(3))
    for v in (v1, v2, v3):
        _ready(db_url, name, v)
    for v in (v1, v2, v3):
        assert (
            client.put(f"/v1/models/{name}/labels/default", json={"version": v}).status_code == 200
        )
    r = client.post(f"/v1/models/{name}/labels/default:rollback")
    assert r.status_code == 200, r.get_json()
    assert r.get_json() == {
        "model": name,
        "label": "default",
        "version": v2,
        "from_version": v3,
        "moved": True,
    }
    assert _label(client, name, "default") == v2
    rows = client.get(f"/v1/models/{name}/history").get_json()["history"]
    last = rows[-1]
    assert (last["from_version"], last["to_version"], last["kind"]) == (v3, v2, "rollback")
    assert last["why"].startswith("rollback:")
    # a rollback is a move: rolling back again goes forward to v3
    r = client.post(
        f"/v1/models/{name}/labels/default:rollback", json={"why": "v2 was the bad one"}
    )
    assert r.get_json()["version"] == v3
    assert (
        "v2 was the bad one"
        in client.get(f"/v1/models/{name}/history").get_json()["history"][-1]["why"]
    )


def test_rollback_refusals_are_409_and_change_nothing(
    client: FlaskClient, db_url: str, error_of: Any
) -> None:
    name = _model(client)
    v1, v2 = _version(client, name), _version(client, name)
    _ready(db_url, name, v1)
    # never set: 404; set once (from nothing): nothing to roll back to
    error_of(client.post(f"/v1/models/{name}/labels/default:rollback"), 404, "not_found")
    client.put(f"/v1/models/{name}/labels/default", json={"version": v1})
    before = _history_rows(db_url)
    e = error_of(
        client.post(f"/v1/models/{name}/labels/default:rollback"), 409, "rollback_unavailable"
    )
    assert e["details"]["reason"] == "no_previous_version"
    assert "nothing to roll back to" in e["message"]
    # the previous version was deleted (no label points at it): 409, and the label stays
    _ready(db_url, name, v2)
    client.put(f"/v1/models/{name}/labels/default", json={"version": v2})
    assert client.delete(f"/v1/models/{name}/versions/{v1}").status_code == 204
    before = _history_rows(db_url)
    e = error_of(
        client.post(f"/v1/models/{name}/labels/default:rollback"), 409, "rollback_unavailable"
    )
    assert e["details"] == {
        "label": "default",
        "version": v2,
        "previous_version": v1,
        "reason": "previous_version_not_ready",
        "state": "deleted",
    }
    assert _label(client, name, "default") == v2
    assert _history_rows(db_url) == before
    # bad bodies: 422 / 415, nothing changes
    error_of(
        client.post(f"/v1/models/{name}/labels/default:rollback", json={"nope": 1}),
        422,
        "validation_failed",
    )
    error_of(
        client.post(
            f"/v1/models/{name}/labels/default:rollback", data="x", content_type="text/plain"
        ),
        415,
    )
    error_of(client.post("/v1/models/nosuch/labels/default:rollback"), 404, "not_found")
    assert _history_rows(db_url) == before


def test_rollback_skips_a_gates_refusal_rows(client: FlaskClient, db_url: str) -> None:
    name = _model(client)
    v1, v2 = _version(client, name), _version(client, name)
    _ready(db_url, name, v1)
    _ready(db_url, name, v2)
    client.put(f"/v1/models/{name}/labels/default", json={"version": v1})
    client.put(f"/v1/models/{name}/labels/default", json={"version": v2})
    with session_scope(db_url) as s:
        m = repo.find_model(s, P, name)
        repo.record_refusal(s, m, "default", by="job-x", why="gate refused (below_threshold)")
    rows = client.get(f"/v1/models/{name}/history").get_json()["history"]
    assert (rows[-1]["kind"], rows[-1]["from_version"], rows[-1]["to_version"]) == (
        "refusal",
        v2,
        v2,
    )
    at = client.get(f"/v1/models/{name}/history", query_string={"at": rows[-1]["at"]})
    assert at.get_json()["labels"] == {"default": v2}
    r = client.post(f"/v1/models/{name}/labels/default:rollback")
    assert r.status_code == 200 and r.get_json()["version"] == v1


def test_rollback_of_another_projects_model_is_404_and_readers_cannot(
    app: Flask, error_of: Any
) -> None:
    app.extensions[auth.EXTENSION] = HeaderAuth()
    rc = app.test_client()
    a, b, reader = who("proj-a", "member"), who("proj-b", "member"), who("proj-a", "reader")
    assert rc.post("/v1/models", json={"name": "demo"}, headers=a).status_code == 201
    error_of(rc.post("/v1/models/demo/labels/default:rollback", headers=b), 404, "not_found")
    error_of(rc.post("/v1/models/demo/labels/default:rollback", headers=reader), 403, "forbidden")
