"""The Alembic migrations on a real PostgreSQL: one head, a fresh database upgraded to it is at
that head and has exactly the schema of the SQLAlchemy models, and every migration steps down
and up again. Read from the script directory, so it holds for whatever head is there."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import inspect

from service.db.migrate import alembic_config, upgrade
from service.db.models import Base
from service.db.session import engine_for
from tests.pgutil import temp_database


@pytest.fixture
def fresh_db() -> Iterator[str]:
    with temp_database("migrations") as url:
        yield url


def _script(url: str) -> ScriptDirectory:
    return ScriptDirectory.from_config(alembic_config(url))


def _current(url: str) -> tuple[str, ...]:
    """What `alembic current` reports: the revisions stamped in alembic_version."""
    with engine_for(url).connect() as conn:
        return tuple(MigrationContext.configure(conn).get_current_heads())


def _schema_diff(url: str) -> list[object]:
    """Differences between the database and the models (what `alembic revision --autogenerate`
    would write into a new migration): none when the migrations build the models' schema."""
    with engine_for(url).connect() as conn:
        ctx = MigrationContext.configure(conn, opts={"compare_type": True})
        return list(compare_metadata(ctx, Base.metadata))


def _tables(url: str) -> set[str]:
    with engine_for(url).connect() as conn:
        return set(inspect(conn).get_table_names())


def test_there_is_exactly_one_head(fresh_db: str) -> None:
    heads = _script(fresh_db).get_heads()
    assert len(heads) == 1, f"the migrations have {len(heads)} heads {heads}: merge them"


def test_fresh_database_upgraded_to_head_matches_the_models(fresh_db: str) -> None:
    (head,) = _script(fresh_db).get_heads()
    assert _current(fresh_db) == ()
    upgrade(fresh_db)
    assert _current(fresh_db) == (head,)
    assert _schema_diff(fresh_db) == []
    assert set(Base.metadata.tables) <= _tables(fresh_db)


def test_every_migration_steps_down_to_base_and_up_again(fresh_db: str) -> None:
    script = _script(fresh_db)
    (head,) = script.get_heads()
    # base -> head, oldest first
    chain = [rev.revision for rev in reversed(list(script.walk_revisions("base", "heads")))]
    assert chain[-1] == head
    cfg = alembic_config(fresh_db)
    for revision in chain:
        command.upgrade(cfg, revision)
        assert _current(fresh_db) == (revision,)
    for below in [*reversed(chain[:-1]), None]:
        command.downgrade(cfg, below or "base")
        assert _current(fresh_db) == ((below,) if below else ())
    # at base nothing of the models' schema is left, only Alembic's own table
    assert _tables(fresh_db) <= {"alembic_version"}
    upgrade(fresh_db)
    assert _current(fresh_db) == (head,)
    assert _schema_diff(fresh_db) == []
