"""`stackml db upgrade` (the production way to create the schema, docs/operations.md) on a real,
fresh PostgreSQL database: it reaches head, the API works on it, a second run changes nothing,
and an unreachable database is one clear sentence with a non-zero exit."""

from __future__ import annotations

import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import inspect

from service.api import create_app
from service.cli import cli
from service.config import Settings, reset_settings
from service.db import jobs as repo
from service.db.migrate import DatabaseUnreachable, current_revision, head_revision, upgrade
from service.db.session import engine_for, session_scope
from service.domain.states import JobState
from tests.pgutil import temp_database


@pytest.fixture(autouse=True)
def _fresh_settings() -> Iterator[None]:
    reset_settings()  # the command reads STACKML_DATABASE_URL through the cached settings
    yield
    reset_settings()


@pytest.fixture
def fresh_db() -> Iterator[str]:
    with temp_database("upgrade") as url:
        yield url


def _settings(tmp_path: Path, url: str) -> Settings:
    return Settings(
        data_dir=tmp_path / "data",
        database_url=url,
        redis_url="redis://127.0.0.1:1/0",
        secret_key="db-upgrade-test-key",
        auth="noauth",
        host="127.0.0.1",
    )


def test_db_upgrade_creates_the_schema_the_api_runs_on(fresh_db: str, tmp_path: Path) -> None:
    assert current_revision(fresh_db) is None
    assert "jobs" not in inspect(engine_for(fresh_db)).get_table_names()
    head = head_revision()

    res = CliRunner().invoke(cli, ["db", "upgrade"], env={"STACKML_DATABASE_URL": fresh_db})
    assert res.exit_code == 0, res.output
    assert "revision before: none (empty database)" in res.output
    assert f"revision after:  {head}" in res.output
    assert current_revision(fresh_db) == head
    tables = set(inspect(engine_for(fresh_db)).get_table_names())
    assert {"jobs", "job_events", "resources", "log_chunks", "metrics", "alembic_version"} <= tables

    app = create_app(_settings(tmp_path, fresh_db), enqueue=lambda task, job_id: None)
    client = app.test_client()
    assert client.get("/v1/jobs").get_json() == {"jobs": [], "next": None}
    store = app.extensions["stackml"].store
    key = "projects/local/staging/x/trainer.tar.gz"
    store.put(key, b"not checked here")
    resp = client.post(
        "/v1/jobs",
        json={"name": "on-a-fresh-db", "trainer": {"package_uri": store.uri(key), "module": "t"}},
    )
    assert resp.status_code in (201, 202), resp.get_data(as_text=True)
    assert client.get("/v1/jobs").get_json()["jobs"][0]["name"] == "on-a-fresh-db"
    # /metrics' aggregate SQL (window functions, epoch arithmetic) on PostgreSQL
    job_id = resp.get_json()["id"]
    with session_scope(fresh_db) as s:
        assert repo.transition(s, job_id, JobState.QUEUED, JobState.ALLOCATING, "go")
    scraped = client.get("/metrics")
    assert scraped.status_code == 200, scraped.get_data(as_text=True)
    samples = {
        (smp.name, tuple(sorted(smp.labels.items()))): smp.value
        for fam in text_string_to_metric_families(scraped.get_data(as_text=True))
        for smp in fam.samples
    }
    assert samples[("stackml_database_up", ())] == 1
    assert samples[("stackml_jobs", (("project", "local"), ("state", "ALLOCATING")))] == 1
    assert samples[("stackml_job_queue_wait_seconds_count", ())] == 1
    assert samples[("stackml_job_queue_wait_seconds_sum", ())] >= 0

    # again (every deployment runs it): a no-op that says so, the data untouched
    again = CliRunner().invoke(cli, ["db", "upgrade"], env={"STACKML_DATABASE_URL": fresh_db})
    assert again.exit_code == 0, again.output
    assert f"revision before: {head}" in again.output and "nothing to do" in again.output
    assert len(client.get("/v1/jobs").get_json()["jobs"]) == 1


def test_db_upgrade_as_the_installed_command(fresh_db: str, tmp_path: Path) -> None:
    """The way an operator runs it: a process of its own, the URL from the environment."""
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "STACKML_DATABASE_URL": fresh_db}
    cmd = [sys.executable, "-m", "service.cli", "db", "upgrade"]
    first = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120, check=False)
    assert first.returncode == 0, first.stderr
    assert current_revision(fresh_db) == head_revision()
    second = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120, check=False)
    assert second.returncode == 0, second.stderr
    assert "nothing to do" in second.stdout


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_db_upgrade_of_an_unreachable_database_is_one_clear_error() -> None:
    port = _closed_port()
    url = f"postgresql+psycopg://stackml:s3cret-pw@127.0.0.1:{port}/stackml"
    res = CliRunner().invoke(cli, ["db", "upgrade"], env={"STACKML_DATABASE_URL": url})
    assert res.exit_code == 1, res.output
    assert "Traceback" not in res.output
    errors = [ln for ln in res.output.splitlines() if ln.startswith("Error:")]
    assert len(errors) == 1, res.output
    assert "cannot reach the database" in errors[0] and "database_unreachable" in errors[0]
    assert f"127.0.0.1:{port}" in errors[0] and "s3cret-pw" not in res.output
    # the driver's error is chained, not swallowed
    with pytest.raises(DatabaseUnreachable) as info:
        upgrade(url)
    assert info.value.__cause__ is not None
    assert "Connection refused" in str(info.value.__cause__) or "refused" in str(info.value)
