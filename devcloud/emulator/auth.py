"""Who is calling: the X-Auth-Token validated against Keystone (cached), or everyone is admin."""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass

import requests

VALIDATE_TIMEOUT = 10.0
SERVICE_TOKEN_REUSE = 600.0  # seconds a service token is reused (Keystone's last an hour)


@dataclass(frozen=True)
class Context:
    project_id: str
    user_id: str
    roles: frozenset[str]

    @property
    def is_admin(self) -> bool:
        return "admin" in self.roles


NOAUTH = Context(
    project_id="admin", user_id="admin", roles=frozenset({"admin", "member", "reader"})
)


class KeystoneUnavailable(Exception):
    """Keystone did not answer the validation request."""


class Authenticator:
    """Validates tokens the way keystonemiddleware does: GET /v3/auth/tokens with the token as
    X-Subject-Token and, as X-Auth-Token, a service token of `service_auth` (the emulator's own
    Keystone user, like Nova's). Without `service_auth` a token validates itself, which Keystone
    refuses for trust-scoped tokens."""

    def __init__(
        self,
        keystone_url: str | None,
        cache_seconds: float = 30.0,
        service_auth: Mapping[str, str] | None = None,
    ) -> None:
        self.keystone_url = keystone_url.rstrip("/") if keystone_url else None
        self.cache_seconds = cache_seconds
        self.service_auth = dict(service_auth) if service_auth else None
        self._cache: dict[str, tuple[float, Context | None]] = {}
        self._lock = threading.Lock()
        self._http = requests.Session()
        self._service_token: tuple[float, str] | None = None
        self._service_lock = threading.Lock()

    def authenticate(self, token: str | None) -> Context | None:
        """The caller's context; None when the token is missing or not valid."""
        if self.keystone_url is None:
            return NOAUTH
        if not token:
            return None
        key = hashlib.sha256(token.encode()).hexdigest()
        now = time.monotonic()
        with self._lock:
            hit = self._cache.get(key)
            if hit and hit[0] > now:
                return hit[1]
        ctx = self._validate(token)
        with self._lock:
            if len(self._cache) > 10_000:
                self._cache.clear()
            self._cache[key] = (now + self.cache_seconds, ctx)
        return ctx

    def _service(self, renew: bool = False) -> str:
        """A token of the service user (cached until shortly before it expires)."""
        assert self.service_auth is not None
        with self._service_lock:
            if not renew and self._service_token and self._service_token[0] > time.monotonic():
                return self._service_token[1]
            a = self.service_auth
            body = {
                "auth": {
                    "identity": {
                        "methods": ["password"],
                        "password": {
                            "user": {
                                "name": a["username"],
                                "password": a["password"],
                                "domain": {"name": a.get("user_domain_name", "Default")},
                            }
                        },
                    },
                    "scope": {
                        "project": {
                            "name": a["project_name"],
                            "domain": {"name": a.get("project_domain_name", "Default")},
                        }
                    },
                }
            }
            try:
                r = self._http.post(
                    f"{self.keystone_url}/v3/auth/tokens", json=body, timeout=VALIDATE_TIMEOUT
                )
            except requests.RequestException as e:
                raise KeystoneUnavailable(f"keystone at {self.keystone_url}: {e}") from e
            if r.status_code != 201:
                raise KeystoneUnavailable(
                    f"keystone answered {r.status_code} to the emulator's service login"
                )
            token = r.headers["X-Subject-Token"]
            self._service_token = (time.monotonic() + SERVICE_TOKEN_REUSE, token)
            return token

    def _validate(self, token: str) -> Context | None:
        url = f"{self.keystone_url}/v3/auth/tokens"
        for renew in (False, True):
            auth = token if self.service_auth is None else self._service(renew)
            try:
                r = self._http.get(
                    url,
                    headers={"X-Auth-Token": auth, "X-Subject-Token": token},
                    timeout=VALIDATE_TIMEOUT,
                )
            except requests.RequestException as e:
                raise KeystoneUnavailable(f"keystone at {self.keystone_url}: {e}") from e
            if r.status_code == 401 and self.service_auth is not None and not renew:
                continue  # the service token itself expired or was revoked: log in again
            break
        if r.status_code in (401, 403, 404):
            return None
        if r.status_code != 200:
            raise KeystoneUnavailable(f"keystone answered {r.status_code} validating a token")
        body = r.json().get("token", {})
        project = body.get("project") or {}
        if not project.get("id"):
            return None  # unscoped or domain-scoped: nothing to act in
        return Context(
            project_id=project["id"],
            user_id=(body.get("user") or {}).get("id", ""),
            roles=frozenset(r["name"] for r in body.get("roles", []) if "name" in r),
        )
