"""Listing jobs: GET /v1/jobs pages out of 1,000 jobs that each hold metrics and servers, on a
real PostgreSQL. Targets: a page of 50 (the default) answers in <= 50 ms p99, in a number of SQL
statements that does not grow with the page (the same for 5, 50 and 200 jobs), with no call to
the compute backend.

The jobs are seeded through the repository the way the workers make them (service/db/jobs.py:
create_job, transition, append_log with metric lines; resource rows as the allocate step writes
them) in a spread of states: queued, allocating, provisioning, running, exporting, succeeded,
failed, cancelled; every job that ran holds 1 or 2 servers (some deleted, some still up) and
BENCH_JOBS_LIST_POINTS metric points (default 150: loss, accuracy and val_loss per epoch).

Each request is timed in one process with Flask's test client (what the API's code costs) and
over a real loopback server (werkzeug, threaded, keep-alive: what a client sees); each
statement the request sends is counted with SQLAlchemy's `before_cursor_execute`. Baseline in
the same run: GET /healthz (what any request costs) and GET /v1/jobs/{id} (one job serialised).
Prints the figures next to their targets, then one JSON line with every figure.
"""

from __future__ import annotations

import http.client
import json
import os
import random
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from sqlalchemy import event, update  # noqa: E402
from werkzeug.serving import WSGIRequestHandler, make_server  # noqa: E402

from service.api import create_app  # noqa: E402
from service.backends import registry  # noqa: E402
from service.config import Settings  # noqa: E402
from service.db import jobs as repo  # noqa: E402
from service.db.migrate import upgrade  # noqa: E402
from service.db.models import Job, Resource, utcnow  # noqa: E402
from service.db.session import engine_for, session_scope  # noqa: E402
from service.domain.metrics import format_metric_line  # noqa: E402
from service.domain.spec import JobSpec  # noqa: E402
from service.domain.states import FailureReason, JobState, Phase, ResourceState  # noqa: E402
from tests.pgutil import temp_database  # noqa: E402

JOBS = int(os.environ.get("BENCH_JOBS_LIST_JOBS", "1000"))
POINTS = int(os.environ.get("BENCH_JOBS_LIST_POINTS", "150"))
ROUNDS = int(os.environ.get("BENCH_JOBS_LIST_ROUNDS", "200"))
PROJECT = "local"
TARGET_P99_MS = 50.0
FLAVORS = ("local.small", "local.medium", "local.large")
# where the seeded jobs end up, and how many of every 20
SPREAD = [
    (JobState.QUEUED, 2),
    (JobState.ALLOCATING, 1),
    (JobState.PROVISIONING, 1),
    (JobState.RUNNING, 3),
    (JobState.EXPORTING, 1),
    (JobState.SUCCEEDED, 7),
    (JobState.FAILED, 3),
    (JobState.CANCELLED, 2),
]
PATH_TO = {
    JobState.QUEUED: [],
    JobState.ALLOCATING: [JobState.ALLOCATING],
    JobState.PROVISIONING: [JobState.ALLOCATING, JobState.PROVISIONING],
    JobState.RUNNING: [JobState.ALLOCATING, JobState.PROVISIONING, JobState.RUNNING],
    JobState.EXPORTING: [
        JobState.ALLOCATING,
        JobState.PROVISIONING,
        JobState.RUNNING,
        JobState.EXPORTING,
    ],
    JobState.SUCCEEDED: [
        JobState.ALLOCATING,
        JobState.PROVISIONING,
        JobState.RUNNING,
        JobState.EXPORTING,
        JobState.SUCCEEDED,
    ],
    JobState.FAILED: [JobState.ALLOCATING, JobState.PROVISIONING, JobState.RUNNING],
    JobState.CANCELLED: [JobState.ALLOCATING, JobState.PROVISIONING, JobState.RUNNING],
}
RAN = {JobState.RUNNING, JobState.EXPORTING, JobState.SUCCEEDED, JobState.FAILED}


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))] if xs else float("nan")


# -- seeding ----------------------------------------------------------------------------------


def _metric_log(rng: random.Random, points: int) -> bytes:
    """A trainer's log: a progress line and one metric line per epoch (3 names a line)."""
    out = []
    epochs = max(1, points // 3)
    loss = 2.3
    for epoch in range(epochs):
        loss *= 0.9 + rng.random() * 0.08
        out.append(f"epoch {epoch}/{epochs}: training...")
        out.append(
            format_metric_line(
                {"loss": loss, "accuracy": 1 - loss / 2.5, "val_loss": loss * 1.1},
                step=(epoch + 1) * 100,
                epoch=epoch,
            )
        )
    return ("\n".join(out) + "\n").encode()


def seed(url: str, jobs: int, points: int) -> dict[str, int]:
    """`jobs` jobs of PROJECT through the repository; returns how many ended in each state."""
    rng = random.Random(13)
    plan = [st for st, n in SPREAD for _ in range(n)]
    counts: dict[str, int] = {}
    for i in range(jobs):
        final = plan[i % len(plan)]
        counts[final.value] = counts.get(final.value, 0) + 1
        spec = JobSpec.model_validate(
            {
                "name": f"bench-{i}",
                "trainer": {
                    "package_uri": f"local://projects/{PROJECT}/staging/bench/t{i % 7}.tar.gz",
                    "module": "trainer.task",
                    "args": ["--epochs=50", f"--seed={i}"],
                },
                "resources": {"flavor": FLAVORS[i % len(FLAVORS)]},
                "hyperparameters": {"lr": 0.01, "batch_size": 64},
                "env": {"WANDB_API_KEY": "secret"},
                "labels": {"team": ("vision", "speech", "nlp")[i % 3], "seq": str(i)},
            }
        )
        with session_scope(url) as s:
            job = repo.create_job(s, PROJECT, spec)
            job.output = {"model_uri": f"local://projects/{PROJECT}/models/{job.id}/"}
            job_id = job.id
        prev = JobState.QUEUED
        servers = 0
        for nxt in PATH_TO[final]:
            with session_scope(url) as s:
                assert repo.transition(s, job_id, prev, nxt, f"to {nxt.value}")
                if nxt is JobState.ALLOCATING:
                    servers = 2 if i % 10 == 0 else 1  # a chief, now and then a worker too
                    for n in range(servers):
                        s.add(
                            Resource(
                                job_id=job_id,
                                owner_id=job_id,
                                project_id=PROJECT,
                                backend="sandbox",
                                role="chief" if n == 0 else "worker",
                                name=f"stackml-{job_id}-{'chief' if n == 0 else 'worker'}-0",
                                flavor=FLAVORS[i % len(FLAVORS)],
                                state=ResourceState.BOOTING.value,
                            )
                        )
                if nxt is JobState.PROVISIONING:
                    started = utcnow() - timedelta(minutes=rng.randint(5, 600))
                    s.execute(
                        update(Resource)
                        .where(Resource.job_id == job_id)
                        .values(
                            state=ResourceState.ACTIVE.value,
                            active_at=started,
                            server_id=f"sbx-{job_id[4:]}",
                            host="127.0.0.1",
                            port=2200 + i % 1000,
                            username="stackml",
                        )
                    )
            prev = nxt
        if final in RAN or final is JobState.CANCELLED:
            with session_scope(url) as s:
                data = _metric_log(rng, points)
                offset = 0
                for piece in (data[: len(data) // 2], data[len(data) // 2 :]):  # two pulls
                    offset = repo.append_log(s, job_id, offset, piece, max_points=10_000)
        if final in (JobState.FAILED, JobState.CANCELLED):
            with session_scope(url) as s:
                if final is JobState.FAILED:
                    why = FailureReason.TRAINER_EXIT_NONZERO
                    failure = repo.Failure(Phase.TRAIN, why, "the trainer exited 1")
                    assert repo.transition(
                        s, job_id, JobState.RUNNING, JobState.FAILED, failure=failure
                    )
                else:
                    assert repo.transition(s, job_id, JobState.RUNNING, JobState.CANCELLING)
                    assert repo.transition(s, job_id, JobState.CANCELLING, JobState.CANCELLED)
        if final.terminal and servers:
            with session_scope(url) as s:
                # most finished jobs gave their servers back; a few still owe a teardown
                gone = i % 25 != 0
                s.execute(
                    update(Resource)
                    .where(Resource.job_id == job_id)
                    .values(
                        state=(ResourceState.DELETED if gone else ResourceState.DELETING).value,
                        deleted_at=utcnow() if gone else None,
                    )
                )
    return counts


# -- measuring --------------------------------------------------------------------------------


class Statements:
    """Counts the SQL statements sent on an engine while `counting` is set."""

    def __init__(self, url: str) -> None:
        self.n = 0
        self.counting = False
        event.listen(engine_for(url), "before_cursor_execute", self._one)

    def _one(self, *_args: Any) -> None:
        if self.counting:
            self.n += 1

    @contextmanager
    def count(self) -> Iterator[None]:
        self.n, self.counting = 0, True
        try:
            yield
        finally:
            self.counting = False


class BackendCalls:
    """Counts registry.compute() calls (what reaching the compute backend starts with)."""

    def __init__(self) -> None:
        self.n = 0
        self.real = registry.compute

        def counted(*args: Any, **kwargs: Any) -> Any:
            self.n += 1
            return self.real(*args, **kwargs)

        registry.compute = counted  # type: ignore[assignment]


def timed(fn: Callable[[], Any], rounds: int) -> list[float]:
    fn()  # warm: the first request of a path compiles its queries
    out = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def figures_of(lat: list[float]) -> dict[str, float]:
    return {
        "p50_ms": round(statistics.median(lat) * 1000, 2),
        "p99_ms": round(_pct(lat, 0.99) * 1000, 2),
    }


class Loopback:
    """The app on a real loopback port (werkzeug, threaded, HTTP/1.1 keep-alive)."""

    def __init__(self, app: Any) -> None:
        class Handler(WSGIRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True

            def log_request(self, *args: Any, **kwargs: Any) -> None:
                pass

        self.server = make_server("127.0.0.1", 0, app, threaded=True, request_handler=Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()
        self.conn = http.client.HTTPConnection("127.0.0.1", self.server.server_port, timeout=30)

    def get(self, path: str) -> bytes:
        self.conn.request("GET", path)
        r = self.conn.getresponse()
        body = r.read()
        if r.status != 200:
            raise RuntimeError(f"GET {path}: {r.status} {body[:300]!r}")
        return body

    def close(self) -> None:
        self.conn.close()
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


def main() -> int:
    figures: dict[str, Any] = {"bench": "jobs_list", "jobs": JOBS, "points_per_job": POINTS}
    with temp_database("benchjobs") as url, tempfile.TemporaryDirectory() as tmp:
        upgrade(url)
        t0 = time.perf_counter()
        counts = seed(url, JOBS, POINTS)
        figures["seed_s"] = round(time.perf_counter() - t0, 1)
        with session_scope(url) as s:
            from sqlalchemy import func, select

            from service.db.models import MetricRow

            rows = {
                "metrics": s.scalar(select(func.count()).select_from(MetricRow)),
                "resources": s.scalar(select(func.count()).select_from(Resource)),
            }
            one_id = s.scalar(select(Job.id).where(Job.state == JobState.SUCCEEDED.value).limit(1))
        with engine_for(url).connect() as conn:
            conn.exec_driver_sql("ANALYZE")
        print(
            f"seeded {JOBS} jobs in {figures['seed_s']} s: {counts}; "
            f"{rows['metrics']} metric rows, {rows['resources']} resource rows"
        )
        figures.update(states=counts, rows=rows)
        settings = Settings(
            data_dir=Path(tmp) / "data",
            database_url=url,
            redis_url="redis://127.0.0.1:1/0",
            secret_key="bench-signing-key",
            auth="noauth",
            compute="sandbox",
            store="local",
            local_project=PROJECT,
        )
        app = create_app(settings, enqueue=lambda t, j: None)
        client = app.test_client()
        stmts = Statements(url)
        backend = BackendCalls()

        def get(path: str) -> Callable[[], Any]:
            def one() -> Any:
                r = client.get(path)
                assert r.status_code == 200, (path, r.status_code, r.get_data()[:300])
                return r

            return one

        paths = {
            "healthz": "/healthz",
            "job": f"/v1/jobs/{one_id}",
            "page5": "/v1/jobs?limit=5",
            "page50": "/v1/jobs",
            "page200": "/v1/jobs?limit=200",
            "state_running": "/v1/jobs?state=RUNNING,EXPORTING",
            "label": "/v1/jobs?label=team=speech",
        }
        print(f"{'request':<44}{'statements':>11}{'backend':>9}{'p50 ms':>9}{'p99 ms':>9}")
        inproc: dict[str, Any] = {}
        for key, path in paths.items():
            with stmts.count():
                backend.n = 0
                get(path)()
            n, calls = stmts.n, backend.n
            lat = timed(get(path), ROUNDS)
            inproc[key] = {"statements": n, "backend_calls": calls, **figures_of(lat)}
            f = inproc[key]
            print(
                f"{'GET ' + path[:39]:<44}{n:>11}{calls:>9}{f['p50_ms']:>9.2f}{f['p99_ms']:>9.2f}"
            )
        # walking every page of the listing with markers
        walk_lat, walk_stmts, seen = [], [], 0
        marker: str | None = None
        while True:
            path = "/v1/jobs" + (f"?marker={marker}" if marker else "")
            with stmts.count():
                t0 = time.perf_counter()
                body = get(path)().get_json()
                walk_lat.append(time.perf_counter() - t0)
            walk_stmts.append(stmts.n)
            seen += len(body["jobs"])
            marker = body["next"]
            if marker is None:
                break
        assert seen == JOBS, seen
        inproc["walk"] = {
            "pages": len(walk_lat),
            "statements_per_page": sorted(set(walk_stmts)),
            **figures_of(walk_lat),
        }
        print(
            f"walk: {len(walk_lat)} pages of 50 with markers, statements per page "
            f"{sorted(set(walk_stmts))}, p50 {inproc['walk']['p50_ms']} ms, "
            f"p99 {inproc['walk']['p99_ms']} ms"
        )
        figures["test_client"] = inproc

        server = Loopback(app)
        try:
            loop: dict[str, Any] = {}
            for key in ("healthz", "job", "page50", "page200"):
                path = paths[key]
                lat = timed(lambda p=path: server.get(p), ROUNDS)  # type: ignore[misc]
                loop[key] = figures_of(lat)
            shown = (f"{k} p50 {v['p50_ms']} / p99 {v['p99_ms']} ms" for k, v in loop.items())
            print("loopback (HTTP/1.1 keep-alive): " + ", ".join(shown))
            figures["loopback"] = loop
        finally:
            server.close()

        p99 = loop["page50"]["p99_ms"]
        flat = inproc["page5"]["statements"] == inproc["page50"]["statements"]
        flat = flat and inproc["page50"]["statements"] == inproc["page200"]["statements"]
        calls = sum(v.get("backend_calls", 0) for v in inproc.values())
        print(
            f"page of 50 over loopback: p99 {p99} ms (target <= {TARGET_P99_MS} ms); "
            f"GET /healthz p99 {loop['healthz']['p99_ms']} ms, one job p99 "
            f"{loop['job']['p99_ms']} ms"
        )
        print(
            f"statements for pages of 5 / 50 / 200: {inproc['page5']['statements']} / "
            f"{inproc['page50']['statements']} / {inproc['page200']['statements']} "
            f"(target: equal); compute backend calls {calls} (target 0)"
        )
        figures.update(
            target_p99_ms=TARGET_P99_MS,
            page50_p99_ms=p99,
            statements_flat=flat,
            backend_calls=calls,
            met=bool(p99 <= TARGET_P99_MS and flat and calls == 0),
        )
        registry.compute = backend.real  # type: ignore[assignment]
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
