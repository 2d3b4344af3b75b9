"""The API's edge: what every request must pass before routing reaches auth and the views.

- **Peers (auth=noauth).** Noauth answers loopback peers only, whatever WSGI server runs the
  app (`stackml up` refuses a non-loopback bind; gunicorn does not know to). A request whose
  `REMOTE_ADDR` is empty or not an IP address is refused too; one without `REMOTE_ADDR` at all
  has no network peer (an in-process WSGI call, as test tools make) and is served.
- **Host (DNS rebinding).** A web page whose name re-resolves to 127.0.0.1 reaches the API
  with its own name in `Host`; the API answers only to its own names: the bound host,
  `localhost`, `127.0.0.1`, `[::1]` at the port the request came in on, the host of
  `public_url`, and `allowed_hosts`. auth=noauth always checks; auth=keystone only when
  `allowed_hosts` is set (every protected route needs a token that no browser adds by itself,
  and the names in front of a cloud deployment are the operator's to list).
- **Origin (cross-site requests).** A state-changing request (POST, PUT, PATCH, DELETE) that
  carries a foreign `Origin` (not the request's own host and port, not in `allowed_origins`),
  or `Sec-Fetch-Site: cross-site|same-site` without an Origin, is refused. Non-browser
  clients send neither header and pass.
- **Form content types.** A state-changing request whose body is a form type a browser may
  send cross-site without a preflight (`application/x-www-form-urlencoded`,
  `multipart/form-data`, `text/plain`) is refused with 415 unless the view takes forms
  (`@accepts_form`: the package upload's multipart form).

The signed store routes (/v1/store, blueprint "store") are exempt from all of it: their
signature is their authorisation (as Swift TempURLs), and sandboxes reach them through the store
gateway under another address.
"""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import urlsplit

from flask import Flask, current_app, request

from service.api.auth import ConfigurationError
from service.api.errors import (
    CrossOriginRefused,
    HostNotAllowed,
    LoopbackOnly,
    UnsupportedMediaType,
)
from service.config import Settings

F = TypeVar("F", bound=Callable[..., Any])

EXTENSION = "stackml.guard"
EXEMPT_BLUEPRINTS = frozenset({"store"})
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE"})
FORM_TYPES = frozenset({"application/x-www-form-urlencoded", "multipart/form-data", "text/plain"})
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "[::1]")
DEFAULT_PORTS = {"http": 80, "https": 443}
_FORMS_ATTR = "_stackml_accepts_form"


def accepts_form(view: F) -> F:
    """Mark a view that takes a multipart form (the dashboard's upload)."""
    setattr(view, _FORMS_ATTR, True)
    return view


@functools.lru_cache(maxsize=4096)  # a pure function of the header; every request asks
def split_host(value: str) -> tuple[str, int | None] | None:
    """`name[:port]` (IPv6 in brackets) as (lower-case name without a trailing dot, port or
    None); None when it is not a host at all."""
    value = value.strip().lower()
    if not value:
        return None
    if value.startswith("["):
        end = value.find("]")
        if end < 0:
            return None
        name, rest = value[: end + 1], value[end + 1 :]
    else:
        name, sep, port = value.partition(":")
        rest = f":{port}" if sep else ""
    port_no: int | None = None
    if rest:
        digits = rest[1:]
        if not rest.startswith(":") or not digits.isdigit() or len(digits) > 5:
            return None
        port_no = int(digits)
    name = name.rstrip(".")
    if not name or any(c in name for c in "/@?#\\ "):
        return None
    return name, port_no


def _bracketed(host: str) -> str:
    host = host.strip().lower()
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


@dataclass(frozen=True)
class EdgePolicy:
    """What the guard checks, fixed when the app is made."""

    noauth: bool
    check_host: bool
    # names accepted at the port the request arrived on
    local_names: frozenset[str]
    # (name, port): exact; (name, None): any port
    extra_hosts: frozenset[tuple[str, int | None]]
    # (scheme, name, port)
    origins: frozenset[tuple[str, str, int]]

    @classmethod
    def from_settings(cls, settings: Settings) -> EdgePolicy:
        extra: set[tuple[str, int | None]] = set()
        for entry in settings.allowed_hosts:
            parsed = split_host(_bracketed(entry) if entry.count(":") > 1 else entry)
            if parsed is None:
                raise ConfigurationError(f"allowed_hosts: {entry!r} is not a host name[:port]")
            extra.add(parsed)
        if settings.public_url:
            public = _origin_of(settings.public_url)
            if public is None:
                raise ConfigurationError(
                    f"public_url {settings.public_url!r} is not an http(s) URL"
                )
            extra.add((public[1], public[2]))
        origins: set[tuple[str, str, int]] = set()
        for entry in settings.allowed_origins:
            origin = _origin_of(entry)
            if origin is None:
                raise ConfigurationError(f"allowed_origins: {entry!r} is not scheme://host[:port]")
            origins.add(origin)
        noauth = settings.auth == "noauth"
        return cls(
            noauth=noauth,
            check_host=noauth or bool(settings.allowed_hosts),
            local_names=frozenset({_bracketed(settings.host), *LOOPBACK_NAMES}),
            extra_hosts=frozenset(extra),
            origins=frozenset(origins),
        )

    def host_allowed(self, name: str, port: int, server_port: int | None) -> bool:
        if name in self.local_names and port == server_port:
            return True
        return (name, port) in self.extra_hosts or (name, None) in self.extra_hosts


def _origin_of(url: str) -> tuple[str, str, int] | None:
    """(scheme, host, port) of an http(s) URL or origin; None for anything else."""
    try:
        parts = urlsplit(url.strip())
        port = parts.port
    except ValueError:
        return None
    scheme = parts.scheme.lower()
    if scheme not in DEFAULT_PORTS or not parts.hostname:
        return None
    return scheme, _bracketed(parts.hostname).rstrip("."), port or DEFAULT_PORTS[scheme]


@functools.lru_cache(maxsize=4096)  # a pure function of the address; every request asks
def peer_is_loopback(addr: str | None) -> bool:
    if not addr:
        return False  # a peer we cannot name is not known to be local
    try:
        ip = ipaddress.ip_address(addr.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback


def install(app: Flask, settings: Settings) -> None:
    """Check every request at the edge (call before auth.install: these run first)."""
    app.extensions[EXTENSION] = EdgePolicy.from_settings(settings)
    app.before_request(_guard)


def _guard() -> None:
    if request.blueprint in EXEMPT_BLUEPRINTS:
        return  # signed store routes: the signature is the authorisation
    view = current_app.view_functions.get(request.endpoint or "")
    check(
        current_app.extensions[EXTENSION],
        request.environ,
        request.method,
        request.mimetype,
        takes_forms=bool(getattr(view, _FORMS_ATTR, False)),
    )


def check(
    policy: EdgePolicy, env: dict[str, Any], method: str, mimetype: str, *, takes_forms: bool
) -> None:
    """The edge checks of one request (its WSGI environ, method and media type; whether its
    view takes multipart forms): raises the refusal. Flask's hook above, and the prediction
    lane (service/api/predict.py `Lane`), which answers predictions outside Flask."""
    if policy.noauth and "REMOTE_ADDR" in env and not peer_is_loopback(env["REMOTE_ADDR"]):
        raise LoopbackOnly(
            "this API runs without authentication (auth=noauth) and answers local clients "
            "only; serve it with auth=keystone to reach it from other machines",
            details={"peer": env.get("REMOTE_ADDR") or None},
        )
    if policy.check_host:
        _check_host(policy, env)
    if method in SAFE_METHODS:
        return
    _check_origin(policy, env)
    if mimetype in FORM_TYPES:
        if not (mimetype == "multipart/form-data" and takes_forms):
            raise UnsupportedMediaType(
                f"this route does not take {mimetype} bodies (a web form); send "
                "Content-Type: application/json",
                details={"content_type": mimetype},
            )


def _request_host(env: dict[str, Any]) -> tuple[str, int | None] | None:
    raw = env.get("HTTP_HOST")
    if raw is None:
        return None
    parsed = split_host(raw)
    if parsed is None:
        raise HostNotAllowed("the Host header is malformed", details={"host": raw[:255]})
    return parsed


def _server_port(env: dict[str, Any]) -> int | None:
    try:
        return int(env.get("SERVER_PORT") or "")
    except ValueError:
        return None


def _check_host(policy: EdgePolicy, env: dict[str, Any]) -> None:
    host = _request_host(env)
    if host is None:
        return  # HTTP/1.0 without Host: not a browser (browsers always send it)
    name, port = host
    effective = port if port is not None else DEFAULT_PORTS.get(env.get("wsgi.url_scheme", ""))
    if effective is not None and policy.host_allowed(name, effective, _server_port(env)):
        return
    raw = env.get("HTTP_HOST", "")
    raise HostNotAllowed(
        f"this API does not answer to the host name {raw[:255]!r}; if that is one of its "
        "names (a proxy, a load balancer, a tunnel), add it to allowed_hosts",
        details={"host": raw[:255]},
    )


def _check_origin(policy: EdgePolicy, env: dict[str, Any]) -> None:
    origin = env.get("HTTP_ORIGIN")
    if origin is None:
        site = (env.get("HTTP_SEC_FETCH_SITE") or "").lower()
        if site in ("cross-site", "same-site"):
            raise CrossOriginRefused(
                "a page of another site may not change anything here",
                details={"sec_fetch_site": site},
            )
        return  # not a browser, or a same-origin request of a browser that omits Origin
    parsed = _origin_of(origin)
    if parsed is not None and (parsed in policy.origins or _same_origin(parsed, env)):
        return
    raise CrossOriginRefused(
        f"a page of the origin {origin[:255]!r} may not change anything here; list it in "
        "allowed_origins if it should",
        details={"origin": origin[:255]},
    )


def _same_origin(origin: tuple[str, str, int], env: dict[str, Any]) -> bool:
    scheme, name, port = origin
    raw = env.get("HTTP_HOST")
    host = split_host(raw) if raw is not None else None
    if host is None:
        return False
    host_name, host_port = host
    return host_name == name and (host_port or DEFAULT_PORTS[scheme]) == port


__all__ = ["EdgePolicy", "accepts_form", "install", "peer_is_loopback", "split_host"]
