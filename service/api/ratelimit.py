"""Per-project rate limits on job submissions and package uploads, shared by every API process.

Each (project, kind) has a bucket of `N` requests that refills at `N` per minute (the generic
cell rate algorithm, one Redis key holding the theoretical arrival time, updated by one Lua
script on Redis's own clock, so every API process and host counts against the same bucket).
A request over the limit answers 429 `too_many_requests` with `Retry-After` (whole seconds)
before the view runs; refused requests do not use up the bucket.

When Redis cannot be reached (or `redis_url` is no Redis) the limits are not enforced (fail
open: a limiter must not take the API down with it); this is logged at most once a minute per
process, and Redis is not asked again for a few seconds so that requests do not each wait for a
dead server.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from dataclasses import dataclass
from typing import Any

import redis
from flask import Flask, current_app, request

from service.api.auth import current_project
from service.api.errors import RateLimited
from service.config import Settings
from service.redact import redact

log = logging.getLogger("stackml.api.ratelimit")

EXTENSION = "stackml.ratelimit"
# (method, URL rule) -> the bucket it draws from
LIMITED = {("POST", "/v1/jobs"): "jobs", ("POST", "/v1/packages"): "packages"}
NOUNS = {"jobs": "job submissions", "packages": "package uploads", "predict": "predictions"}
REDIS_TIMEOUT = 0.5
# what redis-py connects to; another broker URL (e.g. kombu's memory://) has no shared counter
REDIS_SCHEMES = ("redis://", "rediss://", "unix://")
BACKOFF = 5.0  # seconds without asking Redis after it failed
LOG_EVERY = 60.0

# KEYS[1]: the bucket; ARGV[1]: seconds per request; ARGV[2]: burst (requests at once).
# Returns {1, "0"} when allowed, {0, "<seconds to wait>"} when not.
GCRA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local interval = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
if tat < now then tat = now end
local wait = tat + interval - now - burst * interval
if wait > 0 then return {0, tostring(wait)} end
local new_tat = tat + interval
redis.call('SET', KEYS[1], tostring(new_tat), 'PX', math.ceil((new_tat - now) * 1000) + 1000)
return {1, '0'}
"""


def client_url(url: str) -> str:
    """A URL redis-py understands for `url` (kombu's redis+socket:// is unix:// to it)."""
    if url.startswith("redis+socket://"):
        return "unix://" + url[len("redis+socket://") :]
    return url


@dataclass
class Limiter:
    """The buckets of one app (one Redis connection pool)."""

    redis_url: str
    prefix: str
    per_minute: dict[str, int]

    def __post_init__(self) -> None:
        self._client: Any = None
        self._script: Any = None
        self._lock = threading.Lock()
        self._down_until = 0.0
        self._logged_at = -math.inf
        if any(self.per_minute.values()) and not self.redis_url.startswith(REDIS_SCHEMES):
            log.warning(
                "rate limits not enforced: redis_url %s is not a Redis server",
                redact(self.redis_url),
            )

    @classmethod
    def from_settings(cls, settings: Settings) -> Limiter:
        return cls(
            redis_url=client_url(settings.redis_url),
            prefix=f"stackml:{settings.queue}:ratelimit",
            per_minute={
                "jobs": settings.rate_limit_jobs_per_minute,
                "packages": settings.rate_limit_packages_per_minute,
                "predict": settings.rate_limit_predict_per_minute,
            },
        )

    def _redis(self) -> Any:
        with self._lock:
            if self._client is None:
                self._client = redis.Redis.from_url(
                    self.redis_url,
                    socket_timeout=REDIS_TIMEOUT,
                    socket_connect_timeout=REDIS_TIMEOUT,
                )
                self._script = self._client.register_script(GCRA)
            return self._script

    def check(self, kind: str, project: str, cost: int = 1) -> None:
        """Take `cost` requests at once from (kind, project)'s bucket (GCRA with a cost: the
        interval times cost, the burst over cost); RateLimited when it holds fewer."""
        limit = self.per_minute.get(kind, 0)
        if limit <= 0 or not self.redis_url.startswith(REDIS_SCHEMES):
            return
        if time.monotonic() < self._down_until:
            return
        key = f"{self.prefix}:{kind}:{project}"
        try:
            allowed, wait = self._redis()(keys=[key], args=[60.0 * cost / limit, limit / cost])
        except (redis.RedisError, OSError, ValueError) as e:  # ValueError: a bad URL
            self._unreachable(e)
            return
        if int(allowed):
            return
        retry_after = max(1, math.ceil(float(wait)))
        noun = NOUNS.get(kind, kind)
        raise RateLimited(
            f"too many {noun} for project {project}: at most {limit} a minute; "
            f"retry in {retry_after}s",
            retry_after=retry_after,
            details={"limit": limit, "period_s": 60, "kind": kind, "retry_after_s": retry_after},
        )

    def _unreachable(self, e: Exception) -> None:
        now = time.monotonic()
        self._down_until = now + BACKOFF
        if now - self._logged_at >= LOG_EVERY:
            self._logged_at = now
            log.warning(
                "rate limits not enforced: Redis at %s is unreachable (%s); retrying in %.0fs",
                redact(self.redis_url),
                redact(str(e)),
                BACKOFF,
            )


def install(app: Flask, settings: Settings) -> None:
    """Count limited requests (call after auth.install: the caller's project is known)."""
    app.extensions[EXTENSION] = Limiter.from_settings(settings)
    app.before_request(_check)


def _check() -> None:
    rule = request.url_rule
    if rule is None:
        return
    kind = LIMITED.get((request.method, rule.rule))
    if kind is None:
        return
    limiter: Limiter = current_app.extensions[EXTENSION]
    limiter.check(kind, current_project())


__all__ = ["LIMITED", "Limiter", "client_url", "install"]
