"""/v1/models/{name}/endpoints: create, read, scale, switch, delete; quotas; bad input changes
nothing (SQLite, the real app, a queue recorder)."""

from __future__ import annotations

from typing import Any

import pytest
from flask.testing import FlaskClient

from service.db.models import Endpoint, Model, ModelLabel, ModelVersion, Resource
from service.db.session import session_scope
from service.domain.states import ResourceState

CONVERGE = "stackml.converge_endpoint"


def seed(db_url: str, project: str = "local", name: str = "m") -> str:
    with session_scope(db_url) as s:
        mid = f"mdl-{name}{project}"[:40]
        s.add(Model(id=mid, project_id=project, name=name, created_by="u"))
        s.flush()
        for v, state in ((1, "READY"), (2, "READY"), (3, "CREATING")):
            s.add(
                ModelVersion(
                    model_id=mid,
                    version=v,
                    state=state,
                    artifact_uri=f"file://projects/{project}/models/x{v}/",
                    checksums={},
                    created_by="u",
                )
            )
        s.add(ModelLabel(model_id=mid, name="default", version=1))
    return mid


def js(r: Any) -> Any:
    return r.json


def count_endpoints(db_url: str) -> int:
    with session_scope(db_url) as s:
        return s.query(Endpoint).count()


def post(client: FlaskClient, path: str, body: Any) -> Any:
    return client.post(path, json=body)


def test_create_follows_the_default_label_and_enqueues(
    client: FlaskClient, db_url: str, enqueued: Any
) -> None:
    seed(db_url)
    r = post(client, "/v1/models/m/endpoints", {"replicas": 2})
    assert r.status_code == 202, r.json
    ep = js(r)
    assert ep["state"] == "CREATING" and ep["label"] == "default" and ep["version"] is None
    assert ep["target_version"] == 1 and ep["replicas"] == 2 and ep["servers"] == []
    assert ep["id"].startswith("ep-") and r.headers["Location"].endswith(ep["id"])
    assert enqueued.calls == [(CONVERGE, ep["id"])]
    assert js(client.get(f"/v1/models/m/endpoints/{ep['id']}"))["id"] == ep["id"]
    assert [e["id"] for e in js(client.get("/v1/models/m/endpoints"))["endpoints"]] == [ep["id"]]
    # one live endpoint per model
    again = post(client, "/v1/models/m/endpoints", {"version": 2})
    assert again.status_code == 409 and js(again)["error"]["code"] == "endpoint_exists"


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        ({"version": 3}, 409, "version_not_ready"),
        ({"version": 9}, 422, "validation_failed"),
        ({"label": "nope"}, 422, "validation_failed"),
        ({"label": "default", "version": 1}, 422, "validation_failed"),
        ({"replicas": 0}, 422, "validation_failed"),
        ({"replicas": 1000}, 422, "validation_failed"),
        ({"flavor": "no.such"}, 422, "validation_failed"),
        ({"traffic": {"1": 50}}, 422, "validation_failed"),
        ({"traffic": {"1": 50, "3": 50}}, 409, "version_not_ready"),
        ({"log_sample_rate": 2}, 422, "validation_failed"),
        ({"surprise": 1}, 422, "validation_failed"),
    ],
)
def test_bad_input_is_refused_and_changes_nothing(
    client: FlaskClient, db_url: str, enqueued: Any, body: Any, status: int, code: str
) -> None:
    seed(db_url)
    r = post(client, "/v1/models/m/endpoints", body)
    assert r.status_code == status, r.json
    assert js(r)["error"]["code"] == code
    assert count_endpoints(db_url) == 0 and enqueued.calls == []


def test_unknown_model_and_other_projects_are_404(client: FlaskClient, db_url: str) -> None:
    seed(db_url, project="other", name="theirs")
    assert post(client, "/v1/models/theirs/endpoints", {}).status_code == 404
    assert post(client, "/v1/models/NOPE/endpoints", {}).status_code == 404
    assert client.get("/v1/models/theirs/endpoints").status_code == 404
    seed(db_url)
    assert client.get("/v1/models/m/endpoints/ep-000000000000").status_code == 404
    assert client.get("/v1/models/m/endpoints/junk").status_code == 404


def test_patch_scales_and_switches_and_delete_drains(
    client: FlaskClient, db_url: str, enqueued: Any
) -> None:
    seed(db_url)
    ep = js(post(client, "/v1/models/m/endpoints", {"replicas": 1}))
    with session_scope(db_url) as s:
        s.get_one(Endpoint, ep["id"]).state = "READY"
    url = f"/v1/models/m/endpoints/{ep['id']}"
    r = client.patch(url, json={"replicas": 3, "version": 2})
    assert r.status_code == 202, r.json
    assert js(r)["state"] == "UPDATING" and js(r)["replicas"] == 3
    assert js(r)["version"] == 2 and js(r)["label"] is None
    bad = client.patch(url, json={"version": 3})
    assert bad.status_code == 409 and js(bad)["error"]["code"] == "version_not_ready"
    assert js(client.get(url))["version"] == 2
    d = client.delete(url)
    assert d.status_code == 202 and js(d)["state"] == "DELETING"
    assert js(client.patch(url, json={"replicas": 1}))["error"]["code"] == "endpoint_deleting"
    assert enqueued.calls.count((CONVERGE, ep["id"])) == 3


def test_deploy_alias_creates_a_pinned_endpoint_then_patches_it(
    client: FlaskClient, db_url: str
) -> None:
    seed(db_url)
    r = post(client, "/v1/models/m/versions/1/deploy", {"replicas": 2})
    assert r.status_code == 202 and js(r)["version"] == 1 and js(r)["label"] is None
    r2 = post(client, "/v1/models/m/versions/2/deploy", {})
    assert r2.status_code == 202 and js(r2)["id"] == js(r)["id"] and js(r2)["version"] == 2
    assert post(client, "/v1/models/m/versions/99999999999999/deploy", {}).status_code == 404


def test_replicas_count_against_the_project_server_quota(client: FlaskClient, db_url: str) -> None:
    seed(db_url)
    seed(db_url, name="n")
    assert client.put("/v1/quotas/local", json={"servers": 3}).status_code == 200
    r = post(client, "/v1/models/m/endpoints", {"replicas": 4})
    assert r.status_code == 409 and js(r)["error"]["code"] == "quota_exceeded", r.json
    assert count_endpoints(db_url) == 0
    assert post(client, "/v1/models/m/endpoints", {"replicas": 2}).status_code == 202
    # the first endpoint holds 2 of 3: the second may have 1, not 2
    r2 = post(client, "/v1/models/n/endpoints", {"replicas": 2})
    assert r2.status_code == 409 and js(r2)["error"]["code"] == "quota_exceeded"
    assert post(client, "/v1/models/n/endpoints", {"replicas": 1}).status_code == 202


def test_endpoint_servers_count_in_job_admission(client: FlaskClient, db_url: str) -> None:
    """A replica server is a server the project holds: jobs' admission sees it."""
    from service.db import quotas

    mid = seed(db_url)
    with session_scope(db_url) as s:
        s.add(
            Resource(
                owner_kind="endpoint",
                owner_id="ep-000000000001",
                project_id="local",
                backend="sandbox",
                role="replica",
                name="stackml-ep-000000000001-r1",
                flavor="local.small",
                state=ResourceState.ACTIVE.value,
                version=1,
            )
        )
        assert mid
        usage = quotas.in_use(s, quotas.flavor_table(), "local.small")
    assert usage["local"].servers == 1


def test_endpoint_servers_show_in_usage_and_cost(client: FlaskClient, db_url: str) -> None:
    from datetime import timedelta

    from service.db.models import utcnow

    mid = seed(db_url)
    now = utcnow()
    with session_scope(db_url) as s:
        s.add(
            Endpoint(
                id="ep-0000000000aa",
                project_id="local",
                model_id=mid,
                state="READY",
                target_label="default",
                replicas=1,
                flavor="local.small",
                created_by="u",
            )
        )
        s.add(
            Resource(
                owner_kind="endpoint",
                owner_id="ep-0000000000aa",
                project_id="local",
                backend="sandbox",
                role="replica",
                name="stackml-ep-0000000000aa-v1-aaaaaa",
                flavor="local.small",
                state=ResourceState.ACTIVE.value,
                active_at=now - timedelta(hours=1),
                version=1,
            )
        )
    r = client.get("/v1/usage")
    assert r.status_code == 200, r.json
    report = js(r)
    assert [e["id"] for e in report["endpoints"]] == ["ep-0000000000aa"]
    (row,) = report["endpoints"]
    assert row["name"] == "m/default" and row["state"] == "READY"
    assert 3590 < row["vm_seconds"] < 3700
    assert report["totals"]["vm_seconds"] == row["vm_seconds"]
    assert report["projects"][0]["vm_seconds"] == row["vm_seconds"]
