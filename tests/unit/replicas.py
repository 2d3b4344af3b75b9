"""Stand-in replicas for the proxy's tests: tiny stdlib HTTP servers on loopback ports that
speak TF Serving's REST shapes (keep-alive, HTTP/1.1), and helpers that insert the registry,
endpoint and replica rows the proxy reads."""

from __future__ import annotations

import json
import re
import socket
import threading
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from service.db.models import Endpoint, Model, ModelLabel, ModelVersion, Resource
from service.db.session import session_scope

PATH_RE = re.compile(r"^/v1/models/([^/:]+)/versions/(\d+)(:predict|:classify|:regress|/metadata)$")


class FakeReplica:
    """One replica: answers predictions with which replica and version served them.
    `mode`: "ok", "error" (TF Serving's 400 {"error"}), "unavailable" (503), "slow" (answers
    when `release` is set), "foreign" (a 404 with an empty body and no content type: what an
    egress proxy answered here for the address of a sandbox that was gone)."""

    def __init__(self, name: str = "replica") -> None:
        self.name = name
        self.mode = "ok"
        self.release = threading.Event()  # ends a "slow" answer
        self.seen: list[dict[str, Any]] = []
        self._conns: set[socket.socket] = set()
        self._lock = threading.Lock()
        replica = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True

            def setup(self) -> None:
                super().setup()
                with replica._lock:
                    replica._conns.add(self.connection)

            def finish(self) -> None:
                with replica._lock:
                    replica._conns.discard(self.connection)
                super().finish()

            def log_message(self, *args: Any) -> None:
                pass

            def _send(self, status: int, body: dict[str, Any]) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                m = PATH_RE.match(self.path)
                if not m or m.group(3) != "/metadata":
                    self._send(404, {"error": f"no route {self.path}"})
                    return
                self._send(
                    200,
                    {
                        "model_spec": {"name": m.group(1), "version": m.group(2)},
                        "metadata": {"served_by": replica.name},
                    },
                )

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length)
                m = PATH_RE.match(self.path)
                replica.seen.append(
                    {"path": self.path, "body": body, "request_id": self.headers["X-Request-Id"]}
                )
                if not m or m.group(3) == "/metadata":
                    self._send(404, {"error": f"no route {self.path}"})
                elif replica.mode == "error":
                    self._send(400, {"error": "Failed to process element: 0 of 'instances' list"})
                elif replica.mode == "slow":
                    replica.release.wait(30)  # longer than the proxy's read timeout
                    self._send(200, {"predictions": [], "served_by": replica.name})
                elif replica.mode == "foreign":  # another server at the replica's address
                    self.send_response(404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                elif replica.mode == "unavailable":
                    self._send(503, {"error": "Servable not available"})
                else:
                    try:
                        instances = json.loads(body).get("instances", [])
                    except ValueError:
                        self._send(400, {"error": "JSON Parse error"})
                        return
                    self._send(
                        200,
                        {
                            "predictions": [[float(len(instances))]] * len(instances),
                            "served_by": replica.name,
                            "version": int(m.group(2)),
                            "verb": m.group(3)[1:],
                        },
                    )

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def kill(self) -> None:
        """Die like a crashed process: the listener closes and open connections are reset."""
        self.release.set()
        self.server.shutdown()
        self.server.server_close()
        with self._lock:
            conns = list(self._conns)
        for c in conns:
            try:
                c.setsockopt(
                    socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00"
                )
                c.shutdown(socket.SHUT_RDWR)
                c.close()
            except OSError:
                pass


def dead_port() -> int:
    """A loopback port where nothing listens (bound then closed)."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = int(s.getsockname()[1])
    s.close()
    return port


def add_model(
    db_url: str,
    name: str,
    *,
    project: str = "local",
    versions: tuple[int, ...] = (1,),
    labels: dict[str, int] | None = None,
    serving_version: int | None = 1,
    traffic: dict[str, int] | None = None,
    log_sample_rate: float = 0.0,
    endpoint: bool = True,
) -> tuple[str, str]:
    """(model id, endpoint id or "") of a new model with READY versions, labels and an
    endpoint."""
    model_id = f"mdl-{uuid.uuid4().hex[:12]}"
    ep_id = f"ep-{uuid.uuid4().hex[:12]}" if endpoint else None
    with session_scope(db_url) as s:
        s.add(Model(id=model_id, project_id=project, name=name, created_by="test"))
        s.flush()
        for v in versions:
            s.add(
                ModelVersion(
                    model_id=model_id,
                    version=v,
                    state="READY",
                    artifact_uri=f"file:///models/{name}/{v}",
                    created_by="test",
                )
            )
        for label, v in (labels or {}).items():
            s.add(ModelLabel(model_id=model_id, name=label, version=v))
        if ep_id is not None:
            s.add(
                Endpoint(
                    id=ep_id,
                    project_id=project,
                    model_id=model_id,
                    state="READY",
                    target_label="default",
                    serving_version=serving_version,
                    traffic=traffic,
                    replicas=1,
                    flavor="local.small",
                    log_sample_rate=log_sample_rate,
                    created_by="test",
                )
            )
    return model_id, ep_id or ""


def add_replica(
    db_url: str,
    endpoint_id: str,
    port: int,
    version: int,
    *,
    project: str = "local",
    state: str = "ready",
) -> int:
    with session_scope(db_url) as s:
        r = Resource(
            owner_kind="endpoint",
            owner_id=endpoint_id,
            project_id=project,
            backend="sandbox",
            role="replica",
            name=f"replica-{uuid.uuid4().hex[:12]}",
            flavor="local.small",
            state="active",
            host="127.0.0.1",
            serving_port=port,
            version=version,
            replica_state=state,
        )
        s.add(r)
        s.flush()
        return int(r.id)


__all__ = ["FakeReplica", "add_model", "add_replica", "dead_port"]
