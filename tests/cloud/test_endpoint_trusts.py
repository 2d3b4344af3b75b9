"""Creating an endpoint with Keystone auth and tenancy=project (service/api/endpoints.py), against
the devcloud's REAL Keystone (and the Nova emulator for the flavors), the API in this process on
a real PostgreSQL database: the create makes one trust from the caller to stackml's service user
on the caller's project and stores its id in `endpoints.trust_id`; a create refused before the
trust (an endpoint exists, a version not READY) makes none; and a create refused after the trust
was made (another request created the model's endpoint meanwhile: the unique live index) deletes
that trust again, so no trust outlives a failed request. (The workers' side: the endpoint's
replicas in the caller's project, its trust deleted once it is DELETED, is
tests/cloud/test_serving_openstack.py.)"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import requests
from werkzeug.serving import make_server

from devcloud.cloud import DevCloud
from service import trusts
from service.api import create_app
from service.config import Settings
from service.db import quotas
from service.db.migrate import upgrade
from service.db.models import Endpoint, Model, ModelLabel, ModelVersion
from service.db.session import dispose_all, session_scope
from tests.envutil import environ
from tests.pgutil import temp_database

MODEL = "trusted"


def _authtoken(cloud: DevCloud) -> dict[str, str]:
    return {
        "auth_url": cloud.auth_url,
        "username": "stackml",
        "password": cloud.password("stackml"),
        "project_name": "service",
        "region_name": "RegionOne",
        "token_cache_time": "300",
    }


@pytest.fixture(scope="module")
def api(
    devcloud_emulator: DevCloud, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, Settings]]:
    """The API (keystone auth, openstack compute, tenancy=project) served in this process on a
    migrated PostgreSQL database; the queue is a no-op (no worker: the API's side alone)."""
    tmp = tmp_path_factory.mktemp("eptrust")
    with (
        environ({"OS_CLIENT_CONFIG_FILE": str(devcloud_emulator.clouds_yaml)}),
        temp_database("eptrust") as db_url,
    ):
        upgrade(db_url)
        settings = Settings(
            data_dir=tmp / "data",
            database_url=db_url,
            redis_url="memory://",
            secret_key="endpoint-trust-test-key",
            auth="keystone",
            compute="openstack",
            tenancy="project",
            store="local",
            openstack_cloud="devcloud-stackml",
            default_flavor="m1.small",
            keystone_authtoken=_authtoken(devcloud_emulator),
        )
        assert trusts.enabled(settings)
        app = create_app(settings, enqueue=lambda task, oid: None)
        server = make_server("127.0.0.1", 0, app, threaded=True)
        thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
        thread.start()
        try:
            yield f"http://127.0.0.1:{server.server_port}", settings
        finally:
            server.shutdown()
            server.server_close()
            thread.join(timeout=10)
            dispose_all()


@pytest.fixture
def demo(api: tuple[str, Settings], devcloud_emulator: DevCloud) -> Iterator[Any]:
    """The devcloud's demo user (a member of project demo), with model `trusted` in its project
    (versions 1 READY, 2 not yet); afterwards the database is emptied and every trust this
    test left is deleted."""
    _, settings = api
    conn = devcloud_emulator.connection("devcloud-demo")
    before = _trusts_of(devcloud_emulator, str(conn.current_user_id))
    project = str(conn.current_project_id)
    with session_scope(settings.db_url) as s:
        s.add(Model(id="mdl-trusted", project_id=project, name=MODEL, created_by="t"))
        s.flush()
        for v, state in ((1, "READY"), (2, "CREATING")):
            s.add(
                ModelVersion(
                    model_id="mdl-trusted",
                    version=v,
                    state=state,
                    artifact_uri=f"file://projects/{project}/models/x{v}/",
                    checksums={},
                    created_by="t",
                )
            )
        s.add(ModelLabel(model_id="mdl-trusted", name="default", version=1))
    yield conn
    left = _trusts_of(devcloud_emulator, str(conn.current_user_id)) - before
    for trust_id in left:
        trusts.delete(settings, trust_id)
    with session_scope(settings.db_url) as s:
        for table in ("resources", "endpoints", "model_labels", "model_versions", "models"):
            s.execute(Endpoint.metadata.tables[table].delete())


def _trusts_of(cloud: DevCloud, user_id: str) -> set[str]:
    admin = cloud.connection("devcloud")
    return {t.id for t in admin.identity.trusts(trustor_user_id=user_id)}


def _post(url: str, token: str, path: str, body: dict[str, Any]) -> requests.Response:
    return requests.post(url + path, json=body, headers={"X-Auth-Token": token}, timeout=60)


def _endpoints(settings: Settings) -> list[tuple[str, str | None]]:
    with session_scope(settings.db_url) as s:
        return [(e.id, e.trust_id) for e in s.query(Endpoint).order_by(Endpoint.id)]


def test_create_makes_one_trust_on_the_callers_project_and_stores_it(
    api: tuple[str, Settings], demo: Any, devcloud_emulator: DevCloud
) -> None:
    url, settings = api
    cloud = devcloud_emulator
    token, user_id = str(demo.session.get_token()), str(demo.current_user_id)
    before = _trusts_of(cloud, user_id)

    # refused before any trust is asked for: a version not READY
    r = _post(url, token, f"/v1/models/{MODEL}/endpoints", {"version": 2})
    assert r.status_code == 409 and r.json()["error"]["code"] == "version_not_ready", r.text
    assert _trusts_of(cloud, user_id) == before and _endpoints(settings) == []

    r = _post(url, token, f"/v1/models/{MODEL}/versions/1/deploy", {"replicas": 1})
    assert r.status_code == 202, r.text
    assert "trust_id" not in r.json()  # the trust id is never shown
    made = _trusts_of(cloud, user_id) - before
    assert len(made) == 1, made
    (trust_id,) = made
    assert _endpoints(settings) == [(r.json()["id"], trust_id)]
    trust = cloud.connection("devcloud").identity.get_trust(trust_id)
    assert trust.project_id == demo.current_project_id
    assert trust.trustee_user_id == trusts.trustee_user_id(settings)
    assert trust.is_impersonation

    # refused before any trust is asked for: the model has its endpoint
    again = _post(url, token, f"/v1/models/{MODEL}/endpoints", {})
    assert again.status_code == 409 and again.json()["error"]["code"] == "endpoint_exists"
    assert _trusts_of(cloud, user_id) - before == made


def test_a_create_refused_after_its_trust_was_made_leaves_no_trust(
    api: tuple[str, Settings], demo: Any, devcloud_emulator: DevCloud
) -> None:
    """The quota lock is held here while the request runs: it passes its checks, makes its trust
    and waits for the lock; another endpoint of the model is stored meanwhile; once the lock is
    let go its insert meets the unique live index: 409, and the trust it made is deleted."""
    url, settings = api
    cloud = devcloud_emulator
    token, user_id = str(demo.session.get_token()), str(demo.current_user_id)
    before = _trusts_of(cloud, user_id)
    answer: list[requests.Response] = []
    with session_scope(settings.db_url) as held:
        quotas.lock(held)  # until this transaction ends
        request = threading.Thread(
            target=lambda: answer.append(_post(url, token, f"/v1/models/{MODEL}/endpoints", {}))
        )
        request.start()
        deadline = time.monotonic() + 30
        while not _trusts_of(cloud, user_id) - before:
            assert time.monotonic() < deadline, f"no trust made; answer: {answer}"
            assert not answer, answer[0].text
            time.sleep(0.1)
        (made,) = _trusts_of(cloud, user_id) - before
        time.sleep(0.5)  # (the request now waits for the lock)
        assert not answer, answer[0].text
        with session_scope(settings.db_url) as other:
            other.add(
                Endpoint(
                    id="ep-0000000000aa",
                    project_id=str(demo.current_project_id),
                    model_id="mdl-trusted",
                    state="CREATING",
                    target_label="default",
                    replicas=1,
                    flavor="m1.small",
                    created_by="another request",
                )
            )
    request.join(timeout=60)
    assert answer, "the request did not answer"
    r = answer[0]
    assert r.status_code == 409 and r.json()["error"]["code"] == "endpoint_exists", r.text
    assert _endpoints(settings) == [("ep-0000000000aa", None)]
    assert made not in _trusts_of(cloud, user_id), "the refused create's trust outlived it"
    assert _trusts_of(cloud, user_id) == before


def test_no_trust_means_no_endpoint(
    api: tuple[str, Settings], demo: Any, devcloud_emulator: DevCloud
) -> None:
    """A trust that cannot be made (none of the caller's roles is one `trust_roles` allows):
    403 that says so, no endpoint stored, no trust in Keystone."""
    _, settings = api
    cloud = devcloud_emulator
    token, user_id = str(demo.session.get_token()), str(demo.current_user_id)
    before = _trusts_of(cloud, user_id)
    narrow = settings.model_copy(update={"trust_roles": ["no-such-role"]})
    app = create_app(narrow, enqueue=lambda task, oid: None)
    with app.test_client() as client:
        r = client.post(f"/v1/models/{MODEL}/endpoints", json={}, headers={"X-Auth-Token": token})
    assert r.status_code == 403, r.json
    assert "trust_roles" in r.json["error"]["message"]
    assert _endpoints(settings) == [] and _trusts_of(cloud, user_id) == before
