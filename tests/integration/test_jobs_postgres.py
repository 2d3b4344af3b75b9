"""The jobs API's output reservations and metric ingestion on a real PostgreSQL: the advisory
lock that makes a job's row the reservation of its output prefix, the JSON query that finds
a holder, and hostile metric lines against PostgreSQL's INTEGER and text columns."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from flask import Flask

from service.api import create_app
from service.config import Settings
from service.db import jobs as repo
from service.db.migrate import upgrade
from service.db.session import dispose_all, session_scope
from service.domain.metrics import format_metric_line
from tests.pgutil import temp_database
from tests.unit.conftest import EnqueueRecorder, job_spec, make_tarball

PKG_KEY = "projects/local/staging/abc/trainer.tar.gz"


@pytest.fixture(scope="module")
def pg() -> Iterator[str]:
    with temp_database("jobs") as url:
        upgrade(url)
        yield url


@pytest.fixture
def app(tmp_path: Path, pg: str) -> Iterator[Flask]:
    settings = Settings(
        data_dir=tmp_path / "data",
        database_url=pg,
        redis_url="redis://127.0.0.1:1/0",
        secret_key="integration-signing-key",
        auth="noauth",
        compute="sandbox",
        store="local",
        local_project="local",
    )
    app = create_app(settings, enqueue=EnqueueRecorder())
    app.extensions["stackml"].store.put(PKG_KEY, make_tarball({"trainer/task.py": b""}))
    yield app
    dispose_all()


def body(uri: str) -> dict[str, Any]:
    return job_spec(f"local://{PKG_KEY}", output={"model_uri": uri})


def test_racing_submissions_for_one_prefix_one_wins(app: Flask, monkeypatch: Any) -> None:
    real_create = repo.create_job
    both_checked = threading.Barrier(2)

    def create_job(*args: Any, **kwargs: Any) -> Any:
        try:
            both_checked.wait(timeout=2)  # without the lock both get here, then both insert
        except threading.BrokenBarrierError:
            pass  # the other waits on the advisory lock until we commit
        return real_create(*args, **kwargs)

    monkeypatch.setattr(repo, "create_job", create_job)
    statuses: list[int] = []

    def post() -> None:
        resp = app.test_client().post("/v1/jobs", json=body("local://projects/local/out/race/"))
        statuses.append(resp.status_code)

    threads = [threading.Thread(target=post) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert sorted(statuses) == [202, 409]


def test_a_held_prefix_is_found_above_below_and_escaped(app: Flask) -> None:
    client = app.test_client()
    first = client.post("/v1/jobs", json=body("local://projects/local/a_b/m/"))
    assert first.status_code == 202
    for uri, status in [
        ("local://projects/local/a_b/m", 409),
        ("local://projects/local/a_b/", 409),
        ("local://projects/local/a_b/m/deeper/", 409),
        ("local://projects/local/aXb/m/", 202),  # '_' is not a LIKE wildcard here
        ("local://projects/local/a_b/m2/", 202),
    ]:
        resp = client.post("/v1/jobs", json=body(uri))
        assert resp.status_code == status, (uri, resp.get_json())
        if status == 409:
            assert resp.get_json()["error"]["details"]["job_id"] == first.get_json()["id"]


def test_hostile_metric_lines_are_stored_or_dropped_never_fatal(app: Flask, pg: str) -> None:
    job_id = app.test_client().post("/v1/jobs", json=job_spec(f"local://{PKG_KEY}")).get_json()
    job_id = job_id["id"]
    m = '{"stackml_metric": 1, '
    lines = [
        m + '"step": 4294967296, "a": 1}',  # fits SQLite, not PostgreSQL's INTEGER
        m + '"step": ' + "9" * 20 + ', "b": 2}',
        m + '"loss": ' + "9" * 400 + ', "c": 3}',
        m + '"\\ud800": 1, "d\\u0000x": 1, "d": 4}',  # neither goes into a text column
        format_metric_line({"e": 5.0}, step=2147483647, epoch=-2147483648),
    ]
    data = ("\n".join(lines) + "\n").encode()
    with session_scope(pg) as s:
        assert repo.append_log(s, job_id, 0, data) == len(data)
    with session_scope(pg) as s:
        series = repo.metrics(s, job_id)
    assert {k: [(p["value"], p["step"]) for p in v] for k, v in series.items()} == {
        "a": [(1.0, None)],
        "b": [(2.0, None)],
        "c": [(3.0, None)],
        "d": [(4.0, None)],
        "e": [(5.0, 2147483647)],
    }
