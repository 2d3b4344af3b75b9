"""The one place errors become HTTP: every error answers {"error": {code, message, details,
request_id}} with its status, `X-Request-Id`, and `Retry-After` on 429/503."""

from __future__ import annotations

import logging
import uuid
from typing import Any

from flask import Flask, g, jsonify, request
from flask.wrappers import Response
from pydantic import ValidationError
from sqlalchemy.exc import OperationalError
from werkzeug.exceptions import HTTPException

from service.domain.errors import (
    Conflict,
    Forbidden,
    InvalidRequest,
    StackMLError,
    Unauthorized,
    ValidationFailed,
)

log = logging.getLogger("stackml.api")

REQUEST_ID_HEADER = "X-Request-Id"

# Slugs for werkzeug's HTTP errors (routing, 405, 413, ...): stable codes for clients.
HTTP_CODES = {
    400: "invalid_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    406: "not_acceptable",
    409: "conflict",
    411: "length_required",
    413: "payload_too_large",
    415: "unsupported_media_type",
    416: "range_not_satisfiable",
    422: "validation_failed",
    429: "too_many_requests",
    500: "internal_error",
    501: "not_implemented",
    503: "service_unavailable",
}


class UnsupportedMediaType(InvalidRequest):
    """The body's Content-Type is not one this route accepts."""

    status = 415
    code = "unsupported_media_type"


class HostNotAllowed(InvalidRequest):
    """The Host header names none of the API's own addresses (DNS rebinding)."""

    code = "host_not_allowed"


class CrossOriginRefused(Forbidden):
    """A browser page of another origin tried to change something."""

    code = "cross_origin_refused"


class LoopbackOnly(Forbidden):
    """auth=noauth answers loopback peers only (whatever server it runs under)."""

    code = "loopback_only"


class JobTerminal(Conflict):
    """The job has already finished: it cannot be cancelled."""

    code = "job_terminal"


class JobNotTerminal(Conflict):
    code = "job_not_terminal"


class TeardownPending(Conflict):
    """The job finished but its servers are not all deleted yet."""

    code = "teardown_pending"


class InvalidPackage(ValidationFailed):
    code = "invalid_package"


class TempUrlDenied(Unauthorized):
    """A /v1/store signature is wrong, expired or used outside its prefix (Swift answers 401)."""

    code = "grant_denied"


class NotReady(StackMLError):
    status = 503
    code = "not_ready"

    def __init__(
        self, message: str, *, retry_after: int = 5, details: dict[str, Any] | None = None
    ) -> None:
        super().__init__(message, details=details)
        self.retry_after = retry_after


class RateLimited(StackMLError):
    status = 429
    code = "too_many_requests"

    def __init__(
        self, message: str, *, retry_after: int = 1, details: dict[str, Any] | None = None
    ) -> None:
        super().__init__(message, details=details)
        self.retry_after = retry_after


def field_error(field: str, message: str) -> dict[str, str]:
    return {"field": field, "message": message}


def fields_failed(problems: list[dict[str, str]]) -> ValidationFailed:
    """A 422 whose details list each wrong field (the same shape pydantic errors get)."""
    summary = "; ".join(f"{p['field']}: {p['message']}" for p in problems)
    return ValidationFailed(f"invalid request: {summary}", details={"fields": problems})


def _dotted(loc: tuple[int | str, ...]) -> str:
    return ".".join(str(p) for p in loc) or "body"


REQUEST_ID_ENV = "stackml.request_id"  # set by the prediction lane when Flask answers for it


def new_request_id() -> str:
    return f"req-{uuid.uuid4()}"


def request_id() -> str:
    rid = g.get("request_id")
    if rid is None:
        rid = g.request_id = request.environ.get(REQUEST_ID_ENV) or new_request_id()
    return str(rid)


def render(
    status: int,
    code: str,
    message: str,
    details: dict[str, Any] | None = None,
    *,
    retry_after: int | None = None,
    headers: dict[str, str] | None = None,
) -> Response:
    body = {
        "error": {
            "code": code,
            "message": message,
            "details": details or {},
            "request_id": request_id(),
        }
    }
    resp = jsonify(body)
    resp.status_code = status
    for k, v in (headers or {}).items():
        resp.headers[k] = v
    if retry_after is None and status in (429, 503):
        retry_after = 5
    if retry_after is not None:
        resp.headers["Retry-After"] = str(int(retry_after))
    return resp


def _stackml_error(e: StackMLError) -> Response:
    if e.status >= 500:
        log.error("request %s failed: %s: %s", request_id(), e.code, e.message)
    headers = getattr(e, "headers", None)  # e.g. WWW-Authenticate on a 401
    return render(
        e.status,
        e.code,
        e.message,
        e.details,
        retry_after=getattr(e, "retry_after", None),
        headers=headers if isinstance(headers, dict) else None,
    )


def _http_error(e: HTTPException) -> Response | HTTPException:
    code = e.code or 500
    if code < 400:  # routing redirects (strict slashes) are responses, not errors
        return e
    headers = {}
    allow = e.get_headers()
    for k, v in allow:
        if k.lower() in ("allow", "www-authenticate"):
            headers[k] = v
    retry = getattr(e, "retry_after", None)
    retry_after = int(retry) if isinstance(retry, int | float) else None
    message = e.description or e.name
    details: dict[str, Any] = {}
    if code == 413:
        limit = request.max_content_length
        message = "the request body is too large" + (f" (limit: {limit} bytes)" if limit else "")
        details = {"max_bytes": limit} if limit else {}
    return render(
        code,
        HTTP_CODES.get(code, f"http_{code}"),
        message,
        details,
        retry_after=retry_after,
        headers=headers,
    )


def _validation_error(e: ValidationError) -> Response:
    problems = [field_error(_dotted(err["loc"]), err["msg"]) for err in e.errors()]
    # the input values are left out on purpose: they may carry secrets (env, args)
    return render(
        422,
        ValidationFailed.code,
        f"invalid request: {e.error_count()} field(s)",
        {"fields": problems},
    )


def _database_down(e: OperationalError) -> Response:
    log.error("request %s: database error: %s", request_id(), e.orig)
    return render(
        503, "service_unavailable", "the database is unavailable; retry later", retry_after=5
    )


def _unexpected(e: Exception) -> Response:
    log.exception("request %s failed with an unexpected error", request_id())
    return render(500, "internal_error", "internal error; quote the request id when reporting")


def install(app: Flask) -> None:
    """Register the handlers and the request-id bookkeeping on `app`."""

    @app.before_request
    def _assign_request_id() -> None:
        request_id()

    @app.after_request
    def _stamp_request_id(resp: Response) -> Response:
        resp.headers[REQUEST_ID_HEADER] = request_id()
        return resp

    app.register_error_handler(StackMLError, _stackml_error)
    app.register_error_handler(HTTPException, _http_error)
    app.register_error_handler(ValidationError, _validation_error)
    app.register_error_handler(OperationalError, _database_down)
    app.register_error_handler(Exception, _unexpected)
