"""Who is calling: the project every request acts in (noauth now; the keystone seam below)."""

from __future__ import annotations

import ipaddress
import re
from typing import Protocol

from flask import Request, current_app, g, request

from service.config import Settings
from service.domain.errors import Unauthorized

PROJECT_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
EXTENSION = "stackml.auth"


class ConfigurationError(RuntimeError):
    """The API refuses to start with this configuration."""


class Authenticator(Protocol):
    def project_of(self, request: Request) -> str:
        """The caller's project id; raises Unauthorized when the request carries none."""


class NoAuth:
    """Every request acts in the one local project (the laptop setting)."""

    def __init__(self, project: str) -> None:
        if not PROJECT_RE.match(project):
            raise ConfigurationError(f"local_project {project!r} is not a valid project id")
        self.project = project

    def project_of(self, request: Request) -> str:
        return self.project


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def make_authenticator(settings: Settings) -> Authenticator:
    if settings.auth == "noauth":
        if not is_loopback(settings.host):
            raise ConfigurationError(
                f"auth=noauth refuses to serve on the non-loopback address {settings.host!r}; "
                "bind to 127.0.0.1 or configure keystone"
            )
        return NoAuth(settings.local_project)
    # keystone: keystonemiddleware will wrap the WSGI app and a KeystoneAuth here will read the
    # project from the validated token's X-Project-Id / X-Roles; until it exists, refuse to
    # start rather than trust headers anyone can send.
    raise ConfigurationError("auth=keystone is not available in this build yet")


def current_project() -> str:
    """The project of the request being served (computed once per request)."""
    project = g.get("project_id")
    if project is None:
        auth: Authenticator = current_app.extensions[EXTENSION]
        project = auth.project_of(request)
        if not PROJECT_RE.match(project):
            raise Unauthorized("the request's project id is not valid")
        g.project_id = project
    return str(project)
