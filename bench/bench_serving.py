"""The model server called directly: single-row predicts over kept-alive connections.

Starts workers/vm/model_server.py with the TensorFlow runtime's python on a small SavedModel
(x float32 [-1, 20] -> y, built by tests/integration/savedmodels.py), then measures requests/s
and p50/p99 latency of single-row `:predict` calls on one kept-alive connection, and on
BENCH_SERVING_CONNS connections at once. Ends with one JSON line of every figure.

The proxy bench (bench/bench_proxy.py) imports `model_server` and `measure` to put the same
server behind the API in the same run:

    with model_server() as srv:            # srv.host, srv.port, srv.path, srv.body, srv.base_path
        direct = measure(srv.host, srv.port, srv.path, srv.body)

Environment: BENCH_SERVING_REQUESTS (default 2000 per measurement), BENCH_SERVING_CONNS (4),
STACKML_TEST_RUNTIME_ROOT (the runtimes directory), STACKML_TFSERVING_BIN (measure
tensorflow_model_server instead of ours).
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from service.config import Settings, reset_settings
from service.runtime import ensure_runtime

REPO = Path(__file__).resolve().parents[1]
SERVER = REPO / "workers" / "vm" / "model_server.py"
BUILDER = REPO / "tests" / "integration" / "savedmodels.py"
REQUESTS = int(os.environ.get("BENCH_SERVING_REQUESTS", "2000"))
CONNS = int(os.environ.get("BENCH_SERVING_CONNS", "4"))
READY_DEADLINE = 180.0


@dataclass
class ServerHandle:
    host: str
    port: int
    name: str
    base_path: Path
    path: str  # the predict path of one version
    body: bytes  # one single-row predict request
    proc: subprocess.Popen


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def runtime_python() -> Path:
    os.environ.setdefault(
        "STACKML_RUNTIME_ROOT",
        os.environ.get("STACKML_TEST_RUNTIME_ROOT", "/var/cache/stackml/runtimes"),
    )
    reset_settings()
    settings = Settings()
    return ensure_runtime(settings, settings.default_runtime, echo=print)


def build_models(python: Path, out: Path) -> Path:
    """The test SavedModels under `out`; the linear model's base path is out/linear."""
    subprocess.run(
        [str(python), str(BUILDER), str(out)], check=True, capture_output=True, timeout=300
    )
    return out / "linear"


def wait_available(host: str, port: int, name: str, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + READY_DEADLINE
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the model server exited {proc.returncode}")
        try:
            c = http.client.HTTPConnection(host, port, timeout=5)
            c.request("GET", f"/v1/models/{name}")
            r = c.getresponse()
            body = r.read()
            c.close()
            states = {s["state"] for s in json.loads(body).get("model_version_status", [])}
            if r.status == 200 and states == {"AVAILABLE"}:
                return
        except (OSError, ValueError):
            pass
        time.sleep(0.2)
    raise TimeoutError(f"{name} not AVAILABLE within {READY_DEADLINE}s")


@contextmanager
def model_server(
    name: str = "lin", *, base_path: Path | None = None, port: int | None = None
) -> Iterator[ServerHandle]:
    """Start the model server (ours, or STACKML_TFSERVING_BIN) on 127.0.0.1; stop it after."""
    python = runtime_python()
    with tempfile.TemporaryDirectory(prefix="stackml-bench-serving-") as tmp:
        if base_path is None:
            base_path = build_models(python, Path(tmp))
        port = port or _port()
        flags = [
            f"--rest_api_port={port}",
            f"--model_name={name}",
            f"--model_base_path={base_path}",
        ]
        tfs = os.environ.get("STACKML_TFSERVING_BIN")
        if tfs:
            argv = [tfs, f"--port={_port()}", *flags]
        else:
            argv = [str(python), str(SERVER), *flags, "--rest_api_bind=127.0.0.1"]
        log = open(Path(tmp) / "server.log", "wb")
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            wait_available("127.0.0.1", port, name, proc)
            body = json.dumps({"instances": [[0.5] * 20]}).encode()
            yield ServerHandle(
                "127.0.0.1", port, name, base_path, f"/v1/models/{name}:predict", body, proc
            )
        finally:
            proc.terminate()
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
            log.close()


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def _run_conn(
    host: str, port: int, path: str, body: bytes, n: int, headers: dict[str, str]
) -> tuple[list[float], int]:
    conn = http.client.HTTPConnection(host, port, timeout=30)
    lat: list[float] = []
    errors = 0
    hdrs = {"Content-Type": "application/json", **headers}
    for _ in range(n):
        t0 = time.perf_counter()
        conn.request("POST", path, body=body, headers=hdrs)
        r = conn.getresponse()
        r.read()
        lat.append(time.perf_counter() - t0)
        if r.status != 200:
            errors += 1
    conn.close()
    return lat, errors


def measure(
    host: str,
    port: int,
    path: str,
    body: bytes,
    *,
    requests: int = REQUESTS,
    connections: int = 1,
    warmup: int = 50,
    headers: dict[str, str] | None = None,
) -> dict:
    """`requests` POSTs per connection, `connections` kept-alive connections in parallel."""
    _run_conn(host, port, path, body, warmup, headers or {})
    results: list[tuple[list[float], int]] = [([], 0)] * connections

    def work(i: int) -> None:
        results[i] = _run_conn(host, port, path, body, requests, headers or {})

    threads = [threading.Thread(target=work, args=(i,)) for i in range(connections)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    lat = [x for r in results for x in r[0]]
    return {
        "connections": connections,
        "requests": len(lat),
        "errors": sum(r[1] for r in results),
        "rps": round(len(lat) / wall, 1),
        "p50_ms": round(_pct(lat, 0.50) * 1000, 3),
        "p99_ms": round(_pct(lat, 0.99) * 1000, 3),
    }


def main() -> int:
    with model_server() as srv:
        one = measure(srv.host, srv.port, srv.path, srv.body)
        many = measure(srv.host, srv.port, srv.path, srv.body, connections=CONNS)
    kind = "tensorflow_model_server" if os.environ.get("STACKML_TFSERVING_BIN") else "stackml"
    for label, m in (("1 connection", one), (f"{CONNS} connections", many)):
        print(
            f"{kind} direct, single-row predict, {label}: {m['rps']} req/s, "
            f"p50 {m['p50_ms']} ms, p99 {m['p99_ms']} ms, {m['errors']} errors"
        )
    print(json.dumps({"bench": "serving", "server": kind, "one": one, "many": many}))
    return 1 if one["errors"] or many["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
