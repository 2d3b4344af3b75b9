"""The API's HTTP server in `stackml up`: cheroot, CherryPy's threaded WSGI server.

werkzeug's development server, which `stackml up` used before, ends every connection after one
answer (it sends `Connection: close` whatever the protocol says), so each request paid a TCP
accept and a new thread; on the prediction proxy that was a quarter of the API's CPU
(docs/operations.md, "Serving"). cheroot keeps connections alive, hands an idle one back to a
selector (no thread waits on it), and runs requests on a fixed pool of threads.

What it keeps of werkzeug's behaviour:
- a header whose name holds an underscore is dropped (`X_Auth_Token` would otherwise land on the
  same WSGI key as `X-Auth-Token`);
- the access log: one redacted line per request (service/redact.py), in werkzeug's format,
  appended to a file, or on the `stackml.access` logger.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from cheroot import wsgi
from cheroot.workers import threadpool

from service.redact import append_line, redact

log = logging.getLogger("stackml.access")

WSGIApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]

# a followed log (`GET /v1/jobs/{id}/logs?follow=true`) holds a thread while it streams; idle
# keep-alive connections hold none
THREADS = 64
KEEP_ALIVE_CONNECTIONS = 256  # idle keep-alive connections kept open, beyond: closed after use
# the listen backlog: connections the kernel completes while the acceptor is busy. cheroot's
# default, 5, reset a client of a burst of 16 new connections on a loaded host (the chaos tier's
# test_load: "Connection reset by peer" on the 106th submission); the kernel caps it at somaxconn
BACKLOG = 1024
IDLE_TIMEOUT = 10  # seconds a connection may sit between requests or stall inside one
STOP_GRACE = 3  # seconds stop() waits for running requests before it closes their sockets
# the request line and headers together (cheroot's default is no limit; werkzeug's server took
# at most 100 header lines of 64 KiB): beyond, 414 for the line, 413 for the headers
MAX_HEAD_BYTES = 64 * 1024


class _Gateway(wsgi.Gateway_10):
    def get_environ(self) -> dict[str, Any]:  # type: ignore[override]  # stub says None
        headers = self.req.inheaders
        if any(b"_" in k for k in headers):
            self.req.inheaders = {k: v for k, v in headers.items() if b"_" not in k}
        env: dict[str, Any] = super().get_environ()
        return env


class _Pool(threadpool.ThreadPool):
    def _spawn_worker(self) -> threadpool.WorkerThread:
        # daemon threads: a process that dies without stop() still exits
        worker = threadpool.WorkerThread(self.server)
        worker.name = f"stackml-api {worker.name}"
        worker.daemon = True
        worker.start()
        return worker

    def stop(self, timeout: float | None = STOP_GRACE) -> None:
        """cheroot's stop, but a request still running after `timeout` has its connection shut
        and its (daemon) thread left to end on its own, instead of being waited for: a followed log
        writes nothing while the job is quiet, and would hold the stop until its own deadline."""
        pool: Any = self  # cheroot's private parts, which its type stubs leave out
        for _ in pool._threads:
            pool._queue.put(vars(threadpool)["_SHUTDOWNREQUEST"])
        deadline = time.monotonic() + (timeout or 0.0)
        for worker in pool._clear_threads():
            worker.join(max(0.0, deadline - time.monotonic()))
            conn = worker.conn
            if worker.is_alive() and conn is not None:
                # both ways (cheroot's own force-close shuts reading only): the client sees the
                # answer cut, and the request's next write fails and ends it
                with contextlib.suppress(OSError):  # already closed by the client
                    conn.socket.shutdown(socket.SHUT_RDWR)


class AccessLog:
    """WSGI middleware: one line per request, `addr - - [date] "METHOD uri PROTO" status -`,
    redacted, appended to `path` (or logged on `stackml.access` when None)."""

    def __init__(self, app: WSGIApp, path: Path | None) -> None:
        self.app = app
        self.path = path

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        def logged(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
            self.write(environ, status.split(" ", 1)[0])
            return start_response(status, headers, exc_info)

        return self.app(environ, logged)

    def write(self, environ: dict[str, Any], code: str) -> None:
        request_line = (
            f"{environ.get('REQUEST_METHOD', '')} {environ.get('REQUEST_URI', '')} "
            f"{environ.get('SERVER_PROTOCOL', '')}"
        )
        when = time.strftime("%d/%b/%Y %H:%M:%S")
        line = redact(f'{environ.get("REMOTE_ADDR", "-")} - - [{when}] "{request_line}" {code} -')
        if self.path is None:
            log.info("%s", line)
            return
        append_line(self.path, line)


class ApiServer:
    """`app` served on (host, port) from a thread; `start()` binds (OSError when it cannot),
    `stop()` ends it."""

    def __init__(
        self, app: WSGIApp, host: str, port: int, *, access_log: Path | None, name: str
    ) -> None:
        self.name = name
        self.server = wsgi.Server(
            (host, port), AccessLog(app, access_log), numthreads=THREADS, timeout=IDLE_TIMEOUT,
            shutdown_timeout=STOP_GRACE, server_name="stackml", request_queue_size=BACKLOG,
        )  # fmt: skip
        self.server.gateway = _Gateway
        self.server.keep_alive_conn_limit = KEEP_ALIVE_CONNECTIONS
        self.server.max_request_header_size = MAX_HEAD_BYTES  # the body: Flask's max_body_bytes
        # how often the selector loop looks up from its connections: stop() waits for it
        self.server.expiration_interval = 0.1
        self.server.requests = _Pool(self.server, min=THREADS, max=THREADS)
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        """The port it listens on (the one the system chose for port 0), once started."""
        return int(self.server.bind_addr[1])

    def start(self) -> None:
        self.server.prepare()  # binds and listens; raises OSError
        self._thread = threading.Thread(target=self.server.serve, name=self.name, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self.server.stop()
        if self._thread is not None:
            self._thread.join(STOP_GRACE + 5)
            self._thread = None


__all__ = ["AccessLog", "ApiServer"]
