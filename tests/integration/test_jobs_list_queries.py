"""GET /v1/jobs on a real PostgreSQL: a page costs the same number of SQL statements whatever
it holds (servers and latest metric values are read for the whole page at once), shows each job
exactly as GET /v1/jobs/{id} does, and asks the compute backend nothing (on openstack: its
flavor catalogue once a request, for pricing, never once a job)."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from sqlalchemy import event, update

from service.api import create_app
from service.backends import registry
from service.backends.interfaces import Flavor
from service.config import Settings
from service.db import jobs as repo
from service.db import quotas
from service.db.migrate import upgrade
from service.db.models import Resource, utcnow
from service.db.session import dispose_all, engine_for, session_scope
from service.domain.metrics import format_metric_line
from service.domain.spec import JobSpec
from service.domain.states import JobState, ResourceState
from tests.pgutil import temp_database
from tests.unit.conftest import EnqueueRecorder

JOBS = 60
FLAVORS = ("local.small", "local.medium")


def _seed(url: str) -> None:
    """JOBS jobs through the repository: two of every three ran (a server that reached ACTIVE,
    deleted again for half of them, and metric lines in their log); the rest are queued."""
    for i in range(JOBS):
        spec = JobSpec.model_validate(
            {
                "name": f"list-{i}",
                "trainer": {
                    "package_uri": "local://projects/local/staging/abc/trainer.tar.gz",
                    "module": "trainer.task",
                },
                "resources": {"flavor": FLAVORS[i % 2]},
                "env": {"TOKEN": "secret"},
                "labels": {"team": "vision" if i % 2 else "nlp"},
            }
        )
        with session_scope(url) as s:
            job_id = repo.create_job(s, "local", spec).id
        if i % 3 == 0:
            continue
        with session_scope(url) as s:
            assert repo.transition(s, job_id, JobState.QUEUED, JobState.ALLOCATING)
            for role in ("chief", "worker") if i % 5 == 0 else ("chief",):
                s.add(
                    Resource(
                        job_id=job_id,
                        owner_id=job_id,
                        project_id="local",
                        backend="sandbox",
                        role=role,
                        name=f"stackml-{job_id}-{role}-0",
                        flavor=FLAVORS[i % 2],
                        state=ResourceState.BOOTING.value,
                    )
                )
            s.flush()
            started = utcnow() - timedelta(minutes=10 + i)
            gone = i % 2 == 0
            s.execute(
                update(Resource)
                .where(Resource.job_id == job_id)
                .values(
                    server_id=f"srv-{i}",
                    active_at=started,
                    state=(ResourceState.DELETED if gone else ResourceState.ACTIVE).value,
                    deleted_at=started + timedelta(minutes=5) if gone else None,
                )
            )
        lines = [
            format_metric_line({"loss": 1.0 / (e + 1), "acc": e / 10}, step=e, epoch=e)
            for e in range(10)
        ]
        data = ("\n".join(["starting", *lines]) + "\n").encode()
        with session_scope(url) as s:
            offset = repo.append_log(s, job_id, 0, data[:100])  # two pulls, a line cut
            repo.append_log(s, job_id, offset, data[100:])


@pytest.fixture(scope="module")
def pg() -> Iterator[str]:
    with temp_database("jobslist") as url:
        upgrade(url)
        _seed(url)
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
    yield create_app(settings, enqueue=EnqueueRecorder())
    dispose_all()


class Statements:
    def __init__(self, url: str) -> None:
        self.sql: list[str] = []
        self.engine = engine_for(url)
        event.listen(self.engine, "before_cursor_execute", self._one)

    def _one(self, _conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        self.sql.append(statement)

    def close(self) -> None:
        event.remove(self.engine, "before_cursor_execute", self._one)


@pytest.fixture
def statements(pg: str) -> Iterator[Statements]:
    st = Statements(pg)
    yield st
    st.close()


class NoBackend:
    """A compute backend that must not be used: every method raises."""

    def __getattr__(self, name: str) -> Any:
        raise AssertionError(f"GET /v1/jobs called the compute backend: {name}")


class FlavorsOnly:
    """An openstack backend whose flavor catalogue counts its callers; anything else raises."""

    def __init__(self) -> None:
        self.flavor_calls = 0

    def flavors(self) -> list[Flavor]:
        self.flavor_calls += 1
        return [Flavor(name=n, vcpus=1, ram_mb=1024, gpus=1, price_per_hour=2.0) for n in FLAVORS]

    def __getattr__(self, name: str) -> Any:
        raise AssertionError(f"GET /v1/jobs called the compute backend: {name}")


def _page(app: Flask, statements: Statements, query: str) -> tuple[list[dict[str, Any]], int]:
    statements.sql.clear()
    resp = app.test_client().get(f"/v1/jobs?{query}")
    assert resp.status_code == 200, resp.get_data(as_text=True)
    return resp.get_json()["jobs"], len(statements.sql)


def test_statements_do_not_grow_with_the_page(app: Flask, statements: Statements) -> None:
    small, n_small = _page(app, statements, "limit=5")
    large, n_large = _page(app, statements, "limit=50")
    assert len(small) == 5 and len(large) == 50
    # the pages hold what costs queries: servers and metrics on most of their jobs
    assert sum(bool(j["resources"]) for j in large) >= 30
    assert sum(bool(j["metrics"]) for j in large) >= 30
    assert n_small == n_large, statements.sql
    assert n_large <= 3, statements.sql  # the page, its servers, its latest metric values
    # filters and markers add nothing per job either
    _, n_label = _page(app, statements, "limit=50&label=team=vision&state=ALLOCATING")
    _, n_marker = _page(app, statements, f"limit=50&marker={small[-1]['id']}")
    assert n_label == n_large
    assert n_marker == n_large + 1  # the marker's job, read once


def test_each_listed_job_is_what_get_shows(
    app: Flask, statements: Statements, monkeypatch: pytest.MonkeyPatch
) -> None:
    now = datetime.now(UTC)
    monkeypatch.setattr(quotas, "utcnow", lambda: now)  # servers still up: usage up to `now`
    client = app.test_client()
    listed: list[dict[str, Any]] = []
    marker = None
    while True:
        body = client.get("/v1/jobs?limit=7" + (f"&marker={marker}" if marker else "")).get_json()
        listed += body["jobs"]
        marker = body["next"]
        if marker is None:
            break
    assert len(listed) == JOBS
    for job in listed:
        assert job == client.get(f"/v1/jobs/{job['id']}").get_json()
    ran = [j for j in listed if j["resources"]]
    assert ran and all(j["usage"]["vm_seconds"] > 0 for j in ran)
    assert all(list(j["metrics"]) == ["acc", "loss"] for j in ran)
    assert all(j["metrics"] == {"acc": 0.9, "loss": 0.1} for j in ran)
    assert all(j["spec"]["env"] == {"TOKEN": "***"} for j in listed)


def test_sandbox_list_never_reaches_the_backend(
    app: Flask, statements: Statements, monkeypatch: pytest.MonkeyPatch
) -> None:
    def compute(*_args: Any, **_kwargs: Any) -> Any:
        raise AssertionError("GET /v1/jobs asked for the compute backend")

    monkeypatch.setattr(registry, "compute", compute)
    jobs, _ = _page(app, statements, "limit=50")
    assert len(jobs) == 50
    monkeypatch.setattr(registry, "compute", lambda *_a, **_k: NoBackend())
    assert len(_page(app, statements, "limit=200")[0]) == JOBS


def test_openstack_prices_a_page_with_one_catalogue_read(
    app: Flask, statements: Statements, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the openstack backend the flavor catalogue (GPU counts) is the backend's, cached
    by it: read once for the page, not once for each job that ran."""
    backend = FlavorsOnly()
    cloud = Settings(data_dir=tmp_path / "cloud", compute="openstack", store="local")
    monkeypatch.setattr(quotas, "get_settings", lambda: cloud)
    monkeypatch.setattr(quotas, "_cloud_quiet_until", [0.0])
    monkeypatch.setattr(registry, "compute", lambda *_a, **_k: backend)
    jobs, _ = _page(app, statements, "limit=50")
    ran = [j for j in jobs if j["resources"]]
    assert len(ran) >= 30
    assert backend.flavor_calls == 1
    assert all(j["usage"]["gpu_hours"] > 0 for j in ran)  # priced with the backend's flavors
    backend.flavor_calls = 0
    queued, _ = _page(app, statements, "limit=50&state=QUEUED")
    assert queued and all(not j["resources"] for j in queued)
    assert backend.flavor_calls == 0  # nothing ran: nothing to price
