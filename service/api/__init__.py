"""The Flask app factory: blueprints, the one error renderer, and what views share (`ctx()`)."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from flask import Flask, current_app, request
from sqlalchemy.orm import Session

from service.backends.interfaces import ObjectStore
from service.config import Settings, get_settings
from service.db.session import session_scope
from service.domain.errors import InvalidRequest

log = logging.getLogger("stackml.api")

Enqueue = Callable[[str, str], None]
EXTENSION = "stackml"


@dataclass(frozen=True)
class Context:
    """What every view needs, fixed when the app is made."""

    settings: Settings
    store: ObjectStore
    enqueue: Enqueue

    @contextmanager
    def session(self) -> Iterator[Session]:
        with session_scope(self.settings.db_url) as s:
            yield s

    def enqueue_quietly(self, task: str, job_id: str) -> bool:
        """Hand `task` to the workers; a broker outage only delays the job, because the
        reconciler re-drives jobs whose next task was lost."""
        try:
            self.enqueue(task, job_id)
        except Exception as e:  # noqa: BLE001 - any broker failure has the same remedy
            log.warning(
                "could not enqueue %s for %s (the reconciler will re-drive it): %s", task, job_id, e
            )
            return False
        return True


def ctx() -> Context:
    ext: Context = current_app.extensions[EXTENSION]
    return ext


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def json_body() -> dict[str, Any]:
    """The request's JSON object: 415 for another content type, 400 when malformed,
    413 past MAX_CONTENT_LENGTH."""
    from service.api.errors import UnsupportedMediaType

    if not request.is_json:
        raise UnsupportedMediaType(
            "the body must be sent as Content-Type: application/json",
            details={"content_type": request.mimetype or None},
        )
    raw = request.get_data(cache=False)
    try:
        obj = json.loads(raw, parse_constant=_reject_constant)
    except json.JSONDecodeError as e:
        raise InvalidRequest(
            f"malformed JSON body: {e.msg}", details={"line": e.lineno, "column": e.colno}
        ) from e
    except ValueError as e:  # undecodable bytes, NaN/Infinity
        raise InvalidRequest(f"malformed JSON body: {e}") from e
    if not isinstance(obj, dict):
        raise InvalidRequest("the body must be a JSON object")
    return obj


def create_app(
    settings: Settings | None = None,
    *,
    enqueue: Enqueue | None = None,
    store: ObjectStore | None = None,
) -> Flask:
    """The API app. `enqueue(task_name, job_id)` defaults to service.queue.enqueue; tests
    inject a recorder. `store` defaults to the configured object store."""
    from service.api import auth, errors, flavors, health, jobs, openapi, packages
    from service.api import store as store_api
    from service.backends import registry

    settings = settings or get_settings()
    if enqueue is None:
        from service.queue import enqueue as queue_enqueue

        enqueue = queue_enqueue

    app = Flask(__name__, static_folder=None)
    app.config["MAX_CONTENT_LENGTH"] = settings.max_body_bytes
    app.config["LOG_FOLLOW_INTERVAL"] = 0.2
    app.json.sort_keys = False  # type: ignore[attr-defined]
    app.url_map.strict_slashes = False
    app.extensions[auth.EXTENSION] = auth.make_authenticator(settings)
    app.extensions[EXTENSION] = Context(
        settings=settings, store=store or registry.store(settings), enqueue=enqueue
    )
    errors.install(app)
    for bp in (health.bp, jobs.bp, packages.bp, store_api.bp, flavors.bp, openapi.bp):
        app.register_blueprint(bp)
    return app


__all__ = ["Context", "create_app", "ctx", "json_body"]
