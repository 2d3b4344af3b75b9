"""Wire details shared by the three APIs: error bodies, microversions, timestamps, request ids."""

from __future__ import annotations

import datetime as dt
import re
import uuid
from typing import Any

from flask import Response, jsonify, request

from devcloud.emulator.catalog import MAX_MICROVERSION, MIN_MICROVERSION

# nova/api/openstack/wsgi.py Fault._fault_names; anything else is a computeFault
NOVA_FAULT_NAMES = {
    400: "badRequest",
    401: "unauthorized",
    403: "forbidden",
    404: "itemNotFound",
    405: "badMethod",
    409: "conflictingRequest",
    413: "overLimit",
    415: "badMediaType",
    429: "overLimit",
    501: "notImplemented",
    503: "serviceUnavailable",
}
GLANCE_TITLES = {400: "Bad Request", 403: "Forbidden", 404: "Not Found", 409: "Conflict"}
UNEXPECTED = (
    "Unexpected API Error. Please report this at http://bugs.launchpad.net/nova/ and attach "
    "the Nova API log if possible.\n<class 'nova.exception.{cls}'>"
)

Microversion = tuple[int, int]


class ApiError(Exception):
    """An error answer; rendered in the dialect of the API that raised it."""

    def __init__(self, status: int, message: str, *, neutron_type: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.neutron_type = neutron_type


def nova_error(status: int, message: str) -> Response:
    name = NOVA_FAULT_NAMES.get(status, "computeFault")
    resp = jsonify({name: {"code": status, "message": message}})
    resp.status_code = status
    return resp


def neutron_error(status: int, message: str, kind: str | None) -> Response:
    default = {400: "HTTPBadRequest", 404: "HTTPNotFound", 409: "HTTPConflict"}
    body = {
        "NeutronError": {
            "type": kind or default.get(status, "HTTPInternalServerError"),
            "message": message,
            "detail": "",
        }
    }
    resp = jsonify(body)
    resp.status_code = status
    return resp


def glance_error(status: int, message: str) -> Response:
    title = GLANCE_TITLES.get(status, "Internal Server Error")
    return Response(
        f"<html>\n <head>\n  <title>{status} {title}</title>\n </head>\n <body>\n"
        f"  <h1>{status} {title}</h1>\n  {message}<br /><br />\n\n\n\n </body>\n</html>",
        status=status,
        content_type="text/html; charset=UTF-8",
    )


def unauthorized(keystone_url: str | None) -> Response:
    """keystonemiddleware's answer to a missing or invalid token."""
    resp = jsonify(
        {
            "error": {
                "code": 401,
                "title": "Unauthorized",
                "message": "The request you have made requires authentication.",
            }
        }
    )
    resp.status_code = 401
    if keystone_url:
        resp.headers["WWW-Authenticate"] = f"Keystone uri='{keystone_url}'"
    return resp


_MV_RE = re.compile(r"^(\d+)\.(\d+)$")


def requested_microversion() -> Microversion:
    """The compute microversion of this request (2.1 when none is asked for); 406 when the
    asked one is outside 2.1 .. 2.100, 400 when it does not parse."""
    value = None
    header = request.headers.get("OpenStack-API-Version", "")
    for part in header.split(","):
        service, _, version = part.strip().partition(" ")
        if service.lower() == "compute" and version.strip():
            value = version.strip()
    if value is None:
        value = request.headers.get("X-OpenStack-Nova-API-Version", "").strip() or None
    if value is None:
        return MIN_MICROVERSION
    if value.lower() == "latest":
        return MAX_MICROVERSION
    m = _MV_RE.match(value)
    if not m:
        raise ApiError(
            400,
            f"API Version String {value} is of invalid format. Must be of format "
            "MajorNum.MinorNum.",
        )
    mv = (int(m.group(1)), int(m.group(2)))
    if not MIN_MICROVERSION <= mv <= MAX_MICROVERSION:
        raise ApiError(
            406,
            f"Version {value} is not supported by the API. Minimum is "
            f"{mv_str(MIN_MICROVERSION)} and maximum is {mv_str(MAX_MICROVERSION)}.",
        )
    return mv


def mv_str(mv: Microversion) -> str:
    return f"{mv[0]}.{mv[1]}"


def isotime(ts: float | None, *, z: bool = True) -> str | None:
    """Nova/Neutron timestamps: 2024-05-01T12:00:00Z (seconds; `z=False`: microseconds, no Z,
    as Nova's launched_at)."""
    if ts is None:
        return None
    t = dt.datetime.fromtimestamp(ts, dt.UTC)
    if z:
        return t.strftime("%Y-%m-%dT%H:%M:%SZ")
    return t.strftime("%Y-%m-%dT%H:%M:%S.%f")


def parse_isotime(text: str) -> float:
    try:
        t = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError as e:
        raise ApiError(400, f"Invalid input for query parameters: {text!r} is not a time") from e
    if t.tzinfo is None:
        t = t.replace(tzinfo=dt.UTC)
    return t.timestamp()


def request_id() -> str:
    return f"req-{uuid.uuid4()}"


def json_body(key: str | None = None) -> Any:
    """The request's JSON (the value under `key` when given); 400 in Nova's words otherwise."""
    body = request.get_json(silent=True)
    if not isinstance(body, dict):
        raise ApiError(400, "Malformed request body")
    if key is None:
        return body
    value = body.get(key)
    if not isinstance(value, dict):
        raise ApiError(
            400,
            f"Invalid input for field/attribute {key}. Value: {body}. "
            f"'{key}' is a required property",
        )
    return value
