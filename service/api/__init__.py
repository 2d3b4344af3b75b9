"""The Flask app factory: blueprints, the one error renderer, and what views share (`ctx()`)."""

from __future__ import annotations

import json
import logging
import math
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

    def store_for(self, project_id: str) -> ObjectStore:
        """Where `project_id`'s objects live: its own Swift account with per-project tenancy
        (service/trusts.py), else the platform's store."""
        from service import trusts
        from service.backends import registry

        if self.settings.store == "swift" and trusts.enabled(self.settings):
            return registry.store(self.settings, project_id=project_id)
        return self.store

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


class _App(Flask):
    """Flask, deciding once per view or hook function whether it is a coroutine: Flask asks
    `inspect` at every call, nine times a request here (each hook and the view)."""

    _SYNC_CACHE_MAX = 1024  # the app's own functions; a stranger is checked, not kept

    def ensure_sync(self, func: Callable[..., Any]) -> Callable[..., Any]:
        cache: dict[Callable[..., Any], Callable[..., Any]] = self.__dict__.setdefault(
            "_sync_cache", {}
        )
        try:
            return cache[func]
        except KeyError:
            sync = super().ensure_sync(func)
            if len(cache) < self._SYNC_CACHE_MAX:
                cache[func] = sync
            return sync


def ctx() -> Context:
    ext: Context = current_app.extensions[EXTENSION]
    return ext


# Hostile-input bounds of JSON bodies (see docs/security.md): a deeper or bigger document is
# a 400, never a RecursionError or an unserialisable value deep inside the app.
MAX_JSON_DEPTH = 32
MAX_JSON_INT = 2**63 - 1


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _parse_int(text: str) -> int:
    value = int(text) if len(text) <= 20 else None  # long digit strings cost quadratic time
    if value is None or abs(value) > MAX_JSON_INT:
        raise ValueError(f"the integer {text[:24]} is out of range (64-bit signed)")
    return value


def _parse_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"the number {text[:24]} is out of range")
    return value


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    seen: set[str] = set()
    for k, _ in pairs:
        if k in seen:
            raise ValueError(f"duplicate key {k[:64]!r} in an object")
        seen.add(k)
    return dict(pairs)


def _check_tree(obj: Any) -> None:
    """Iteratively (no recursion): nesting depth, and strings that are valid Unicode (a lone
    surrogate escape such as \\ud800 cannot be stored or printed)."""
    stack: list[tuple[Any, int]] = [(obj, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, str):
            _check_str(node)
            continue
        if not isinstance(node, dict | list):
            continue
        if depth > MAX_JSON_DEPTH:
            raise InvalidRequest(
                f"the JSON body is nested more than {MAX_JSON_DEPTH} levels deep",
                details={"max_depth": MAX_JSON_DEPTH},
            )
        if isinstance(node, dict):
            for k, v in node.items():
                _check_str(k)
                stack.append((v, depth + 1))
        else:
            stack.extend((v, depth + 1) for v in node)


def _check_str(text: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise InvalidRequest(
            "the JSON body holds a string that is not valid Unicode (a lone surrogate escape)"
        ) from e


TRUE = frozenset({"1", "true", "yes", "on"})
FALSE = frozenset({"0", "false", "no", "off", ""})


def bool_arg(name: str) -> bool:
    """A true/false query parameter (absent: false); anything else is a 400."""
    raw = (request.args.get(name) or "").lower()
    if raw in TRUE:
        return True
    if raw in FALSE:
        return False
    raise InvalidRequest(f"{name} must be true or false", details={"parameter": name})


def json_body() -> dict[str, Any]:
    """The request's JSON object: 415 for another content type, 413 past MAX_CONTENT_LENGTH,
    400 when malformed (bad UTF-8, NaN/Infinity, duplicate keys, out-of-range numbers, nesting
    deeper than MAX_JSON_DEPTH, lone surrogates)."""
    from service.api.errors import UnsupportedMediaType

    if not request.is_json:
        raise UnsupportedMediaType(
            "the body must be sent as Content-Type: application/json",
            details={"content_type": request.mimetype or None},
        )
    raw = request.get_data(cache=False)
    try:
        obj = json.loads(
            raw,
            parse_constant=_reject_constant,
            parse_int=_parse_int,
            parse_float=_parse_float,
            object_pairs_hook=_unique_keys,
        )
    except json.JSONDecodeError as e:
        raise InvalidRequest(
            f"malformed JSON body: {e.msg}", details={"line": e.lineno, "column": e.colno}
        ) from e
    except RecursionError as e:
        raise InvalidRequest(
            f"the JSON body is nested more than {MAX_JSON_DEPTH} levels deep",
            details={"max_depth": MAX_JSON_DEPTH},
        ) from e
    except ValueError as e:  # undecodable bytes, NaN/Infinity, duplicates, huge numbers
        raise InvalidRequest(f"malformed JSON body: {e}") from e
    _check_tree(obj)
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
    from service.api import (
        auth,
        errors,
        flavors,
        guard,
        health,
        jobs,
        openapi,
        packages,
        quotas,
        ratelimit,
        usage,
    )
    from service.api import store as store_api
    from service.backends import registry

    settings = settings or get_settings()
    if enqueue is None:
        from service.queue import enqueue as queue_enqueue

        enqueue = queue_enqueue

    app = _App(__name__, static_folder=None)
    app.config["MAX_CONTENT_LENGTH"] = settings.max_body_bytes
    app.config["LOG_FOLLOW_INTERVAL"] = 0.2
    app.json.sort_keys = False  # type: ignore[attr-defined]
    app.url_map.strict_slashes = False
    authenticator = auth.make_authenticator(settings)  # refuses a bad configuration first
    app.extensions[EXTENSION] = Context(
        settings=settings, store=store or registry.store(settings), enqueue=enqueue
    )
    errors.install(app)
    guard.install(app, settings)  # before auth: the edge checks run first
    from service.api import predict  # /v1/models/<name>:predict (the serving proxy)

    app.wsgi_app = predict.Lane(app, app.wsgi_app)  # type: ignore[method-assign]
    auth.install(app, authenticator)  # (its middleware around the lane: tokens checked first)
    ratelimit.install(app, settings)  # after auth: it counts per project
    for bp in (
        health.bp,
        jobs.bp,
        packages.bp,
        store_api.bp,
        flavors.bp,
        openapi.bp,
        quotas.bp,
        usage.bp,
    ):
        app.register_blueprint(bp)
    from service.api import metrics as metrics_api  # GET /metrics (Prometheus)

    app.register_blueprint(metrics_api.bp)
    from service.api import models as models_api  # /v1/models (the registry)

    app.register_blueprint(models_api.bp)
    from service.api import endpoints as endpoints_api  # /v1/models/<name>/endpoints

    app.register_blueprint(endpoints_api.bp)
    app.register_blueprint(predict.bp)
    from service.api import schedules as schedules_api  # /v1/schedules

    app.register_blueprint(schedules_api.bp)
    from service.api import datasets as datasets_api  # /v1/datasets
    from service.api import feedback as feedback_api  # /v1/models/<name>/feedback

    app.register_blueprint(feedback_api.bp)
    app.register_blueprint(datasets_api.bp)
    return app


__all__ = ["Context", "create_app", "ctx", "json_body"]
