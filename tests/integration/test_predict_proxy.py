"""The prediction proxy in front of the real model server (workers/vm/model_server.py under the
TensorFlow runtime's python, serving real SavedModels), with PostgreSQL at the migrations'
head: the answers through the API match the SavedModel loaded directly, every answer names
its version, and a replica killed mid-load (SIGKILL) costs no request."""

from __future__ import annotations

import json
import threading
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from flask import Flask

from service.api import create_app
from service.config import Settings
from service.db.migrate import upgrade
from tests.integration.test_model_server import Running, start_server
from tests.integration.test_model_server import expected as expected
from tests.integration.test_model_server import models as models
from tests.integration.test_model_server import runtime_python as runtime_python
from tests.pgutil import temp_database
from tests.unit.replicas import add_model, add_replica


@pytest.fixture(scope="module")
def pg() -> Iterator[str]:
    with temp_database("predict") as url:
        upgrade(url)
        yield url


@pytest.fixture
def app(tmp_path: Path, pg: str) -> Flask:
    settings = Settings(
        data_dir=tmp_path / "data",
        database_url=pg,
        redis_url="redis://127.0.0.1:1/0",
        secret_key="integration-key",
        auth="noauth",
        store="local",
        host="127.0.0.1",
        local_project=f"p{uuid.uuid4().hex[:8]}",  # a project of its own in the module's db
        predict_route_cache_seconds=0.2,
    )
    return create_app(settings, enqueue=lambda t, j: None)


def project_of(app: Flask) -> str:
    return str(app.extensions["stackml"].settings.local_project)


@pytest.fixture
def servers(
    runtime_python: Path,
    models: Path,
    tmp_path: Path,
) -> Iterator[list[Running]]:
    """Two replicas of model `lin` (versions 1 and 2 each), as the endpoint would run them."""
    started = [
        start_server(runtime_python, models / "linear", "lin", tmp_path, ours=True)
        for _ in range(2)
    ]
    yield started
    for r in started:
        if r.proc.poll() is None:
            r.proc.kill()
        r.proc.wait(15)


def close(got: Any, want: Any, tol: float = 1e-4) -> None:
    assert len(got) == len(want)
    for g_row, w_row in zip(got, want, strict=True):
        for g, w in zip(g_row, w_row, strict=True):
            assert abs(g - w) <= tol * max(1.0, abs(w)), (g, w)


def test_predictions_through_the_api_match_the_savedmodel(app, pg, servers, expected):
    name = "lin"  # the replicas serve the model under its registry name
    _, ep = add_model(pg, name, project=project_of(app), versions=(1, 2), labels={"next": 2})
    for r in servers:
        add_replica(pg, ep, r.port, 1, project=project_of(app))
        add_replica(pg, ep, r.port, 2, project=project_of(app))
    client = app.test_client()
    rows = expected["rows"]
    for path, version in (
        (f"/v1/models/{name}:predict", "1"),
        (f"/v1/models/{name}/versions/2:predict", "2"),
        (f"/v1/models/{name}/labels/next:predict", "2"),
    ):
        r = client.post(path, json={"instances": rows})
        assert r.status_code == 200, r.get_data(as_text=True)
        assert r.headers["X-Model-Version"] == version and r.headers["X-Request-Id"]
        close(r.get_json()["predictions"], expected["linear"][version]["direct"])
    # columnar format, and metadata
    r = client.post(f"/v1/models/{name}:predict", json={"inputs": {"x": rows}})
    assert r.status_code == 200
    close(r.get_json()["outputs"], expected["linear"]["1"]["direct"])
    meta = client.get(f"/v1/models/{name}/metadata")
    assert meta.status_code == 200 and meta.get_json()["model_spec"]["version"] == "1"
    # the server's own errors pass through in TF Serving's shape
    r = client.post(f"/v1/models/{name}:predict", json={"instances": [[1.0, 2.0]]})
    assert r.status_code == 400 and set(r.get_json()) == {"error"}
    assert r.headers["X-Model-Version"] == "1"
    r = client.post(f"/v1/models/{name}:classify", json={"examples": [{"x": [1.0]}]})
    assert r.status_code == 400 and set(r.get_json()) == {"error"}


def test_a_replica_killed_mid_load_costs_no_request(app, pg, servers, expected):
    project = project_of(app)
    _, ep = add_model(pg, "lin", project=project, versions=(1, 2))
    for r in servers:
        add_replica(pg, ep, r.port, 1, project=project)
    rows = expected["rows"][:1]
    want = expected["linear"]["1"]["direct"][:1]
    statuses: Counter[int] = Counter()
    bad: list[str] = []
    half = threading.Event()

    def load() -> None:
        c = app.test_client()
        for i in range(120):
            if i == 40:
                half.set()
            r = c.post("/v1/models/lin:predict", data=json.dumps({"instances": rows}),
                       content_type="application/json")  # fmt: skip
            statuses[r.status_code] += 1
            if r.status_code != 200:
                bad.append(r.get_data(as_text=True))
            else:
                close(r.get_json()["predictions"], want)

    threads = [threading.Thread(target=load) for _ in range(3)]
    for t in threads:
        t.start()
    assert half.wait(120)
    servers[0].proc.kill()  # SIGKILL: its connections die with it
    for t in threads:
        t.join(300)
    assert bad == [] and statuses == {200: 360}
