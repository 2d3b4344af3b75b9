"""A throwaway PostgreSQL database per test session (real server, real connections)."""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager

import psycopg

ADMIN_URL = os.environ.get(
    "STACKML_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
)


def _dsn(url: str) -> str:
    return url.replace("postgresql+psycopg://", "postgresql://")


@contextmanager
def temp_database(tag: str) -> Iterator[str]:
    """Create `stackml_<tag>_<random>`, yield its SQLAlchemy URL, drop it afterwards.

    Fails loudly when PostgreSQL does not answer: these tiers need the real server."""
    name = f"stackml_{tag}_{secrets.token_hex(4)}"
    with psycopg.connect(_dsn(ADMIN_URL), autocommit=True, connect_timeout=10) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    base = ADMIN_URL.rsplit("/", 1)[0]
    try:
        yield f"{base}/{name}"
    finally:
        from service.db.session import dispose_all

        dispose_all()
        with psycopg.connect(_dsn(ADMIN_URL), autocommit=True, connect_timeout=10) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@contextmanager
def recorded_statements(url: str) -> Iterator[list[str]]:
    """The SQL statements this process sends to `url`'s engine inside the block, in order."""
    from sqlalchemy import event

    from service.db.session import engine_for

    sent: list[str] = []

    def seen(_conn: object, _cursor: object, statement: str, *_a: object) -> None:
        sent.append(statement)

    engine = engine_for(url)
    event.listen(engine, "before_cursor_execute", seen)
    try:
        yield sent
    finally:
        event.remove(engine, "before_cursor_execute", seen)
