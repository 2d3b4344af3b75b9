"""Control-plane throughput: what a submission costs, and a burst of jobs through the platform.

1. Submission cost (in one process, Flask's test client, real PostgreSQL and Redis): POST
   /v1/jobs of a trivial training job, BENCH_SUBMITS times (default 300) in a row, with the SQL
   statements one submission sends; baseline in the same run: GET /healthz and GET /v1/jobs/{id}.
   This is the handler's own cost, what no server or client can take away.

2. The burst: BENCH_BURST_JOBS trivial jobs (default 500) submitted at once by 16 client
   threads to a platform run as production runs it (docs/operations.md): the API under gunicorn
   (BENCH_API_PROCESSES processes, default 2, threads each, on one port), Celery worker
   processes (1, 2 and 4 in turn, BENCH_WORKER_PROCESSES="1,2,4"; --concurrency 2 each) and one
   beat, all on one PostgreSQL, one Redis and one data dir, the sandbox backend capped at
   BENCH_BURST_CAP servers (default 6), the workers at the CPU priority `worker_nice` gives
   them (BENCH_WORKER_NICE overrides it: 0 for the workers at the API's priority). For each:
   submit p50/p99 as clients see it, jobs/s from the first submission to the last job's
   finished_at, which worker processes ran steps, and the check that every job SUCCEEDED once
   (its log says "run <id>" exactly once, one server).
   And where the CPU went, per job (bench/cpu_account.py): the control plane's parts (API,
   workers, beat, PostgreSQL, Redis) and the emulated cloud's (the rest of the machine's busy
   time: the sandboxes' sshd, runner and trainer, the sandbox backend's tools); the jobs/s the
   control plane alone could carry on this machine's cores; and the worker pool's CPU per job
   by step (bench/taskcpu/sitecustomize.py, on the worker processes' PYTHONPATH).
   BENCH_TASK_PROFILE=<task name>|all profiles those tasks in the pool processes and keeps
   the profiles in /var/tmp/stackml-burst-profile-<n>-*/.

Targets (issue #13): submit p50 <= 5 ms and p99 <= 20 ms, >= 10 jobs/s, 0 lost, 0 run twice (and no
job's log without its line).
Prints each figure next to its target, then one JSON line with every figure.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import statistics
import sys
import tempfile
import textwrap
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import redis  # noqa: E402
from sqlalchemy import event  # noqa: E402

from bench.cpu_account import CpuAccount  # noqa: E402
from service.api import create_app  # noqa: E402
from service.backends.compute import sandbox_net  # noqa: E402
from service.client import StackMLClient, build_package  # noqa: E402
from service.config import Settings  # noqa: E402
from service.db.migrate import upgrade  # noqa: E402
from service.db.session import engine_for  # noqa: E402
from service.queue import redis_keys  # noqa: E402
from tests.envutil import environ, free_port, reap_sandboxes  # noqa: E402
from tests.pgutil import temp_database  # noqa: E402
from tests.topology import Topology, api_argv, beat_argv, worker_argv  # noqa: E402

SUBMITS = int(os.environ.get("BENCH_SUBMITS", "300"))
BURST = int(os.environ.get("BENCH_BURST_JOBS", "500"))
CAP = int(os.environ.get("BENCH_BURST_CAP", "6"))
API_PROCESSES = int(os.environ.get("BENCH_API_PROCESSES", "2"))
WORKER_PROCESSES = [int(n) for n in os.environ.get("BENCH_WORKER_PROCESSES", "1,2,4").split(",")]
REDIS_URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/12")
WORKER_NICE = os.environ.get("BENCH_WORKER_NICE")  # unset: the setting's default
RUNTIME_ROOT = os.environ.get("STACKML_TEST_RUNTIME_ROOT", "/var/cache/stackml/runtimes")
CORES = os.cpu_count() or 1
TASK_CPU = Path(__file__).resolve().parent / "taskcpu"
# the parts of bench/cpu_account.py that are the control plane (the store gateway is the local
# stand-in for Swift, the cloud's part; so is everything the account calls "cloud")
CONTROL_PLANE = ("api", "workers", "beat", "postgresql", "redis")
TARGETS = {"submit_p50_ms": 5.0, "submit_p99_ms": 20.0, "jobs_per_s": 10.0}
QUICK = """
import os
print("run", os.environ["STACKML_JOB_ID"], flush=True)
open(os.path.join(os.environ["STACKML_MODEL_DIR"], "m"), "w").write("1")
"""


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def _ms(xs: list[float]) -> dict[str, float]:
    return {
        "p50_ms": round(statistics.median(xs) * 1000, 2),
        "p99_ms": round(_pct(xs, 0.99) * 1000, 2),
    }


def _package(tmp: Path) -> bytes:
    pkg = tmp / "pkg"
    (pkg / "trainer").mkdir(parents=True)
    (pkg / "trainer" / "__init__.py").write_text("")
    (pkg / "trainer" / "quick.py").write_text(textwrap.dedent(QUICK))
    buf = io.BytesIO()
    build_package(pkg, buf)
    return buf.getvalue()


# -- 1. what a submission costs -----------------------------------------------------------------


def submission_cost(tmp: Path) -> dict[str, Any]:
    queue = f"stackml-bench-submit-{uuid.uuid4().hex[:8]}"
    with temp_database("benchsubmit") as url:
        upgrade(url)
        settings = Settings(
            data_dir=tmp / "submit-data",
            database_url=url,
            redis_url=REDIS_URL,
            queue=queue,
            secret_key="bench-signing-key",
            compute="sandbox",
            store="local",
            runtime_root=Path(RUNTIME_ROOT),
            quota_defaults={"jobs": SUBMITS * 2 + 10, "servers": 10, "gpus": 4},
        )
        app = create_app(settings)
        client = app.test_client()
        r = client.post("/v1/packages", data=_package(tmp), content_type="application/gzip")
        assert r.status_code == 201, (r.status_code, r.get_data()[:300])
        uri = r.get_json()["package_uri"]
        body = {"name": "bench", "trainer": {"package_uri": uri, "module": "trainer.quick"}}
        statements = 0

        def count(*_a: Any) -> None:
            nonlocal statements
            statements += 1

        def submit() -> str:
            r = client.post("/v1/jobs", json=body)
            assert r.status_code == 202, (r.status_code, r.get_data()[:300])
            return str(r.get_json()["id"])

        job_id = submit()  # warm: the first request of a path compiles its queries
        event.listen(engine_for(url), "before_cursor_execute", count)
        submit()
        event.remove(engine_for(url), "before_cursor_execute", count)
        lat: dict[str, list[float]] = {"submit": [], "healthz": [], "get": []}
        calls = {
            "submit": submit,
            "healthz": lambda: client.get("/healthz"),
            "get": lambda: client.get(f"/v1/jobs/{job_id}"),
        }
        for _ in range(SUBMITS):
            for key, fn in calls.items():
                t0 = time.perf_counter()
                fn()
                lat[key].append(time.perf_counter() - t0)
        redis.Redis.from_url(REDIS_URL).delete(*redis_keys(queue))
    out = {k: _ms(v) for k, v in lat.items()}
    out["statements_per_submit"] = statements  # type: ignore[assignment]
    print(
        f"submission (in process, {SUBMITS} in a row): p50 {out['submit']['p50_ms']} ms, p99 "
        f"{out['submit']['p99_ms']} ms, {statements} SQL statements; GET /healthz p50 "
        f"{out['healthz']['p50_ms']} ms, GET /v1/jobs/{{id}} p50 {out['get']['p50_ms']} ms"
    )
    return out


# -- 2. the burst ---------------------------------------------------------------------------------


def start_platform(topo: Topology, env: dict[str, str], workers: int, port: int) -> None:
    """The API under gunicorn, `workers` Celery worker processes and one beat, on one
    PostgreSQL, Redis and data dir; with isolated sandboxes also the store gateway (the one
    host address they reach), as `stackml up` serves it."""
    with environ(env):
        net = sandbox_net.from_settings(Settings())
    if net is not None:
        sandbox_net.ensure_gateway(net)
        topo.start(
            "gateway", api_argv("service.wsgi:gateway", f"{net.gateway}:{net.store_port}", 1), env
        )
    api = topo.start(
        "api",
        api_argv("service.wsgi:app", f"127.0.0.1:{port}", API_PROCESSES, "--keep-alive", "30"),
        env,
    )
    for n in range(workers):
        topo.start(f"worker-{n}", worker_argv(f"bench-{n}-{os.getpid()}"), env)
    topo.start("beat", beat_argv(topo.run_dir / "beat-schedule"), env)
    topo.wait_api(api, f"http://127.0.0.1:{port}")


def _parts(topo: Topology) -> dict[str, list[int]]:
    """The topology's services by part of the CPU account (bench/cpu_account.py)."""
    parts: dict[str, list[int]] = {}
    for svc in topo.services:
        pid = svc.pid()
        part = "workers" if svc.name.startswith("worker-") else svc.name
        if pid is not None:
            parts.setdefault(part, []).append(pid)
    return parts


def _task_cpu(where: Path, jobs: int) -> dict[str, dict[str, float]]:
    """Per task name (without "stackml."): tasks a job, the pool's CPU ms a job, and the
    median task's CPU ms, from what bench/taskcpu/sitecustomize.py wrote in each pool
    process; most CPU first."""
    each: dict[str, list[float]] = {}
    for f in where.glob("*.json"):
        for name, ms in json.loads(f.read_text()).items():
            each.setdefault(name.removeprefix("stackml."), []).extend(ms)
    rows = sorted(each.items(), key=lambda kv: -sum(kv[1]))
    return {
        k: {
            "per_job": round(len(ms) / jobs, 2),
            "ms_per_job": round(sum(ms) / jobs, 1),
            "median_ms": round(statistics.median(ms), 1),
        }
        for k, ms in rows
    }


def _worker_of_steps(logs: Path) -> dict[str, int]:
    """Steps each worker process ran, from its log's 'Task ... succeeded' lines."""
    out = {}
    for log in sorted(logs.glob("worker-*.log")):
        out[log.stem] = sum(1 for line in log.open(errors="replace") if "succeeded in" in line)
    return out


def burst(tmp: Path, workers: int) -> dict[str, Any]:
    data = Path(tempfile.mkdtemp(prefix="stackml-bench-burst-", dir="/var/tmp"))
    os.chmod(data, 0o755)
    logs = tmp / f"burst-{workers}"
    logs.mkdir()
    task_cpu = logs / "task-cpu"
    task_cpu.mkdir()
    port = free_port()
    with temp_database("benchburst") as db_url:
        upgrade(db_url)
        env = {k: v for k, v in os.environ.items() if not k.startswith("STACKML_")}
        env.update(
            {
                "STACKML_DATA_DIR": str(data),
                "STACKML_DATABASE_URL": db_url,
                "STACKML_REDIS_URL": REDIS_URL,
                "STACKML_QUEUE": f"stackml-bench-burst-{os.getpid()}-{workers}",
                "STACKML_PORT": str(port),
                "STACKML_RUNTIME_ROOT": RUNTIME_ROOT,
                "STACKML_MAX_SERVERS": str(CAP),
                "STACKML_RECONCILE_INTERVAL": "2",
                "STACKML_QUOTA_DEFAULTS": json.dumps({"jobs": BURST + 10, "servers": CAP}),
                "STACKML_SECRET_KEY": "bench-burst-signing-key",
                # each task's CPU in the worker pool (bench/taskcpu/sitecustomize.py)
                "PYTHONPATH": os.pathsep.join(
                    p for p in (str(TASK_CPU), os.environ.get("PYTHONPATH", "")) if p
                ),
                "BENCH_TASK_CPU_DIR": str(task_cpu),
            }
        )
        if WORKER_NICE is not None:  # the workers' CPU priority (settings.worker_nice)
            env["STACKML_WORKER_NICE"] = WORKER_NICE
        try:
            with Topology(logs) as topo:
                start_platform(topo, env, workers, port)
                url = f"http://127.0.0.1:{port}"
                client = StackMLClient(url, timeout=60)
                pkg = tmp / f"pkg-{workers}.tar.gz"
                pkg.write_bytes(_package(tmp / f"src-{workers}"))
                uri = client.upload_package(pkg)["package_uri"]
                local = threading.local()
                cpu = CpuAccount(_parts(topo))
                cpu.start()

                def one(i: int) -> tuple[str, float, float]:
                    c = getattr(local, "c", None)
                    if c is None:
                        c = local.c = StackMLClient(url, timeout=60)
                    spec = {
                        "name": f"burst-{i}",
                        "trainer": {"package_uri": uri, "module": "trainer.quick"},
                    }
                    t_wall = time.time()
                    t = time.perf_counter()
                    job = c.create_job(spec)
                    return job["id"], time.perf_counter() - t, t_wall

                with ThreadPoolExecutor(16) as pool:
                    submitted = list(pool.map(one, range(BURST)))
                first = min(t for _, _, t in submitted)
                ids = [i for i, _, _ in submitted]
                lat = [t for _, t, _ in submitted]
                deadline = time.monotonic() + 1800
                active = ["QUEUED", "ALLOCATING", "PROVISIONING", "RUNNING", "EXPORTING"]
                while client.list_jobs(state=active, limit=1)["jobs"]:
                    if time.monotonic() > deadline:
                        raise SystemExit("the burst did not finish within 30 minutes")
                    time.sleep(1)
                cpu.stop()
                jobs = {j["id"]: j for j in client.iter_jobs()}
                failed = [jobs[i] for i in ids if i in jobs and jobs[i]["state"] != "SUCCEEDED"]
                lost = len(set(ids) - set(jobs)) + len(failed)
                for j in failed[:3]:
                    print(f"  {j['id']} ended {j['state']}: {j['failure']}", flush=True)
                twice = unlogged = 0
                for i in ids:
                    if i not in jobs or jobs[i]["state"] != "SUCCEEDED":
                        continue
                    runs = client.logs(i)[0].decode().count(f"run {i}")
                    servers = [r for r in jobs[i]["resources"] if r["server_id"]]
                    if runs == 1 and len(servers) == 1:
                        continue
                    if runs == 0 and len(servers) == 1:
                        unlogged += 1  # it ran (it SUCCEEDED: its model is out), its line lost
                    else:
                        twice += 1
                    if twice + unlogged <= 3:  # say why, with the job's own account of itself
                        events = [
                            f"{e['at'][11:23]} {e['kind']} {e['from']}->{e['to']}: "
                            f"{e['message'] or ''}"[:160]
                            for e in client.events(i)["events"]
                        ]
                        print(
                            f"  {i}: 'run {i}' {runs} time(s) in its log, servers "
                            f"{[(r['server_id'], r['state']) for r in servers]}; events:\n    "
                            + "\n    ".join(events),
                            flush=True,
                        )
                if twice or unlogged or lost:  # keep the processes' logs for the post-mortem
                    kept = Path(
                        tempfile.mkdtemp(prefix=f"stackml-burst-logs-{workers}-", dir="/var/tmp")
                    )
                    shutil.copytree(logs, kept, dirs_exist_ok=True)
                    print(f"  the platform's logs of this burst are kept in {kept}", flush=True)
                last = max(
                    datetime.fromisoformat(j["finished_at"].replace("Z", "+00:00")).timestamp()
                    for j in jobs.values()
                    if j["finished_at"]
                )
                deadline = time.monotonic() + 120
                while any(
                    r["state"] != "deleted" for j in client.iter_jobs() for r in j["resources"]
                ):
                    if time.monotonic() > deadline:
                        raise SystemExit("servers were not all deleted within 120 s")
                    time.sleep(1)
        finally:
            reap_sandboxes(data / "sandboxes")
            redis.Redis.from_url(REDIS_URL).delete(*redis_keys(env["STACKML_QUEUE"]))
            shutil.rmtree(data, ignore_errors=True)
    seconds = last - first
    per_job = cpu.per_job(BURST, CONTROL_PLANE)
    steps = _task_cpu(task_cpu, BURST)
    if os.environ.get("BENCH_TASK_PROFILE"):  # the pool processes' profiles outlive the run
        kept = Path(tempfile.mkdtemp(prefix=f"stackml-burst-profile-{workers}-", dir="/var/tmp"))
        for prof in task_cpu.glob("*.prof"):
            shutil.copy(prof, kept)
        print(f"task profiles ({os.environ['BENCH_TASK_PROFILE']}): {kept}/*.prof", flush=True)
    out = {
        "worker_processes": workers,
        "jobs": BURST,
        "seconds": round(seconds, 1),
        "jobs_per_s": round(BURST / seconds, 2),
        "submit": _ms(lat),
        "steps_per_worker": _worker_of_steps(logs),
        "lost": lost,
        "run_twice": twice,
        "log_line_lost": unlogged,
        "cpu_ms_per_job": per_job,
        "control_plane_jobs_per_s": round(CORES * 1000 / per_job["control_plane"], 1),
        "worker_steps_per_job": steps,
    }
    print(
        f"burst of {BURST}, {workers} worker process(es): {out['jobs_per_s']} jobs/s "
        f"(target >= {TARGETS['jobs_per_s']}), submit p50 {out['submit']['p50_ms']} ms "
        f"(target <= {TARGETS['submit_p50_ms']}), p99 {out['submit']['p99_ms']} ms "
        f"(target <= {TARGETS['submit_p99_ms']}); lost {lost}, run twice {twice}, "
        f"log line lost {unlogged} (target 0 each); "
        f"steps per worker process {out['steps_per_worker']}",
        flush=True,
    )
    print(
        f"  CPU per job: control plane {per_job['control_plane']} ms (API {per_job['api']}, "
        f"workers {per_job['workers']}, beat {per_job['beat']}, PostgreSQL "
        f"{per_job['postgresql']}, Redis {per_job['redis']}); emulated cloud {per_job['cloud']}"
        f" ms; bench clients {per_job['clients']} ms. The control plane alone on {CORES} cores: "
        f"{out['control_plane_jobs_per_s']} jobs/s (target >= {TARGETS['jobs_per_s']})",
        flush=True,
    )
    print(
        "  worker pool CPU per job, by step (steps a job, ms a job, median ms a step): "
        + ", ".join(
            f"{k} {v['per_job']}x {v['ms_per_job']} ({v['median_ms']})" for k, v in steps.items()
        ),
        flush=True,
    )
    return out


def main() -> int:
    figures: dict[str, Any] = {"bench": "burst", "targets": TARGETS, "cap": CAP}
    with tempfile.TemporaryDirectory() as t:
        tmp = Path(t)
        figures["submission"] = submission_cost(tmp)
        if BURST:
            figures["api_processes"] = API_PROCESSES
            figures["bursts"] = [burst(tmp, n) for n in WORKER_PROCESSES]
    print(json.dumps(figures))
    bad = [
        b for b in figures.get("bursts", []) if b["lost"] or b["run_twice"] or b["log_line_lost"]
    ]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
