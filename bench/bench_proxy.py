"""Prediction proxy overhead: single-row predicts through the API's proxy against the same model
server (workers/vm/model_server.py, the runtime's python, a small SavedModel) called directly,
in the same run. Targets: proxy throughput >= 0.9x direct, <= 1 ms added p99.

Phases, each BENCH_PROXY_SECONDS long (default 8), after a warm-up:
- latency: one client, sequential requests (p50/p99 direct vs proxied: the added latency;
  and GET /healthz on the same API server: what any request costs there, proxy or not);
- throughput: BENCH_PROXY_CLIENTS clients (default 4) on keep-alive connections (requests/s,
  p50/p99), direct then proxied, twice, interleaved;
- switch: a steady load on the default route while the endpoint switches from version 1 to
  version 2 the way the rolling switch moves the rows (v2 replica ready, serving_version moved,
  v1 replica draining, then its server killed): requests failed during the switch (target 0),
  and every answer's X-Model-Version checked against its body.

The API runs in its own process, served as `stackml up` serves it (service/httpserver.py:
cheroot, keep-alive; BENCH_PROXY_SERVER=werkzeug for werkzeug's development server, which
`stackml up` used before and which closes every connection after one answer; SQLite; the real
Redis rate limiter when one answers on 127.0.0.1:6379), the load in this one.

Placement (BENCH_PROXY_PIN, default 1 where this process may use 2 CPUs or more): the API gets
one CPU of its own, the model servers and the load generator the others, in every phase, direct
ones included. That is the deployment's shape (the API on the control plane's hosts, replicas on
their own servers): on a 2-CPU machine without it, the direct phases have the two CPUs for the
replica and the load while the proxied ones squeeze a third busy process onto them, and the
ratio measures the machine's size more than the proxy. BENCH_PROXY_PIN=0 runs unpinned.
The CPU each request costs in the API process and in the replica (from /proc, all threads) is
printed too: it does not depend on placement.
BENCH_PROXY_PROFILE=<file> runs the API's app under cProfile (each serving thread's CPU clock)
and writes the merged profile to <file> for pstats (`python -m pstats <file>`); the figures of
such a run carry the profiler's cost.

Prints the figures, then one JSON line with every figure.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SECONDS = float(os.environ.get("BENCH_PROXY_SECONDS", "8"))
CLIENTS = int(os.environ.get("BENCH_PROXY_CLIENTS", "4"))
API_SERVER = os.environ.get("BENCH_PROXY_SERVER", "stackml")  # or "werkzeug"
RUNTIME_ROOT = os.environ.get("STACKML_TEST_RUNTIME_ROOT", "/var/cache/stackml/runtimes")
SERVER = REPO / "workers" / "vm" / "model_server.py"
BUILDER = REPO / "tests" / "integration" / "savedmodels.py"
PROJECT = "local"
MODEL = "lin"
ROW = json.dumps({"instances": [[0.5] * 20]}).encode()


def _cpu_seconds(pid: int) -> float:
    """User + system CPU of process `pid`, all its threads (/proc/<pid>/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _placement() -> tuple[set[int], set[int]] | None:
    """(the API's CPUs, everything else's), or None: unpinned."""
    cpus = sorted(os.sched_getaffinity(0))
    if os.environ.get("BENCH_PROXY_PIN", "1") == "0" or len(cpus) < 2:
        return None
    return {cpus[-1]}, set(cpus[:-1])


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))] if xs else float("nan")


def _wait_http(port: int, path: str, deadline: float, proc: subprocess.Popen[bytes]) -> None:
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"process exited {proc.returncode} before answering {path}")
        try:
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            c.request("GET", path)
            r = c.getresponse()
            r.read()
            c.close()
            if r.status == 200:
                return
        except OSError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"nothing answered 200 at 127.0.0.1:{port}{path} within {deadline}s")


# -- the API process --------------------------------------------------------------------------


def serve_api(config: str) -> None:
    """Run in a child: the API on a real port, served as `stackml up` serves it
    (service/httpserver.py), or by werkzeug's development server with BENCH_PROXY_SERVER=werkzeug
    (what `stackml up` used before: a connection per request)."""
    from service.api import create_app
    from service.config import Settings
    from service.db.models import Base
    from service.db.session import engine_for
    from service.httpserver import ApiServer

    cfg = json.loads(config)
    settings = Settings(**cfg["settings"])
    Base.metadata.create_all(engine_for(settings.db_url))
    app = create_app(settings, enqueue=lambda t, j: None)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    if API_SERVER == "werkzeug":
        from werkzeug.serving import WSGIRequestHandler, make_server

        class Handler(WSGIRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True

            def log_request(self, *args: Any, **kwargs: Any) -> None:
                pass

        server = make_server("127.0.0.1", cfg["port"], app, threaded=True, request_handler=Handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        stop.wait()
        server.shutdown()
        return
    wsgi: Any = app
    profile = os.environ.get("BENCH_PROXY_PROFILE")
    if profile:
        wsgi, dump = _profiled(app)
    api = ApiServer(wsgi, "127.0.0.1", cfg["port"], access_log=None, name="bench-api")
    api.start()
    stop.wait()
    api.stop()
    if profile:
        dump(profile)


def _profiled(app: Any) -> tuple[Any, Any]:
    """BENCH_PROXY_PROFILE=<file>: the app under cProfile on each serving thread's CPU clock
    (one profiler a thread, enabled only inside the app: the server's own work is not in it),
    the profiles merged into <file> (pstats) when the API stops."""
    import cProfile
    import pstats

    local = threading.local()
    every: list[cProfile.Profile] = []
    lock = threading.Lock()

    def wsgi(environ: dict[str, Any], start_response: Any) -> Any:
        prof = getattr(local, "prof", None)
        if prof is None:
            prof = local.prof = cProfile.Profile(time.thread_time)
            with lock:
                every.append(prof)
        prof.enable()
        try:
            return list(app(environ, start_response))
        finally:
            prof.disable()

    def dump(path: str) -> None:
        with lock:
            stats = pstats.Stats(every[0])
            for p in every[1:]:
                stats.add(p)
        stats.dump_stats(path)

    return wsgi, dump


# -- load -------------------------------------------------------------------------------------


class Load:
    """`clients` threads, each on one keep-alive connection, posting ROW for `seconds`."""

    def __init__(
        self, port: int, path: str, clients: int, seconds: float,
        expect: dict[str, float] | None = None,
    ) -> None:  # fmt: skip
        self.port, self.path, self.clients, self.seconds = port, path, clients, seconds
        self.expect = expect  # version -> the prediction ROW gets from it
        self.latencies: list[float] = []
        self.failed: list[str] = []
        self.versions: dict[str, int] = {}
        self.mismatched = 0
        self._lock = threading.Lock()
        self.stop = threading.Event()

    def _one(self) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        lat: list[float] = []
        end = time.monotonic() + self.seconds
        while time.monotonic() < end and not self.stop.is_set():
            t0 = time.perf_counter()
            try:
                if self.path == "/healthz":  # the API's own floor: no proxying
                    conn.request("GET", self.path)
                else:
                    conn.request("POST", self.path, ROW, {"Content-Type": "application/json"})
                r = conn.getresponse()
                body = r.read()
            except (OSError, http.client.HTTPException) as e:
                with self._lock:
                    self.failed.append(f"{type(e).__name__}: {e}")
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
                continue
            lat.append(time.perf_counter() - t0)
            version = r.getheader("X-Model-Version") or ""
            with self._lock:
                if r.status != 200:
                    self.failed.append(f"{r.status}: {body[:200]!r}")
                self.versions[version] = self.versions.get(version, 0) + 1
            if self.expect is not None and r.status == 200:
                got = json.loads(body)["predictions"][0][0]
                want = self.expect.get(version)
                if want is None or abs(got - want) > 1e-4 * max(1.0, abs(want)):
                    with self._lock:
                        self.mismatched += 1  # the header names another version than answered
        conn.close()
        with self._lock:
            self.latencies += lat

    def run(self) -> dict[str, Any]:
        started = time.perf_counter()
        threads = [threading.Thread(target=self._one) for _ in range(self.clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(self.seconds + 120)
        took = time.perf_counter() - started
        ms = [x * 1000 for x in self.latencies]
        return {
            "requests": len(ms),
            "rps": round(len(ms) / took, 1),
            "p50_ms": round(_pct(ms, 0.5), 3),
            "p99_ms": round(_pct(ms, 0.99), 3),
            "failed": len(self.failed),
        }


def main() -> int:
    if len(sys.argv) == 3 and sys.argv[1] == "--serve-api":
        serve_api(sys.argv[2])
        return 0
    from service.config import Settings
    from service.runtime import ensure_runtime
    from tests.envutil import environ

    with environ({"STACKML_RUNTIME_ROOT": RUNTIME_ROOT}):
        settings = Settings()
        python = ensure_runtime(settings, settings.default_runtime, echo=print)
    placement = _placement()
    if placement is not None:  # before any thread starts: the load's threads inherit it
        os.sched_setaffinity(0, placement[1])
    tmp = Path(tempfile.mkdtemp(prefix="bench-proxy-"))
    procs: list[subprocess.Popen[bytes]] = []
    try:
        r = subprocess.run(
            [str(python), str(BUILDER), str(tmp / "models")],
            capture_output=True,
            timeout=600,
            check=False,
        )
        if r.returncode != 0:
            print(r.stderr.decode()[-3000:], file=sys.stderr)
            return 1

        def model_server() -> tuple[subprocess.Popen[bytes], int]:
            port = _port()
            log = open(tmp / f"server-{port}.log", "wb")
            p = subprocess.Popen(
                [
                    str(python),
                    str(SERVER),
                    f"--rest_api_port={port}",
                    f"--model_name={MODEL}",
                    f"--model_base_path={tmp / 'models' / 'linear'}",
                    "--rest_api_bind=127.0.0.1",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip
            procs.append(p)
            _wait_http(port, f"/v1/models/{MODEL}", 300, p)
            return p, port

        (replica_proc, direct_port), (old_proc, old_port) = model_server(), model_server()
        db = f"sqlite:///{tmp / 'stackml.db'}"
        redis_ok = _redis_answers()
        api_port = _port()
        cfg = {
            "port": api_port,
            "settings": {
                "data_dir": str(tmp / "data"),
                "database_url": db,
                "redis_url": "redis://127.0.0.1:6379/14" if redis_ok else "redis://127.0.0.1:1/0",
                "queue": f"bench-{uuid.uuid4().hex[:8]}",
                "secret_key": "bench-proxy",
                "auth": "noauth",
                "store": "local",
                "host": "127.0.0.1",
                "local_project": PROJECT,
                "rate_limit_predict_per_minute": 100_000_000,
            },
        }
        api_log = open(tmp / "api.log", "wb")
        api_cpus = placement[0] if placement is not None else None
        api = subprocess.Popen(
            [sys.executable, __file__, "--serve-api", json.dumps(cfg)],
            stdout=api_log, stderr=subprocess.STDOUT, cwd=REPO,
            preexec_fn=(lambda: os.sched_setaffinity(0, api_cpus)) if api_cpus else None,
        )  # fmt: skip
        procs.append(api)
        _wait_http(api_port, "/healthz", 60, api)
        from tests.unit.replicas import add_model, add_replica

        _, ep = add_model(db, MODEL, project=PROJECT, versions=(1, 2), serving_version=1)
        # the proxied replica is the very server the direct phases call
        direct_rid = add_replica(db, ep, direct_port, 1, project=PROJECT)

        direct = f"/v1/models/{MODEL}/versions/1:predict"
        proxied = f"/v1/models/{MODEL}:predict"
        Load(direct_port, direct, 1, 1.0).run()  # warm-up
        Load(api_port, proxied, 1, 1.0).run()
        figures: dict[str, Any] = {
            "clients": CLIENTS,
            "seconds": SECONDS,
            "redis": redis_ok,
            "api_server": API_SERVER,
            "pinned": None
            if placement is None
            else {"api": sorted(placement[0]), "replica_and_load": sorted(placement[1])},
        }
        cpu_ms: dict[str, dict[str, float]] = {}
        for key, port, path in (
            ("latency_direct", direct_port, direct),
            ("latency_proxy", api_port, proxied),
            ("latency_api_healthz", api_port, "/healthz"),
        ):
            before = (_cpu_seconds(api.pid), _cpu_seconds(replica_proc.pid))
            figures[key] = Load(port, path, 1, SECONDS).run()
            n = max(1, figures[key]["requests"])
            cpu_ms[key] = {
                "api": round((_cpu_seconds(api.pid) - before[0]) * 1000 / n, 3),
                "replica": round((_cpu_seconds(replica_proc.pid) - before[1]) * 1000 / n, 3),
            }
        figures["cpu_ms_per_request"] = cpu_ms
        runs: dict[str, list[dict[str, Any]]] = {"direct": [], "proxy": []}
        for _ in range(2):
            for kind, port, path in (("direct", direct_port, direct), ("proxy", api_port, proxied)):
                before = (
                    _cpu_seconds(api.pid), _cpu_seconds(replica_proc.pid), _cpu_seconds(os.getpid())
                )  # fmt: skip
                got = Load(port, path, CLIENTS, SECONDS).run()
                n = max(1, got["requests"])
                got["cpu_ms"] = {
                    who: round((_cpu_seconds(pid) - before[i]) * 1000 / n, 3)
                    for i, (who, pid) in enumerate(
                        (("api", api.pid), ("replica", replica_proc.pid), ("load", os.getpid()))
                    )
                }
                runs[kind].append(got)
        for k, v in runs.items():
            figures[f"throughput_{k}"] = {
                "rps": round(sum(x["rps"] for x in v) / len(v), 1),
                "p50_ms": round(sum(x["p50_ms"] for x in v) / len(v), 3),
                "p99_ms": round(sum(x["p99_ms"] for x in v) / len(v), 3),
                "failed": sum(x["failed"] for x in v),
                # CPU a request in each process: the replica's and the load's share one CPU
                "cpu_ms": {
                    who: round(sum(x["cpu_ms"][who] for x in v) / len(v), 3)
                    for who in ("api", "replica", "load")
                },
            }
        figures["throughput_ratio"] = round(
            figures["throughput_proxy"]["rps"] / figures["throughput_direct"]["rps"], 3
        )
        figures["added_p99_ms_sequential"] = round(
            figures["latency_proxy"]["p99_ms"] - figures["latency_direct"]["p99_ms"], 3
        )
        figures["added_p50_ms_sequential"] = round(
            figures["latency_proxy"]["p50_ms"] - figures["latency_direct"]["p50_ms"], 3
        )
        weights = json.loads((tmp / "models" / "expected.json").read_text())["linear"]
        expect = {v: 0.5 * sum(w["w"]) + w["b"] for v, w in weights.items()}
        figures["switch"] = switch(db, ep, api_port, direct_rid, old_proc, old_port, expect)
        _report(figures)
        ok = figures["switch"]["failed"] == 0 and figures["switch"]["mismatched"] == 0
        return 0 if ok else 1
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()
        for p in procs:
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)


def switch(
    db: str, ep: str, api_port: int, direct_rid: int, old_proc: subprocess.Popen[bytes],
    old_port: int, expect: dict[str, float],
) -> dict[str, Any]:  # fmt: skip
    """Version 1 -> 2 under load, as the rolling switch moves the rows: a v1 replica on
    `old_port` joins, then a v2 replica (the direct server) is ready, serving_version moves to
    2, the v1 replicas drain, and the old server is killed."""
    from service.db.models import Endpoint, Resource
    from service.db.session import session_scope
    from tests.unit.replicas import add_replica

    with session_scope(db) as s:
        row = s.get(Resource, direct_rid)
        assert row is not None
        row.version = 2  # the direct server serves both versions; here it is "the v2 replica"
        row.replica_state = "booting"
    old_rid = add_replica(db, ep, old_port, 1, project=PROJECT)
    time.sleep(1.5)  # the proxy's cache sees the v1 replica
    load = Load(api_port, f"/v1/models/{MODEL}:predict", CLIENTS, 60, expect)
    t = threading.Thread(target=load.run)
    t.start()
    time.sleep(SECONDS / 4)
    with session_scope(db) as s:  # v2 replica loaded and warmed: ready
        r2 = s.get(Resource, direct_rid)
        assert r2 is not None
        r2.replica_state = "ready"
    time.sleep(SECONDS / 4)
    with session_scope(db) as s:  # traffic moves
        e = s.get(Endpoint, ep)
        assert e is not None
        e.serving_version = 2
    time.sleep(SECONDS / 4)
    with session_scope(db) as s:  # the old replica drains ...
        r1 = s.get(Resource, old_rid)
        assert r1 is not None
        r1.replica_state = "draining"
    time.sleep(SECONDS / 4)
    old_proc.kill()  # ... and its server is deleted
    time.sleep(SECONDS / 4)
    load.stop.set()
    t.join(120)
    return {
        "requests": len(load.latencies),
        "failed": len(load.failed),
        "failures": load.failed[:5],
        "versions": load.versions,
        "mismatched": load.mismatched,
        "p99_ms": round(_pct([x * 1000 for x in load.latencies], 0.99), 3),
    }


def _redis_answers() -> bool:
    try:
        with socket.create_connection(("127.0.0.1", 6379), timeout=1) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")
    except OSError:
        return False


def _report(f: dict[str, Any]) -> None:
    ld, lp = f["latency_direct"], f["latency_proxy"]
    td, tp = f["throughput_direct"], f["throughput_proxy"]
    print(f"one client:  direct p50 {ld['p50_ms']} ms p99 {ld['p99_ms']} ms ({ld['rps']} req/s)")
    print(f"             proxy  p50 {lp['p50_ms']} ms p99 {lp['p99_ms']} ms ({lp['rps']} req/s)")
    lh = f["latency_api_healthz"]
    print(f"             API floor (GET /healthz) p50 {lh['p50_ms']} ms p99 {lh['p99_ms']} ms")
    cpu = f["cpu_ms_per_request"]
    print(
        f"CPU per request: API {cpu['latency_proxy']['api']} ms proxied, "
        f"{cpu['latency_api_healthz']['api']} ms GET /healthz; replica "
        f"{cpu['latency_direct']['replica']} ms direct"
    )
    pinned = f["pinned"]
    print(
        ("placement: unpinned" if pinned is None else f"placement: API on CPU {pinned['api']}, "
         f"replica and load on {pinned['replica_and_load']}") + f"; API server: {f['api_server']}"
    )  # fmt: skip
    print(
        f"             added p50 {f['added_p50_ms_sequential']} ms, "
        f"p99 {f['added_p99_ms_sequential']} ms (target <= 1 ms)"
    )
    print(
        f"{f['clients']} clients:   direct {td['rps']} req/s "
        f"p50 {td['p50_ms']} p99 {td['p99_ms']} ms"
    )
    print(f"             proxy  {tp['rps']} req/s p50 {tp['p50_ms']} p99 {tp['p99_ms']} ms")
    print(f"             throughput ratio {f['throughput_ratio']} (target >= 0.9)")
    print(
        "             CPU a request (ms) direct: "
        + ", ".join(f"{k} {v}" for k, v in td["cpu_ms"].items())
        + "; proxied: "
        + ", ".join(f"{k} {v}" for k, v in tp["cpu_ms"].items())
    )
    sw = f["switch"]
    print(
        f"switch v1->v2 under load: {sw['requests']} requests, {sw['failed']} failed "
        f"(target 0), versions {sw['versions']}, {sw['mismatched']} answers not from the "
        "version their X-Model-Version names"
    )
    print(json.dumps(f))


if __name__ == "__main__":
    sys.exit(main())
