"""/healthz (the process answers) and /readyz (database, broker and store all usable)."""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable

from flask import Blueprint, Response, jsonify
from sqlalchemy import select

from service.api import Context, ctx
from service.api.auth import public
from service.api.errors import NotReady
from service.db.models import Job

bp = Blueprint("health", __name__)

BROKER_TIMEOUT = 1.0


@bp.get("/healthz")
@public
def healthz() -> Response:
    return jsonify({"status": "ok"})


@bp.get("/readyz")
@public
def readyz() -> Response:
    c = ctx()
    checks: dict[str, Callable[[Context], None]] = {
        "database": _database,
        "broker": _broker,
        "store": _store,
    }
    results: dict[str, str] = {}
    for name, check in checks.items():
        try:
            check(c)
            results[name] = "ok"
        except Exception as e:  # noqa: BLE001 - any failure means "not ready"; say which
            results[name] = f"failed: {type(e).__name__}: {e}"[:300]
    failing = [k for k, v in results.items() if v != "ok"]
    if failing:
        raise NotReady(
            f"not ready: {', '.join(failing)}", details={"failing": failing, "checks": results}
        )
    return jsonify({"status": "ok", "checks": results})


def _database(c: Context) -> None:
    with c.session() as s:
        s.execute(select(Job.id).limit(1)).all()  # also proves the schema is migrated


def _broker(c: Context) -> None:
    url = c.settings.redis_url
    if not url.startswith(("redis://", "rediss://", "unix://")):
        return  # a broker we cannot ping cheaply; the enqueue path reports its failures
    import redis

    client = redis.Redis.from_url(
        url, socket_timeout=BROKER_TIMEOUT, socket_connect_timeout=BROKER_TIMEOUT
    )
    try:
        client.ping()
    finally:
        client.close()


def _store(c: Context) -> None:
    key = f"_readyz/{os.getpid()}-{uuid.uuid4().hex}"
    c.store.put(key, b"ok")
    c.store.delete(key)
