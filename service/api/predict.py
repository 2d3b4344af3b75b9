"""Online prediction: the API proxies TensorFlow Serving's REST calls to an endpoint's replicas.

Routes (TF Serving's shapes; `verb` is predict, classify or regress):

    POST /v1/models/<name>:<verb>                      the endpoint's default route
    POST /v1/models/<name>/versions/<v>:<verb>         a version its replicas serve
    POST /v1/models/<name>/labels/<label>:<verb>       the version a label points at
    GET  /v1/models/<name>/metadata, /versions/<v>/metadata

The default route goes to the endpoint's `serving_version`, or, when the endpoint has a
`traffic` split, to the version a stable hash of the caller key picks (header
`X-Stackml-Caller`, else the caller's Keystone user id, else the client address): the same
caller always lands on the same version, and the split's percentages hold over many callers.

A replica is a `resources` row of the model's endpoint (owner_kind 'endpoint') in replica_state
'ready' serving the target version; the rows are read from the database and cached for
`predict_route_cache_seconds` (dropped at once on a failure; a request the cached copy cannot
serve - no endpoint, version, label or ready replica - reads the database again before it is
refused, so a fresh deploy answers at once). Each replica has a keep-alive connection pool
(HTTP/1.1 spoken on the socket: headers and body leave in one send, TCP_NODELAY; an idle
connection the replica closed is noticed before reuse). A request is always forwarded to the
replica's explicit version path (`/v1/models/<name>/versions/<v>:<verb>`), so the
`X-Model-Version` header names the version that answered. A connection failure, a reset, an
answer that is not JSON (not a model server: another server at a gone replica's address), or a
502/503 from a replica is retried ONCE on another ready replica of the same version (predict is
idempotent), and the failed replica is avoided for `predict_suspect_seconds`; a replica that
took the request and did not answer within `predict_read_timeout` is not retried (504
replica_timeout). The replica's answer (status, body, TF Serving's `{"error": ...}` included)
passes through unchanged; the platform's own refusals use the API's error shape: 404 not_found
(no such model, version, label or method in the caller's project), 404 no_endpoint (the model
has no endpoint), 503 no_replica + Retry-After (no ready replica serves the version yet, or
none answered), 504 replica_timeout, 413, 429.

Roles: predicting and reading metadata need the `reader` role (they change nothing in the
project); see docs/security.md.
"""

from __future__ import annotations

import functools
import hashlib
import io
import itertools
import logging
import re
import select as selectors_
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from flask import Blueprint, Flask, Request, Response, current_app, g, request
from flask.blueprints import BlueprintSetupState
from sqlalchemy import select
from werkzeug.http import HTTP_STATUS_CODES, parse_options_header

from service.api import Context, auth, ctx, guard
from service.api.auth import READER, current, current_project, requires
from service.api.errors import (
    REQUEST_ID_ENV,
    REQUEST_ID_HEADER,
    RateLimited,
    new_request_id,
    request_id,
)
from service.api.metrics import STARTED_ENV, observe
from service.config import Settings
from service.db.models import Endpoint, Model, ModelLabel, ModelVersion, Resource
from service.domain.errors import NotFound, StackMLError
from service.serving_log import Record, ServingLog

log = logging.getLogger("stackml.api.predict")

bp = Blueprint("predict", __name__)

EXTENSION = "stackml.predict"
LOG_EXTENSION = "stackml.serving_log"
TOKENS_EXTENSION = "stackml.predict.tokens"
VERBS = ("predict", "classify", "regress")
_VERB = "<verb>"  # predict, classify or regress (checked by the view: anything else is a 404)
RULE_DEFAULT = f"/v1/models/<name>:{_VERB}"
RULE_VERSION = f"/v1/models/<name>/versions/<int:version>:{_VERB}"
RULE_LABEL = f"/v1/models/<name>/labels/<label>:{_VERB}"
PREDICT_RULES = (RULE_DEFAULT, RULE_VERSION, RULE_LABEL)
NAME_RE = re.compile(r"^[a-z][a-z0-9_-]{0,62}$")
CALLER_HEADER = "X-Stackml-Caller"
VERSION_HEADER = "X-Model-Version"
RETRY_STATUSES = frozenset({502, 503})
NO_REPLICA_RETRY_AFTER = 1
PRUNE_EVERY = 30.0  # seconds between two sweeps of the pools of replicas no longer in use
# what passes from a replica's answer to the client (hop-by-hop and length are ours)
PASSED_HEADERS = ("Content-Type",)


class NoReplica(StackMLError):
    """No ready replica serves the version the request goes to (or none answered)."""

    status = 503
    code = "no_replica"

    def __init__(self, message: str, *, details: dict[str, Any] | None = None) -> None:
        super().__init__(message, details=details)
        self.retry_after = NO_REPLICA_RETRY_AFTER


class NoEndpoint(NotFound):
    """The model exists but has no endpoint (nothing deployed): not a transient state."""

    code = "no_endpoint"


class ReplicaTimeout(StackMLError):
    status = 504
    code = "replica_timeout"


@dataclass(frozen=True)
class Replica:
    host: str
    port: int
    version: int

    @property
    def key(self) -> tuple[str, int]:
        return (self.host, self.port)


class ReplicaDown(Exception):
    """The replica could not be reached, or the connection broke before an answer: the
    request had no effect there (safe to send to another replica)."""


class ReplicaSlow(Exception):
    """The replica took the request and did not answer within the read timeout."""


@dataclass(frozen=True)
class Upstream:
    """A replica's answer."""

    status: int
    content_type: str | None
    data: bytes


class BadResponse(Exception):
    """The replica's answer is not an HTTP/1.x response this proxy can read."""


MAX_HEAD_BYTES = 64 * 1024  # a replica's status line and headers
MAX_RESPONSE_BYTES = 256 * 1024 * 1024  # a replica's body (predictions of a large batch)
NO_BODY = frozenset({204, 304})
JSON_TYPE = "application/json"


class ReplicaConn:
    """One keep-alive HTTP/1.1 connection to a replica, spoken directly on the socket: the
    request (line, headers, body) leaves in one send, the answer is read with as few recv
    calls as it arrived in (usually one) and parsed by splitting lines. http.client did the
    same with an email-package header parser and a file object per response: 0.1 ms of the
    0.8 ms of CPU the API spent per proxied prediction (bench/bench_proxy.py)."""

    __slots__ = ("host", "port", "sock", "_head", "_version")

    def __init__(self, host: str, port: int, sock: socket.socket) -> None:
        self.host, self.port, self.sock = host, port, sock
        self._head = f"Host: {host}:{port}\r\n".encode("latin-1")
        self._version = "1.1"  # of the last response's status line

    def close(self) -> None:
        self.sock.close()

    def idle_ok(self) -> bool:
        """An idle keep-alive connection has nothing to read: readable means the replica
        closed it (or sent junk); it must not be reused."""
        return not selectors_.select([self.sock], [], [], 0)[0]

    def send(self, method: str, path: str, body: bytes | None, headers: dict[str, str]) -> None:
        lines = [f"{method} {path} HTTP/1.1\r\n".encode("latin-1"), self._head]
        for k, v in headers.items():
            lines.append(f"{k}: {v}\r\n".encode("latin-1"))
        lines.append(f"Content-Length: {len(body) if body else 0}\r\n\r\n".encode("latin-1"))
        if body:
            lines.append(body)
        self.sock.sendall(b"".join(lines))

    def receive(self) -> tuple[int, str | None, bytes, bool]:
        """(status, content type, body, whether the connection may be reused)."""
        buf = b""
        while True:  # 1xx interim answers are skipped, as http.client does
            buf, status, headers, rest = self._read_head(buf)
            if status >= 200:
                break
            buf = rest
        keep = headers.get("connection", "").lower() != "close" and self._version_keeps(headers)
        if status in NO_BODY:
            return status, headers.get("content-type"), b"", keep and not rest
        if "chunked" in headers.get("transfer-encoding", "").lower():
            body, rest = self._read_chunked(rest)
        elif "content-length" in headers:
            try:
                length = int(headers["content-length"])
            except ValueError as e:
                raise BadResponse(f"Content-Length {headers['content-length'][:32]!r}") from e
            if not 0 <= length <= MAX_RESPONSE_BYTES:
                raise BadResponse(f"Content-Length {length} out of bounds")
            body, rest = self._read_exactly(rest, length)
        else:  # the body ends when the replica closes the connection
            body, rest, keep = self._read_to_close(rest), b"", False
        return status, headers.get("content-type"), body, keep and not rest

    def _version_keeps(self, headers: dict[str, str]) -> bool:
        if self._version == "1.1":
            return True
        return headers.get("connection", "").lower() == "keep-alive"

    def _recv(self) -> bytes:
        data = self.sock.recv(65536)
        if not data:
            raise ConnectionResetError("the replica closed the connection")
        return data

    def _read_head(self, buf: bytes) -> tuple[bytes, int, dict[str, str], bytes]:
        while (end := buf.find(b"\r\n\r\n")) < 0:
            if len(buf) > MAX_HEAD_BYTES:
                raise BadResponse("the response head is too long")
            buf += self._recv()
        lines = buf[:end].decode("latin-1").split("\r\n")
        parts = lines[0].split(" ", 2)
        if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
            raise BadResponse(f"not an HTTP/1.x status line: {lines[0][:64]!r}")
        self._version = parts[0][5:]
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if not sep:
                raise BadResponse(f"not a header line: {line[:64]!r}")
            headers[name.strip().lower()] = value.strip()
        return buf, int(parts[1]), headers, buf[end + 4 :]

    def _read_exactly(self, buf: bytes, length: int) -> tuple[bytes, bytes]:
        if len(buf) < length:
            parts, have = [buf], len(buf)
            while have < length:
                data = self._recv()
                parts.append(data)
                have += len(data)
            buf = b"".join(parts)
        return buf[:length], buf[length:]

    def _read_chunked(self, buf: bytes) -> tuple[bytes, bytes]:
        out: list[bytes] = []
        total = 0
        while True:
            while (eol := buf.find(b"\r\n")) < 0:
                if len(buf) > MAX_HEAD_BYTES:
                    raise BadResponse("a chunk size line is too long")
                buf += self._recv()
            size_text = buf[:eol].split(b";", 1)[0].strip()
            try:
                size = int(size_text, 16)
            except ValueError as e:
                raise BadResponse(f"chunk size {size_text[:16]!r}") from e
            total += size
            if size < 0 or total > MAX_RESPONSE_BYTES:
                raise BadResponse("chunked body out of bounds")
            buf = buf[eol + 2 :]
            if size == 0:  # trailers, then the blank line
                while (end := buf.find(b"\r\n")) != 0:
                    if end > 0:
                        buf = buf[end + 2 :]
                        continue
                    if len(buf) > MAX_HEAD_BYTES:
                        raise BadResponse("the trailers are too long")
                    buf += self._recv()
                return b"".join(out), buf[2:]
            chunk, buf = self._read_exactly(buf, size + 2)
            if chunk[-2:] != b"\r\n":
                raise BadResponse("a chunk does not end with CRLF")
            out.append(chunk[:-2])

    def _read_to_close(self, buf: bytes) -> bytes:
        parts, have = [buf], len(buf)
        while data := self.sock.recv(65536):
            have += len(data)
            if have > MAX_RESPONSE_BYTES:
                raise BadResponse("the response body is too long")
            parts.append(data)
        return b"".join(parts)


class ReplicaPool:
    """Keep-alive connections to one replica (LIFO: the warmest first; at most `size` idle)."""

    def __init__(self, host: str, port: int, size: int, connect: float, read: float) -> None:
        self.host, self.port, self.size = host, port, size
        self.connect_timeout, self.read_timeout = connect, read
        self._idle: list[ReplicaConn] = []
        self._lock = threading.Lock()

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()

    def _checkout(self) -> ReplicaConn:
        while True:
            with self._lock:
                conn = self._idle.pop() if self._idle else None
            if conn is None:
                break
            if conn.idle_ok():
                return conn
            conn.close()
        try:
            sock = socket.create_connection((self.host, self.port), timeout=self.connect_timeout)
        except OSError as e:
            raise ReplicaDown(f"connect: {e}") from e
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.settimeout(self.read_timeout)
        return ReplicaConn(self.host, self.port, sock)

    def request(
        self, method: str, path: str, body: bytes | None, headers: dict[str, str]
    ) -> Upstream:
        conn = self._checkout()
        sent = False
        try:
            conn.send(method, path, body, headers)
            sent = True
            status, content_type, data, keep = conn.receive()
        except TimeoutError as e:
            conn.close()
            if sent:
                raise ReplicaSlow(str(e)) from e
            raise ReplicaDown(f"send: {e}") from e
        except (OSError, BadResponse) as e:  # refused, reset, closed, garbled
            conn.close()
            raise ReplicaDown(f"{type(e).__name__}: {e}") from e
        except BaseException:
            conn.close()
            raise
        if not (content_type or "").lower().startswith(JSON_TYPE):
            # TF Serving answers JSON, errors included: anything else is another server at the
            # replica's address (a gone VM's address reused, or routed elsewhere: seen here, an
            # egress proxy's 404 with an empty body). Never pass it off as the model's answer.
            conn.close()
            raise ReplicaDown(
                f"HTTP {status} with {content_type or 'no content type'}: not a model server"
            )
        if keep:
            with self._lock:
                if len(self._idle) < self.size:
                    self._idle.append(conn)
                    return Upstream(status, content_type, data)
        conn.close()
        return Upstream(status, content_type, data)


@dataclass(frozen=True)
class Route:
    """What the database says about one model, as the proxy needs it (cached briefly)."""

    model_id: str
    versions: frozenset[int]
    labels: dict[str, int]
    endpoint_id: str | None
    serving_version: int | None
    traffic: tuple[tuple[int, int], ...]  # (version, percent), by version
    log_sample_rate: float
    replicas: dict[int, tuple[Replica, ...]]
    read_at: float


class Tokens:
    """The per-project predict rate limit, on the shared Redis bucket of service/api/ratelimit.py
    (kind "predict"), taken in chunks so that most predictions do not wait on Redis: a process
    takes `chunk` requests at once (1% of a minute's limit, at most 50) and spends them within
    HOLD seconds (unspent ones are dropped: the limit is never exceeded, a process may at worst
    leave part of a chunk unused). Near the limit it falls back to one at a time."""

    HOLD = 1.0

    def __init__(self, limiter: Any, per_minute: int) -> None:
        self.limiter = limiter
        self.per_minute = per_minute
        self.chunk = max(1, min(50, per_minute // 100))
        self._held: dict[str, tuple[int, float]] = {}
        self._lock = threading.Lock()

    def take(self, project: str) -> None:
        """One prediction of `project`; RateLimited (429) when its bucket is empty."""
        if self.per_minute <= 0:
            return
        now = time.monotonic()
        with self._lock:
            left, since = self._held.get(project, (0, 0.0))
            if left > 0 and now - since < self.HOLD:
                self._held[project] = (left - 1, since)
                return
        got = self.chunk
        try:
            self.limiter.check("predict", project, cost=got)
        except RateLimited:
            if got == 1:
                raise
            got = 1
            self.limiter.check("predict", project, cost=1)  # raises when none is left
        with self._lock:
            self._held[project] = (got - 1, now)


def split_version(traffic: tuple[tuple[int, int], ...], key: str) -> int | None:
    """The version of a traffic split a caller key lands on: a stable hash of the key picks a
    point in [0, 100); the versions own consecutive ranges of their percent, by version."""
    total = sum(p for _, p in traffic)
    if total <= 0:
        return None
    digest = hashlib.sha256(key.encode("utf-8", errors="replace")).digest()
    point = int.from_bytes(digest[:8], "big") % total
    upto = 0
    for version, percent in traffic:
        upto += percent
        if point < upto:
            return version
    return traffic[-1][0]


def _traffic(raw: Any) -> tuple[tuple[int, int], ...]:
    out: list[tuple[int, int]] = []
    if isinstance(raw, dict):
        for k, v in raw.items():
            try:
                version, percent = int(k), int(v)
            except (TypeError, ValueError):
                continue
            if percent > 0:
                out.append((version, percent))
    return tuple(sorted(out))


class Proxy:
    """The routing cache, the connection pools and the suspect list of one app."""

    def __init__(self, settings: Settings, context: Context) -> None:
        self.settings, self.context = settings, context
        self.cache_seconds = settings.predict_route_cache_seconds
        self.suspect_seconds = settings.predict_suspect_seconds
        self._routes: dict[tuple[str, str], Route] = {}
        self._pools: dict[tuple[str, int], ReplicaPool] = {}
        self._suspect: dict[tuple[str, int], float] = {}
        self._lock = threading.Lock()
        self._turn = itertools.count()
        self._pruned_at = time.monotonic()

    # -- routing table ------------------------------------------------------------------

    def route(self, project: str, name: str) -> Route:
        key = (project, name)
        now = time.monotonic()
        cached = self._routes.get(key)
        if cached is not None and now - cached.read_at < self.cache_seconds:
            return cached
        route = self._read(project, name, now)
        with self._lock:
            self._routes[key] = route
        if now - self._pruned_at >= PRUNE_EVERY:
            self._prune(now)
        return route

    def _prune(self, now: float) -> None:
        """Close the pools (and forget the suspects) of replicas no fresh route names any
        more: replaced or deleted replicas must not keep sockets open in this process."""
        with self._lock:
            self._pruned_at = now
            fresh = {k: r for k, r in self._routes.items() if now - r.read_at < PRUNE_EVERY}
            self._routes = fresh
            live = {rep.key for r in fresh.values() for reps in r.replicas.values() for rep in reps}
            gone = [self._pools.pop(k) for k in list(self._pools) if k not in live]
            self._suspect = {k: t for k, t in self._suspect.items() if t > now}
        for pool in gone:
            pool.close()

    def forget(self, project: str, name: str) -> None:
        with self._lock:
            self._routes.pop((project, name), None)

    def _read(self, project: str, name: str, now: float) -> Route:
        with self.context.session() as s:
            model_id = s.scalar(
                select(Model.id).where(Model.project_id == project, Model.name == name)
            )
            if model_id is None:
                raise NotFound(f"no model {name!r} in this project", details={"model": name})
            versions = frozenset(
                s.scalars(select(ModelVersion.version).where(ModelVersion.model_id == model_id))
            )
            labels = {
                n: v
                for n, v in s.execute(
                    select(ModelLabel.name, ModelLabel.version).where(
                        ModelLabel.model_id == model_id
                    )
                )
            }
            ep = s.scalars(
                select(Endpoint)
                .where(Endpoint.model_id == model_id, Endpoint.state != "DELETED")
                .order_by(Endpoint.created_at.desc())
                .limit(1)
            ).first()
            replicas: dict[int, list[Replica]] = {}
            if ep is not None:
                rows = s.execute(
                    select(Resource.host, Resource.serving_port, Resource.version)
                    .where(
                        Resource.owner_kind == "endpoint",
                        Resource.owner_id == ep.id,
                        Resource.replica_state == "ready",
                    )
                    .order_by(Resource.id)
                )
                for host, port, version in rows:
                    if host and port and version is not None:
                        replicas.setdefault(int(version), []).append(
                            Replica(str(host), int(port), int(version))
                        )
            return Route(
                model_id=model_id,
                versions=versions,
                labels=labels,
                endpoint_id=ep.id if ep is not None else None,
                serving_version=ep.serving_version if ep is not None else None,
                traffic=_traffic(ep.traffic) if ep is not None else (),
                log_sample_rate=float(ep.log_sample_rate or 0.0) if ep is not None else 0.0,
                replicas={v: tuple(r) for v, r in replicas.items()},
                read_at=now,
            )

    # -- replicas -----------------------------------------------------------------------

    def pick(self, replicas: tuple[Replica, ...], avoid: Replica | None = None) -> Replica:
        """Round robin over the replicas that are not suspect (all of them if every one is);
        never `avoid` while another exists."""
        now = time.monotonic()
        pool = [r for r in replicas if r != avoid] or list(replicas)
        healthy = [r for r in pool if self._suspect.get(r.key, 0.0) <= now] or pool
        return healthy[next(self._turn) % len(healthy)]

    def suspect(self, replica: Replica) -> None:
        with self._lock:
            self._suspect[replica.key] = time.monotonic() + self.suspect_seconds

    def pool(self, replica: Replica) -> ReplicaPool:
        pool = self._pools.get(replica.key)
        if pool is None:
            with self._lock:
                pool = self._pools.get(replica.key)
                if pool is None:
                    pool = ReplicaPool(
                        replica.host,
                        replica.port,
                        self.settings.predict_pool_size,
                        self.settings.predict_connect_timeout,
                        self.settings.predict_read_timeout,
                    )
                    self._pools[replica.key] = pool
        return pool

    def call(
        self, replica: Replica, method: str, path: str, body: bytes | None, rid: str
    ) -> Upstream:
        headers = {"X-Request-Id": rid}
        if body is not None:
            headers["Content-Type"] = "application/json"
        return self.pool(replica).request(method, path, body, headers)

    def forward(
        self, project: str, name: str, route: Route, version: int, method: str, suffix: str,
        body: bytes | None, rid: str,
    ) -> Upstream:  # fmt: skip
        """The answer of a ready replica of `version` (one retry on another on a failure)."""
        replicas = route.replicas.get(version, ())
        if not replicas:
            raise NoReplica(
                f"no ready replica of model {name!r} serves version {version}; retry later",
                details={"model": name, "version": version},
            )
        path = f"/v1/models/{name}/versions/{version}{suffix}"
        first = self.pick(replicas)
        try:
            resp = self.call(first, method, path, body, rid)
            if resp.status not in RETRY_STATUSES:
                return resp
            failed: str = f"HTTP {resp.status}"
        except ReplicaSlow as e:
            raise ReplicaTimeout(
                f"the replica serving version {version} did not answer within "
                f"{self.settings.predict_read_timeout:g}s",
                details={"model": name, "version": version},
            ) from e
        except ReplicaDown as e:
            resp = None
            failed = str(e)
        self.suspect(first)
        self.forget(project, name)
        log.warning(
            "predict %s: replica %s:%d (%s v%d) failed (%s); retrying once on another",
            rid, first.host, first.port, name, version, failed,
        )  # fmt: skip
        second = self.pick(replicas, avoid=first)
        try:
            again = self.call(second, method, path, body, rid)
        except ReplicaSlow as e:
            raise ReplicaTimeout(
                f"the replica serving version {version} did not answer within "
                f"{self.settings.predict_read_timeout:g}s",
                details={"model": name, "version": version},
            ) from e
        except ReplicaDown as e:
            self.suspect(second)
            if resp is not None:
                return resp  # the first replica's own 502/503 answer passes through
            raise NoReplica(
                f"no replica of model {name!r} version {version} answered; retry later",
                details={"model": name, "version": version, "tried": 2},
            ) from e
        if again.status in RETRY_STATUSES:
            self.suspect(second)
        return again


def proxy() -> Proxy:
    p: Proxy = current_app.extensions[EXTENSION]
    return p


def _tokens() -> Tokens:
    return tokens_of(current_app._get_current_object())  # type: ignore[attr-defined]


def tokens_of(app: Flask) -> Tokens:
    tokens: Tokens | None = app.extensions.get(TOKENS_EXTENSION)
    if tokens is None:
        from service.api import ratelimit

        limiter = app.extensions[ratelimit.EXTENSION]
        tokens = Tokens(limiter, app.extensions["stackml"].settings.rate_limit_predict_per_minute)
        app.extensions[TOKENS_EXTENSION] = tokens
    return tokens


def serving_log() -> ServingLog:
    s: ServingLog = current_app.extensions[LOG_EXTENSION]
    return s


def _setup(state: BlueprintSetupState) -> None:
    app = state.app
    assert isinstance(app, Flask)
    context = app.extensions["stackml"]
    settings: Settings = context.settings
    app.extensions[EXTENSION] = Proxy(settings, context)
    app.extensions[TOKENS_EXTENSION] = None  # made on first use: ratelimit installs its limiter
    app.extensions[LOG_EXTENSION] = ServingLog(
        context.store_for,
        buffer_bytes=settings.serving_log_buffer_bytes,
        batch_records=settings.serving_log_batch_records,
        batch_seconds=settings.serving_log_batch_seconds,
        max_body_bytes=settings.serving_log_max_body_bytes,
        flush_seconds=settings.serving_log_flush_seconds,
    )


bp.record_once(_setup)


@bp.after_request
def _stamp_version(resp: Response) -> Response:
    """Every answer of these routes names the model version (empty when none was chosen)."""
    if VERSION_HEADER not in resp.headers:
        version = g.get("stackml_model_version")
        resp.headers[VERSION_HEADER] = "" if version is None else str(version)
    return resp


# -- the views ------------------------------------------------------------------------------


@bp.post(RULE_DEFAULT)
@requires(READER)
def predict_default(name: str, verb: str) -> Response:
    return _predict(name, verb)


@bp.post(RULE_VERSION)
@requires(READER)
def predict_version(name: str, version: int, verb: str) -> Response:
    return _predict(name, verb, version=version)


@bp.post(RULE_LABEL)
@requires(READER)
def predict_label(name: str, label: str, verb: str) -> Response:
    return _predict(name, verb, label=label)


@bp.get("/v1/models/<name>/metadata")
def metadata_default(name: str) -> Response:
    return _metadata(name)


@bp.get("/v1/models/<name>/versions/<int:version>/metadata")
def metadata_version(name: str, version: int) -> Response:
    return _metadata(name, version=version)


def caller_key(app: Flask, env: dict[str, Any], caller: auth.Caller) -> str:
    """Who calls, for the sticky split and the serving log: the X-Stackml-Caller header, else
    the caller's Keystone user id, else the client address."""
    given = env.get(CALLER_ENV)
    if given:
        return str(given)
    # noauth's one user says nothing about who calls
    if not isinstance(app.extensions[auth.EXTENSION], auth.NoAuth) and caller.user_id:
        return f"user:{caller.user_id}"
    return f"addr:{env.get('REMOTE_ADDR') or ''}"


def _caller_key() -> str:
    app = current_app._get_current_object()  # type: ignore[attr-defined]
    return caller_key(app, request.environ, current())


def _target(
    name: str, route: Route, version: int | None, label: str | None, caller_key: Callable[[], str]
) -> tuple[int, str | None]:
    """(the version the request goes to, the caller key when the split decided)."""
    if route.endpoint_id is None:
        raise NoEndpoint(
            f"model {name!r} has no endpoint: deploy a version first "
            f"(POST /v1/models/{name}/endpoints)",
            details={"model": name},
        )
    if version is not None:
        if version not in route.versions:
            raise NotFound(
                f"model {name!r} has no version {version}",
                details={"model": name, "version": version},
            )
        return version, None
    if label is not None:
        target = route.labels.get(label)
        if target is None:
            raise NotFound(
                f"model {name!r} has no label {label!r}", details={"model": name, "label": label}
            )
        return target, None
    if route.traffic:
        key = caller_key()
        chosen = split_version(route.traffic, f"{route.endpoint_id}\0{key}")
        if chosen is not None and route.replicas.get(chosen):
            return chosen, key
    if route.serving_version is None:
        raise NoReplica(
            f"the endpoint of model {name!r} serves no version yet; retry later",
            details={"model": name, "reason": "not_serving"},
        )
    return route.serving_version, None


def resolve(
    p: Proxy,
    project: str,
    name: str,
    version: int | None,
    label: str | None,
    caller_key: Callable[[], str],
) -> tuple[Route, int, str | None]:
    """(route, target version, caller key). Only a route that can answer is taken from the
    cache: a miss (no model, endpoint, version, label or ready replica in the cached copy)
    reads the database again before it is refused, so a deploy, a new label or a replica that
    just became ready is used at once, not `predict_route_cache_seconds` later."""
    if not NAME_RE.match(name):
        raise NotFound(f"no model {name[:64]!r} in this project", details={"model": name[:64]})
    asked = time.monotonic()
    route = p.route(project, name)  # a NotFound here came from the database: no such model
    fresh = route.read_at >= asked
    try:
        target, key = _target(name, route, version, label, caller_key)
        if fresh or route.replicas.get(target):
            return route, target, key
    except (NotFound, NoReplica):
        if fresh:
            raise
    p.forget(project, name)
    route = p.route(project, name)
    target, key = _target(name, route, version, label, caller_key)
    return route, target, key


def _predict(
    name: str, verb: str, *, version: int | None = None, label: str | None = None
) -> Response:
    started = time.perf_counter()
    left: Refusal | None = request.environ.pop(REFUSAL_ENV, None)
    if left is not None:  # the lane went this far and left its refusal to Flask's rendering
        g.stackml_model_version = left.version
        raise left.error
    if version is not None:
        g.stackml_model_version = version
    if verb not in VERBS:
        raise NotFound(
            f"no such method {verb[:32]!r}: use :predict, :classify or :regress",
            details={"method": verb[:32]},
        )
    _tokens().take(current_project())
    p, project = proxy(), current_project()
    route, target, key = resolve(p, project, name, version, label, _caller_key)
    g.stackml_model_version = target
    request.max_content_length = ctx().settings.predict_max_body_bytes
    body = request.get_data(cache=False)
    rid = request_id()
    upstream = p.forward(project, name, route, target, "POST", f":{verb}", body, rid)
    slog = serving_log()
    if route.log_sample_rate > 0 and slog.sampled(route.log_sample_rate):
        caller = key if key is not None else _caller_key()
        _log(slog, project, name, route, target, caller, body, upstream, rid, started)
    return _answer(upstream, target)


def _metadata(name: str, *, version: int | None = None) -> Response:
    if version is not None:
        g.stackml_model_version = version
    p, project = proxy(), current_project()
    route, target, _ = resolve(p, project, name, version, None, _caller_key)
    g.stackml_model_version = target
    upstream = p.forward(project, name, route, target, "GET", "/metadata", None, request_id())
    return _answer(upstream, target)


def _answer(upstream: Upstream, version: int) -> Response:
    resp = Response(upstream.data, status=upstream.status)
    resp.headers["Content-Type"] = upstream.content_type or "application/json"
    resp.headers[VERSION_HEADER] = str(version)
    return resp


def _log(
    slog: ServingLog,
    project: str,
    name: str,
    route: Route,
    version: int,
    caller: str,
    body: bytes,
    upstream: Upstream,
    rid: str,
    started: float,
) -> None:
    req, req_cut = slog.cut(body)
    out, out_cut = slog.cut(upstream.data)
    slog.record(
        Record(
            project_id=project,
            model=name,
            version=version,
            endpoint=route.endpoint_id,
            request_id=rid,
            at=time.time(),
            caller=hashlib.sha256(caller.encode("utf-8", errors="replace")).hexdigest()[:16],
            status=upstream.status,
            latency_ms=(time.perf_counter() - started) * 1000.0,
            request=req,
            response=out,
            request_truncated=req_cut,
            response_truncated=out_cut,
        )
    )


# -- the lane: predictions answered outside Flask's request machinery ------------------------

REFUSAL_ENV = "stackml.predict.refusal"  # what the lane leaves to Flask (see Lane)
CALLER_ENV = "HTTP_" + CALLER_HEADER.upper().replace("-", "_")
_SEGMENT = r"[A-Za-z0-9._~!$&'()*+,;=@-]+"  # a path segment without "/", ":" or "%"
LANE_PATH = re.compile(
    rf"^/v1/models/(?P<name>{_SEGMENT})"
    rf"(?:/versions/(?P<version>[0-9]{{1,9}})|/labels/(?P<label>{_SEGMENT}))?"
    r":(?P<verb>predict|classify|regress)$"
)


@functools.lru_cache(maxsize=64)
def _status_line(status: int) -> str:
    """werkzeug's status line for `status` (the reason upper-cased, UNKNOWN when it has none)."""
    return f"{status} {HTTP_STATUS_CODES.get(status, 'UNKNOWN').upper()}"


@dataclass(frozen=True)
class Refusal:
    """The lane's refusal of a prediction past the point where it changed something (a token
    taken, a replica asked): the view raises it, Flask renders it."""

    error: Exception
    version: int | None  # the X-Model-Version of the answer


class Lane:
    """POST /v1/models/<name>[/versions/<v>|/labels/<l>]:<verb>, answered without Flask.

    Flask's per-request machinery (contexts, eight hooks, routing, the response object) cost
    more API CPU than the proxying itself: 0.32 ms of the 0.53 ms a proxied prediction took
    (bench/bench_proxy.py; GET /healthz is Flask's floor). The lane sits inside the auth
    middleware (keystonemiddleware has validated the token) and does what the hooks and the
    view do, with the same functions, in the same order: the edge checks (guard.check), the
    caller and its reader role, the body within predict_max_body_bytes, the project's token,
    the route, the replica; then it answers the replica's answer with the same headers
    (X-Model-Version, X-Request-Id), times it in the same histogram and samples it into the
    same serving log.

    Anything else goes to Flask, which answers it as it always did: a path this pattern does
    not take, a refusal before anything changed (Flask meets it again and renders it), and a
    refusal after something changed (a token taken, a replica asked: the view raises the
    lane's own error, `Refusal`, so nothing is done twice and the answer has the request id
    the replica saw). tests/unit/test_predict_lane.py holds both paths to the same answers.
    Off with `predict_lane: false`."""

    def __init__(self, app: Flask, inner: Callable[..., Any]) -> None:
        self.app, self.inner = app, inner
        self.on = app.extensions["stackml"].settings.predict_lane

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        if not self.on or environ.get("REQUEST_METHOD") != "POST":
            return self.inner(environ, start_response)
        m = LANE_PATH.match(environ.get("PATH_INFO") or "")
        if m is None:
            return self.inner(environ, start_response)
        started = time.perf_counter()
        caller_body = self._edge(environ)
        if caller_body is None:
            return self.inner(environ, start_response)  # Flask refuses it, as it always did
        caller, body = caller_body
        rid = new_request_id()
        name, verb = m["name"], m["verb"]
        version = int(m["version"]) if m["version"] is not None else None
        project, chosen = caller.project_id, version
        try:
            tokens_of(self.app).take(project)
            p: Proxy = self.app.extensions[EXTENSION]
            route, chosen, key = resolve(
                p, project, name, version, m["label"], lambda: caller_key(self.app, environ, caller)
            )
            upstream = p.forward(project, name, route, chosen, "POST", f":{verb}", body, rid)
        except Exception as e:  # noqa: BLE001 - not swallowed: Flask's view raises it
            environ[REFUSAL_ENV] = Refusal(e, chosen)
            environ[REQUEST_ID_ENV], environ[STARTED_ENV] = rid, started
            return self.inner(environ, start_response)
        slog: ServingLog = self.app.extensions[LOG_EXTENSION]
        if route.log_sample_rate > 0 and slog.sampled(route.log_sample_rate):
            who = key if key is not None else caller_key(self.app, environ, caller)
            _log(slog, project, name, route, chosen, who, body, upstream, rid, started)
        data = upstream.data
        start_response(
            _status_line(upstream.status),
            [
                ("Content-Type", upstream.content_type or JSON_TYPE),
                ("Content-Length", str(len(data))),
                (VERSION_HEADER, str(chosen)),
                (REQUEST_ID_HEADER, rid),
            ],
        )
        rule = RULE_VERSION if version is not None else RULE_LABEL if m["label"] else RULE_DEFAULT
        observe(self.app, "POST", rule, upstream.status, started)
        return [data]

    def _edge(self, environ: dict[str, Any]) -> tuple[auth.Caller, bytes] | None:
        """(the caller, the body) when the hooks let the request through to the view, the
        body within its bound; None to leave it to Flask (which refuses it the same way: the
        checks depend on the request alone, and nothing has changed yet)."""
        ext = self.app.extensions
        mimetype = parse_options_header(environ.get("CONTENT_TYPE") or "")[0].lower()
        try:
            guard.check(ext[guard.EXTENSION], environ, "POST", mimetype, takes_forms=False)
            authn = ext[auth.EXTENSION]
            # (building werkzeug's Request was a tenth of the lane's CPU; noauth reads nothing)
            caller = authn.caller(None if isinstance(authn, auth.NoAuth) else Request(environ))
        except Exception:  # noqa: BLE001 - not swallowed: Flask's hooks meet it again
            return None
        if not caller.has(READER) or environ.get("HTTP_TRANSFER_ENCODING"):
            return None
        try:
            length = int(environ.get("CONTENT_LENGTH") or 0)
        except ValueError:
            return None
        if not 0 <= length <= ext["stackml"].settings.predict_max_body_bytes:
            return None
        try:
            body = environ["wsgi.input"].read(length) if length else b""
        except OSError:  # the client went away mid-body: Flask's answer to a short body
            body = b""
        environ["wsgi.input"] = io.BytesIO(body)  # what Flask reads, should it answer
        if len(body) != length:
            return None  # the client went away mid-body: Flask's answer to that
        return caller, body


__all__ = ["PREDICT_RULES", "Lane", "NoReplica", "Proxy", "Route", "bp", "split_version"]
