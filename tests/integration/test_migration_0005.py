"""Migration 0005 moves control state out of prose into columns, on PostgreSQL and SQLite:
rows written by the 0004 code upgrade to the new columns and downgrade back unchanged."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from alembic import command
from sqlalchemy import text

from service.db.migrate import alembic_config
from service.db.session import engine_for
from tests.pgutil import temp_database


@pytest.fixture(params=["postgresql", "sqlite"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'm.db'}"
        return
    with temp_database("migration_0005") as u:
        yield u


JOB = (
    "INSERT INTO jobs (id, project_id, name, type, state, spec, output, created_at, updated_at,"
    " log_offset, last_progress_at, poll_interval, cancel_requested, alloc_attempt, queue_reason)"
    " VALUES (:id, 'p', 'n', 'training', :state, '{}', '{}', CURRENT_TIMESTAMP,"
    " CURRENT_TIMESTAMP, 0, CURRENT_TIMESTAMP, 0, false, 0, :why)"
)
RES = (
    "INSERT INTO resources (job_id, project_id, backend, role, name, server_id, flavor, state,"
    " created_at, delete_attempts) VALUES (:job, 'p', 'fake', 'chief', :name, :sid, 'f',"
    " 'booting', CURRENT_TIMESTAMP, 0)"
)


def test_0005_moves_prose_into_columns_and_back(url: str) -> None:
    cfg = alembic_config(url)
    command.upgrade(cfg, "0004")
    with engine_for(url).begin() as c:
        c.execute(text(JOB), {"id": "parked", "state": "QUEUED", "why": "waiting for its turn"})
        c.execute(text(JOB), {"id": "backoff", "state": "QUEUED", "why": "quota exceeded: x"})
        c.execute(text(JOB), {"id": "running", "state": "RUNNING", "why": None})
        c.execute(text(RES), {"job": "running", "name": "a", "sid": "creating:1a2b3c4d"})
        c.execute(text(RES), {"job": "running", "name": "b", "sid": "srv-1"})
    command.upgrade(cfg, "0005")
    with engine_for(url).connect() as c:
        waits = dict(c.execute(text("SELECT id, queue_wait FROM jobs")).all())
        res = c.execute(
            text("SELECT name, server_id, creating, owner_kind, owner_id FROM resources")
        ).all()
    assert waits == {"parked": "parked", "backoff": "backoff", "running": None}
    assert sorted(tuple(r) for r in res) == [
        ("a", None, "1a2b3c4d", "job", "running"),
        ("b", "srv-1", None, "job", "running"),
    ]
    command.downgrade(cfg, "0004")
    with engine_for(url).connect() as c:
        sids = dict(c.execute(text("SELECT name, server_id FROM resources")).all())
    assert sids == {"a": "creating:1a2b3c4d", "b": "srv-1"}
