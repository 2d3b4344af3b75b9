"""Alembic migrations, run programmatically (`stackml db upgrade`, and at platform start)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, DBAPIError, OperationalError

from service.db.session import engine_for
from service.domain.errors import StackMLError

MIGRATIONS = Path(__file__).resolve().parent / "migrations"
# one migration at a time per PostgreSQL database (several API/worker hosts may start together)
PG_LOCK_KEY = 0x57ACC0DB
PG_LOCK_TIMEOUT_MS = 300_000


class DatabaseUnreachable(StackMLError):
    """The database named by the settings does not answer (or refuses us)."""

    status = 503
    code = "database_unreachable"


class MigrationFailed(StackMLError):
    status = 500
    code = "migration_failed"


def alembic_config(url: str) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def display_url(url: str) -> str:
    """`url` without its password, for messages."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return "<an unparsable database URL>"


def head_revision() -> str:
    head = ScriptDirectory.from_config(alembic_config("sqlite://")).get_current_head()
    assert head is not None, "no migrations"
    return head


def current_revision(url: str) -> str | None:
    """The revision the database is at (None: never migrated)."""
    with _connect(url) as conn:
        return MigrationContext.configure(conn).get_current_revision()


def upgrade(url: str, revision: str = "head") -> tuple[str | None, str | None]:
    """Migrate the database at `url` to `revision`; returns the revisions before and after.
    Idempotent. On PostgreSQL, concurrent upgrades of one database wait for each other (an
    advisory lock). Raises DatabaseUnreachable when the database does not answer."""
    with _connect(url) as conn, _migration_lock(conn):
        before = MigrationContext.configure(conn).get_current_revision()
        conn.commit()  # alembic migrates on a connection of its own
        try:
            command.upgrade(alembic_config(url), revision)
        except OperationalError as e:
            raise _unreachable(url, e) from e
        except DBAPIError as e:
            raise MigrationFailed(
                f"migrating {display_url(url)} from {before or 'an empty database'} failed: "
                f"{_first_line(e)}"
            ) from e
        after = MigrationContext.configure(conn).get_current_revision()
        conn.commit()
    return before, after


@contextmanager
def _connect(url: str) -> Iterator[Connection]:
    try:
        engine = engine_for(url)
        conn = engine.connect()
    except ArgumentError as e:
        raise DatabaseUnreachable(f"{display_url(url)} is not a database URL: {e}") from e
    except (OperationalError, DBAPIError) as e:
        raise _unreachable(url, e) from e
    try:
        yield conn
    finally:
        conn.close()


@contextmanager
def _migration_lock(conn: Connection) -> Iterator[None]:
    if conn.dialect.name != "postgresql":
        yield
        return
    conn.execute(text(f"SET lock_timeout = {PG_LOCK_TIMEOUT_MS}"))
    conn.execute(text("SELECT pg_advisory_lock(:k)"), {"k": PG_LOCK_KEY})
    conn.execute(text("RESET lock_timeout"))  # the pooled connection goes back as it came
    conn.commit()
    try:
        yield
    finally:
        conn.rollback()
        conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": PG_LOCK_KEY})
        conn.commit()


def _unreachable(url: str, e: Exception) -> DatabaseUnreachable:
    return DatabaseUnreachable(
        f"cannot reach the database {display_url(url)}: {_first_line(e)} "
        "(check STACKML_DATABASE_URL, and that the server runs and accepts us)"
    )


def _first_line(e: Exception) -> str:
    orig = getattr(e, "orig", None) or e
    lines = str(orig).strip().splitlines()
    return lines[0] if lines else type(orig).__name__
