"""Who is calling: the X-Auth-Token validated against Keystone (cached), or everyone is admin."""

from __future__ import annotations

import hashlib
import threading
import time
from dataclasses import dataclass

import requests

VALIDATE_TIMEOUT = 10.0


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
    both X-Auth-Token and X-Subject-Token (a user may validate its own token)."""

    def __init__(self, keystone_url: str | None, cache_seconds: float = 30.0) -> None:
        self.keystone_url = keystone_url.rstrip("/") if keystone_url else None
        self.cache_seconds = cache_seconds
        self._cache: dict[str, tuple[float, Context | None]] = {}
        self._lock = threading.Lock()
        self._http = requests.Session()

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

    def _validate(self, token: str) -> Context | None:
        url = f"{self.keystone_url}/v3/auth/tokens"
        try:
            r = self._http.get(
                url,
                headers={"X-Auth-Token": token, "X-Subject-Token": token},
                timeout=VALIDATE_TIMEOUT,
            )
        except requests.RequestException as e:
            raise KeystoneUnavailable(f"keystone at {self.keystone_url}: {e}") from e
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
