"""Who is calling and what they may do: the `Caller` of every request (noauth or keystone) and
the one rule that says which role a request needs (see docs/security.md).

- `noauth`: every request is the one local project with every role; refuses non-loopback binds.
- `keystone`: keystonemiddleware's auth_token validates `X-Auth-Token` (it strips any identity
  headers a client sends and sets them from the validated token); the app reads the project,
  user and roles it set. The middleware defers every decision to the app, so the public routes
  (health, the OpenAPI document, the signed store) stay open and every refusal is rendered in
  the API's one error shape.

Roles: `reader` reads, `member` also writes (submit, cancel, delete, upload), `admin` does
everything, in every project (`?all_projects=true` on lists; any job by id). Reads need reader,
writes need member, unless a view says otherwise with `@public` or `@requires(role)`.
"""

from __future__ import annotations

import contextvars
import ipaddress
import logging
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from flask import Flask, Request, current_app, g, request

from service.api import bool_arg
from service.config import Settings
from service.domain.errors import Forbidden, ServiceUnavailable, Unauthorized

if TYPE_CHECKING:
    from _typeshed.wsgi import WSGIApplication

log = logging.getLogger("stackml.api.auth")

PROJECT_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
EXTENSION = "stackml.auth"

READER, MEMBER, ADMIN = "reader", "member", "admin"
PUBLIC = "public"
# a role implies the ones below it (Keystone's default implied roles say the same)
IMPLIED = {ADMIN: {ADMIN, MEMBER, READER}, MEMBER: {MEMBER, READER}, READER: {READER}}
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
_VIEW_ATTR = "_stackml_role"

# environ keys only this process sets (a client's headers arrive as HTTP_*, never as these)
_ENV_VALIDATED = "stackml.auth.authtoken"
_ENV_UNAVAILABLE = "stackml.auth.keystone_unavailable"

F = TypeVar("F", bound=Callable[..., Any])


class ConfigurationError(RuntimeError):
    """The API refuses to start with this configuration."""


class NotAuthenticated(Unauthorized):
    """No token, or one Keystone does not accept (invalid, expired, revoked)."""

    def __init__(self, message: str, *, challenge: str | None) -> None:
        super().__init__(message)
        self.headers = {"WWW-Authenticate": challenge} if challenge else {}


@dataclass(frozen=True)
class Caller:
    """Who makes the request being served. `token` is the caller's own Keystone token (None in
    noauth); it is left out of repr and comparisons so that it never lands in a log line."""

    project_id: str
    user_id: str
    roles: frozenset[str]
    token: str | None = field(default=None, repr=False, compare=False)
    # a Keystone admin reaches every project's rows; noauth's one project is all there is
    cross_project: bool = False

    def has(self, role: str) -> bool:
        return any(role in IMPLIED.get(r, ()) for r in self.roles)

    @property
    def is_admin(self) -> bool:
        return self.has(ADMIN)

    @property
    def reaches_all_projects(self) -> bool:
        return self.cross_project and self.is_admin


class Authenticator(Protocol):
    def wrap(self, app: WSGIApplication) -> WSGIApplication:
        """The WSGI app with this mode's middleware around it."""

    def caller(self, request: Request) -> Caller:
        """The caller; NotAuthenticated (401) when the request carries no valid identity."""


# -- noauth ---------------------------------------------------------------------------------


class NoAuth:
    """Every request acts in the one local project, with every role (the laptop setting); rows
    of any other project (left by an earlier keystone deployment) stay invisible."""

    def __init__(self, project: str) -> None:
        if not PROJECT_RE.match(project):
            raise ConfigurationError(f"local_project {project!r} is not a valid project id")
        self._caller = Caller(project, "local", frozenset({ADMIN, MEMBER, READER}))

    def wrap(self, app: WSGIApplication) -> WSGIApplication:
        return app

    def caller(self, request: Request | None) -> Caller:
        return self._caller  # (the request says nothing: the prediction lane passes none)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# -- keystone -------------------------------------------------------------------------------

# What stackml sets unless the operator does (the names are keystonemiddleware's own options).
AUTHTOKEN_DEFAULTS = {
    "auth_type": "password",
    "interface": "public",  # the middleware's default (internal) fails where only public exists
    "user_domain_name": "Default",
    "project_domain_name": "Default",
    "service_token_roles_required": "true",
}
# What stackml always sets: the app decides (public routes stay open; one error shape).
AUTHTOKEN_FORCED = {"delay_auth_decision": "true"}
AUTHTOKEN_REQUIRED = ("auth_url", "username", "password", "project_name")
_authtoken_trouble: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "stackml_authtoken_trouble", default=False
)


def authtoken_conf(raw: Mapping[str, Any]) -> dict[str, str]:
    """The middleware's options: the operator's `keystone_authtoken`, stackml's defaults
    under them and the forced options over them; ConfigurationError when incomplete."""
    given = {str(k): _option(v) for k, v in raw.items() if v is not None}
    conf = {**AUTHTOKEN_DEFAULTS, **given, **AUTHTOKEN_FORCED}
    if conf["auth_type"] == "password":
        missing = [k for k in AUTHTOKEN_REQUIRED if not conf.get(k)]
        if missing:
            raise ConfigurationError(
                "auth=keystone needs the service user's credentials in keystone_authtoken: "
                f"missing {', '.join(missing)} (see docs/security.md)"
            )
    conf.setdefault("www_authenticate_uri", conf.get("auth_url", ""))
    return conf


def _option(value: Any) -> str:
    """An option value as the middleware's paste-style configuration takes it (YAML may give
    numbers, booleans or lists)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list | tuple):
        return ",".join(str(v) for v in value)
    return str(value)


def _split_conf(conf: Mapping[str, str]) -> tuple[dict[str, str], dict[str, str]]:
    """(the middleware's own options, the auth plugin's options)."""
    from keystonemiddleware import auth_token

    own = {o.dest for _, opts in auth_token.list_opts() for o in opts}
    own |= {d.name for _, opts in auth_token.list_opts() for o in opts for d in o.deprecated_opts}
    mw = {k: v for k, v in conf.items() if k in own}
    plugin = {k: v for k, v in conf.items() if k not in own}
    return mw, plugin


def _local_oslo_config(auth_type: str, plugin: Mapping[str, str]) -> Any:
    """A private oslo.config object holding the auth plugin's options: nothing global is
    touched, so several apps (tests) live in one process, and no unknown-option warnings."""
    from keystoneauth1 import exceptions as ksa_exceptions
    from keystoneauth1 import loading
    from oslo_config import cfg

    group = "keystone_authtoken"
    conf = cfg.ConfigOpts()
    try:
        loader: Any = loading.get_plugin_loader(auth_type)
    except ksa_exceptions.NoMatchingPlugin as e:
        raise ConfigurationError(f"keystone_authtoken.auth_type {auth_type!r}: {e}") from e
    opts = loading.get_auth_plugin_conf_options(loader)
    conf.register_opts(opts, group=group)
    known = {o.dest for o in opts}
    unknown = sorted(set(plugin) - known)
    if unknown:
        raise ConfigurationError(
            f"keystone_authtoken: unknown option(s) {', '.join(unknown)} for auth_type "
            f"{auth_type!r}"
        )
    for k, v in plugin.items():
        conf.set_override(k, v, group=group)
    return conf


def _middleware_class() -> type:
    import webob.exc
    from keystoneauth1 import exceptions as ksa_exceptions
    from keystonemiddleware import auth_token
    from keystonemiddleware.auth_token import _exceptions as ksm_exceptions

    class StackMLAuthToken(auth_token.AuthProtocol):
        """auth_token that never answers by itself: it validates, strips spoofed identity
        headers, sets the real ones, and leaves every decision (and every error body) to the
        app. When Keystone cannot be asked, it tells the app (which answers 503, not 401)."""

        def process_request(self, request: Any) -> None:
            request.environ[_ENV_VALIDATED] = True
            reset = _authtoken_trouble.set(False)
            try:
                super().process_request(request)
            except webob.exc.HTTPUnauthorized:
                pass  # not with delay_auth_decision; the app answers 401 in its own shape
            except (webob.exc.HTTPException, ksa_exceptions.ClientException) as e:
                log.error("keystonemiddleware cannot validate tokens: %s", e)
                request.environ[_ENV_UNAVAILABLE] = True
            finally:
                if _authtoken_trouble.get():
                    request.environ[_ENV_UNAVAILABLE] = True
                _authtoken_trouble.reset(reset)

        def fetch_token(self, token: str, **kwargs: Any) -> Any:
            try:
                return super().fetch_token(token, **kwargs)
            except ksm_exceptions.InvalidToken as e:
                # with delay_auth_decision the middleware reports an unreachable Keystone as
                # an invalid token; this is the only way to tell the two apart
                if str(e).startswith("Keystone unavailable"):
                    _authtoken_trouble.set(True)
                raise

        def process_response(self, response: Any) -> Any:
            return response  # the app's 401 already carries WWW-Authenticate

    return StackMLAuthToken


class KeystoneAuth:
    """Tokens validated by keystonemiddleware against Keystone (see the module docstring)."""

    def __init__(self, raw_conf: Mapping[str, Any]) -> None:
        try:
            import keystonemiddleware.auth_token  # noqa: F401 - fail at start, not per request
        except ImportError as e:
            raise ConfigurationError(
                "auth=keystone needs the keystonemiddleware package (pip install "
                "'keystonemiddleware>=10')"
            ) from e
        self.conf = authtoken_conf(raw_conf)
        self.challenge = f'Keystone uri="{self.conf["www_authenticate_uri"]}"'
        mw, plugin = _split_conf(self.conf)
        self._mw_conf: dict[str, Any] = dict(mw)
        self._mw_conf["oslo_config_config"] = _local_oslo_config(self.conf["auth_type"], plugin)

    def wrap(self, app: WSGIApplication) -> WSGIApplication:
        cls = _middleware_class()
        wrapped: WSGIApplication = cls(app, dict(self._mw_conf))
        return wrapped

    def caller(self, request: Request) -> Caller:
        env = request.environ
        if not env.get(_ENV_VALIDATED):
            # the middleware did not see this request: trust nothing in its headers
            log.error("request reached the app without keystonemiddleware; refusing it")
            raise NotAuthenticated("authentication is not configured", challenge=self.challenge)
        if env.get(_ENV_UNAVAILABLE):
            raise ServiceUnavailable(
                "the identity service cannot validate tokens right now; retry later",
                retry_after=5,
            )
        headers = request.headers
        if headers.get("X-Identity-Status") != "Confirmed":
            if not headers.get("X-Auth-Token"):
                raise NotAuthenticated(
                    "this request needs a Keystone token in the X-Auth-Token header",
                    challenge=self.challenge,
                )
            raise NotAuthenticated(
                "the token is not valid (expired, revoked or malformed); get a new one",
                challenge=self.challenge,
            )
        project = headers.get("X-Project-Id") or ""
        if not project:
            raise Forbidden("stackml needs a project-scoped token")
        if not PROJECT_RE.match(project):
            raise NotAuthenticated("the token's project id is not valid", challenge=None)
        roles = _roles(headers.get("X-Roles", "").split(","))
        return Caller(
            project_id=project,
            user_id=headers.get("X-User-Id") or "",
            roles=roles,
            token=headers.get("X-Auth-Token") or None,
            cross_project=True,
        )


def _roles(names: Iterable[str]) -> frozenset[str]:
    return frozenset(n.strip().lower() for n in names if n.strip())


# -- the factory and the rule ----------------------------------------------------------------


def make_authenticator(settings: Settings) -> Authenticator:
    if settings.auth == "noauth":
        if not is_loopback(settings.host):
            raise ConfigurationError(
                f"auth=noauth refuses to serve on the non-loopback address {settings.host!r}: "
                "without authentication anyone who reaches it could run jobs; bind to "
                "127.0.0.1 or set auth=keystone"
            )
        return NoAuth(settings.local_project)
    if settings.auth == "keystone":
        raw = getattr(settings, "keystone_authtoken", None) or {}
        if not isinstance(raw, Mapping):
            raise ConfigurationError("keystone_authtoken must be a mapping of option: value")
        return KeystoneAuth(raw)
    raise ConfigurationError(f"unknown auth mode {settings.auth!r}")


def install(app: Flask, authenticator: Authenticator) -> None:
    """Put the authenticator's middleware around `app` and check every request's role."""
    app.extensions[EXTENSION] = authenticator
    app.wsgi_app = authenticator.wrap(app.wsgi_app)  # type: ignore[method-assign, assignment]
    app.before_request(_authorize)


def public(view: F) -> F:
    """Mark a view as open to anyone (no token): health, the OpenAPI document, signed URLs."""
    setattr(view, _VIEW_ATTR, PUBLIC)
    return view


def requires(role: str) -> Callable[[F], F]:
    """Mark a view as needing `role` (e.g. admin) instead of the rule by method."""
    if role not in IMPLIED:
        raise ValueError(f"unknown role {role!r}")

    def mark(view: F) -> F:
        setattr(view, _VIEW_ATTR, role)
        return view

    return mark


def required_role(method: str, view: Callable[..., Any] | None) -> str:
    marked = getattr(view, _VIEW_ATTR, None)
    if isinstance(marked, str):
        return marked
    return READER if method in SAFE_METHODS else MEMBER


def _authorize() -> None:
    if request.endpoint is None:
        return  # no such route (404/405): the answer reveals nothing
    role = required_role(request.method, current_app.view_functions.get(request.endpoint))
    if role == PUBLIC:
        return
    caller = current()
    if not caller.has(role):
        what = "read" if role == READER else ("change anything" if role == MEMBER else "do this")
        raise Forbidden(
            f"your roles in this project do not allow you to {what}; it needs the {role} role",
            details={"required_role": role},
        )


def current() -> Caller:
    """The caller of the request being served (worked out once per request)."""
    caller = g.get("stackml_caller")
    if caller is None:
        authenticator: Authenticator = current_app.extensions[EXTENSION]
        caller = authenticator.caller(request)
        g.stackml_caller = caller
    assert isinstance(caller, Caller)
    return caller


def current_project() -> str:
    """The project the request acts in (its rows, its quotas)."""
    return current().project_id


def job_scope() -> str | None:
    """The project whose rows a by-id lookup may see: the caller's, or None (all) for admin."""
    caller = current()
    return None if caller.reaches_all_projects else caller.project_id


def list_scope(all_projects: bool) -> str | None:
    """The project a listing shows: the caller's; with `all_projects`, every one (admin only)."""
    caller = current()
    if not all_projects:
        return caller.project_id
    if not caller.is_admin:
        raise Forbidden(
            "all_projects=true needs the admin role", details={"parameter": "all_projects"}
        )
    return None if caller.reaches_all_projects else caller.project_id


def all_projects_arg() -> bool:
    return bool_arg("all_projects")


__all__ = [
    "ADMIN",
    "MEMBER",
    "READER",
    "Caller",
    "ConfigurationError",
    "KeystoneAuth",
    "NoAuth",
    "NotAuthenticated",
    "current",
    "current_project",
    "install",
    "job_scope",
    "list_scope",
    "make_authenticator",
    "public",
    "requires",
]


def delegate_trust(settings: Settings, project: str) -> str:
    """A Keystone trust of the caller for `project` (service/trusts.py), made with the
    caller's token before anything is stored: what a job's or an endpoint's workers act
    through with keystone auth and per-project tenancy."""
    from service import trusts

    caller = current()
    if caller.token is None:
        raise ServiceUnavailable("the request carries no Keystone token to delegate")
    return trusts.create(
        settings,
        token=caller.token,
        user_id=caller.user_id,
        project_id=project,
        roles=caller.roles,
    )


def drop_trust_quietly(settings: Settings, trust_id: str, what: str) -> None:
    """Delete a trust no row holds (the request that made it was refused afterwards); a
    failure is logged, not raised: the refusal being raised must reach the caller."""
    from service import trusts

    try:
        trusts.delete(settings, trust_id)
    except Exception as e:  # noqa: BLE001 - see above
        log.warning("trust %s of %s that failed is left in Keystone: %s", trust_id, what, e)
