"""OpenStack API calls per job for the product's allocate step, on a boot as slow as Nova's.

    .venv/bin/python bench/bench_openstack_calls.py [--jobs 4] [--boot-delay 30]

Starts the Nova emulator (no auth, loopback) with every server held in BUILD `--boot-delay`
seconds after its sandbox is up (`--boot-delay`, what a real Nova takes to schedule, fetch the
image and boot: ~30 s). Then, in the same run:

- product: `--jobs` QUEUED jobs in a throwaway PostgreSQL database, with the openstack compute
  backend (clouds.yaml pointing at the emulator). Each job's `stackml.allocate` message is
  enqueued with `service.queue.enqueue`, as the API does; a small driver plays the Celery
  worker: it takes each message the step hands back (through the real broker, Redis), waits for
  its countdown and calls `workers.steps.allocate.run(job_id)` in a pool of 4 forked
  processes (the prefork pool of `stackml up`). A job is done when the step enqueues
  `stackml.provision` (ACTIVE, host key read from the console). The jobs run at once, so
  their boots overlap.
- baseline: the same number of jobs through openstacksdk's cloud layer the obvious way, one
  thread each: a keypair, `create_server(..., wait=True)` by names, the console output once.

Calls are counted by the emulator itself (every request it answers, by method and route), so
both sides are counted the same way; teardown is not counted. Prints calls per job by kind, the
ratio product/baseline, time to ACTIVE, then one JSON line.
Needs: root (the emulator's sandboxes), PostgreSQL (STACKML_BENCH_PG, default
postgresql+psycopg://postgres@127.0.0.1:5432/postgres) and Redis (STACKML_BENCH_REDIS, default
redis://127.0.0.1:6379/14).
"""

from __future__ import annotations

import argparse
import contextlib
import heapq
import itertools
import json
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from datetime import datetime
from pathlib import Path
from queue import Empty
from typing import Any

import requests

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from devcloud.emulator import cleanup  # noqa: E402
from devcloud.process import free_port  # noqa: E402

PG = os.environ.get("STACKML_BENCH_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")
REDIS = os.environ.get("STACKML_BENCH_REDIS", "redis://127.0.0.1:6379/14")
RUNTIME_ROOT = os.environ.get("STACKML_RUNTIME_ROOT", "/var/cache/stackml/runtimes")
POOL = 4  # the worker's prefork pool in `stackml up`
FLAVOR = "m1.small"


def start_emulator(work: Path, boot_delay: float) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    argv = [
        sys.executable,
        "-m",
        "devcloud.emulator",
        "--port",
        str(port),
        "--quiet",
        "--state-dir",
        str(work / "state"),
        "--keystone-url",
        "none",
        "--boot-delay",
        str(boot_delay),
    ]
    if Path(RUNTIME_ROOT).is_dir():
        argv += ["--runtime-root", RUNTIME_ROOT]
    log = open(work / "emulator.log", "wb")  # the child keeps it
    proc = subprocess.Popen(
        argv, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    log.close()
    deadline = time.monotonic() + 30
    while True:
        if proc.poll() is not None:
            raise SystemExit((work / "emulator.log").read_text()[-3000:])
        with contextlib.suppress(requests.RequestException):
            if requests.get(f"{url}/compute/", timeout=2).ok:
                return proc, url
        if time.monotonic() > deadline:
            raise SystemExit("the emulator did not start")
        time.sleep(0.05)


def stop_emulator(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)


def clouds_yaml(work: Path, url: str) -> Path:
    """A clouds.yaml whose cloud `bench` reaches the emulator without auth."""
    path = work / "clouds.yaml"
    cloud = {
        "auth_type": "none",
        "compute_endpoint_override": f"{url}/compute/v2.1",
        "network_endpoint_override": f"{url}/network",
        "image_endpoint_override": f"{url}/image",
        "api_timeout": 30,
    }
    path.write_text(json.dumps({"clouds": {"bench": cloud}}))  # JSON is YAML
    return path


class EmulatorCalls:
    """The emulator's own count of the API calls it answered (GET/DELETE /_stackml/calls)."""

    def __init__(self, url: str) -> None:
        self.url = f"{url}/compute/_stackml/calls"

    def reset(self) -> None:
        r = requests.delete(self.url, timeout=10)
        assert r.status_code == 204, r.text

    def read(self) -> dict[str, int]:
        r = requests.get(self.url, timeout=10)
        r.raise_for_status()
        calls: dict[str, int] = r.json()["calls"]
        return {k: v for k, v in calls.items() if "/_stackml/" not in k}


def _pool_process_init() -> None:
    """What a Celery prefork child does when it starts (workers.celery_app._after_fork)."""
    from workers.celery_app import _after_fork

    _after_fork()


def _allocate(job_id: str) -> None:
    from workers.steps import allocate

    allocate.run(job_id)


class WorkerDriver:
    """Plays the Celery worker for the allocate step: takes the step's messages from the real
    broker, honours their countdown (eta), runs `allocate.run(job_id)` in a pool of forked
    processes (the prefork pool: each child keeps its own connection and caches); a job is
    done when its next step (provision) or a failure's teardown is enqueued."""

    def __init__(self, broker_url: str, queue_name: str) -> None:
        from kombu import Connection

        self.conn = Connection(broker_url)
        self.queue = self.conn.SimpleQueue(queue_name, serializer="json")
        self.queue.consumer.accept = {"application/json"}

    def close(self) -> None:
        self.queue.clear()  # what the admission re-enqueued for jobs already done
        self.queue.close()
        self.conn.release()

    def run(self, job_ids: list[str], deadline_s: float) -> dict[str, dict[str, Any]]:
        from service import queue

        t0 = time.monotonic()
        due: list[tuple[float, int, str]] = []
        seq = itertools.count()
        running: set[Future[None]] = set()
        outcome: dict[str, dict[str, Any]] = {}
        runs: Counter[str] = Counter()
        with ProcessPoolExecutor(
            max_workers=POOL,
            mp_context=multiprocessing.get_context("fork"),
            initializer=_pool_process_init,
        ) as pool:
            while len(outcome) < len(job_ids):
                assert time.monotonic() - t0 < deadline_s, f"allocate not done: {outcome}"
                for f in [f for f in running if f.done()]:
                    running.discard(f)
                    f.result()  # a step that raised fails the bench loudly
                try:
                    msg = self.queue.get(block=True, timeout=0.02)
                except Empty:
                    msg = None
                if msg is not None:
                    task = msg.headers["task"]
                    (job_id,) = msg.decode()[0]
                    eta = msg.headers.get("eta")
                    at = datetime.fromisoformat(eta).timestamp() if eta else time.time()
                    msg.ack()
                    if task == queue.ALLOCATE:
                        heapq.heappush(due, (at, next(seq), job_id))
                    elif job_id not in outcome:
                        outcome[job_id] = {
                            "next": task,
                            "seconds": round(time.monotonic() - t0, 2),
                            "allocate_runs": runs[job_id],
                        }
                while due and due[0][0] <= time.time() and len(running) < POOL:
                    _, _, job_id = heapq.heappop(due)
                    if job_id in outcome:
                        continue
                    runs[job_id] += 1
                    running.add(pool.submit(_allocate, job_id))
            for f in running:
                f.result()
        return outcome


def product_side(url: str, work: Path, jobs: int, boot_delay: float) -> dict[str, Any]:
    from service import queue
    from service.backends import registry
    from service.backends.interfaces import ServerState
    from service.db import jobs as repo
    from service.db.migrate import upgrade
    from service.db.models import Resource
    from service.db.session import session_scope
    from service.domain.spec import JobSpec
    from tests.envutil import environ
    from tests.pgutil import temp_database

    calls = EmulatorCalls(url)
    queue_name = f"stackml-bench-alloc-{os.getpid()}"
    with (
        temp_database("bench") as db_url,
        environ(
            {
                "STACKML_DATA_DIR": str(work / "data"),
                "STACKML_DATABASE_URL": db_url,
                "STACKML_REDIS_URL": REDIS,
                "STACKML_QUEUE": queue_name,
                "STACKML_COMPUTE": "openstack",
                "OS_CLIENT_CONFIG_FILE": str(clouds_yaml(work, url)),
                "STACKML_OPENSTACK_CLOUD": "bench",
                "STACKML_DEFAULT_FLAVOR": FLAVOR,
                "STACKML_BOOT_DEADLINE": str(boot_delay + 90),
            }
        ),
    ):
        registry.reset()
        upgrade(db_url)
        spec = JobSpec.model_validate(
            {
                "name": "bench",
                "trainer": {"package_uri": "local://projects/bench/p.tar.gz", "module": "t"},
                "resources": {"flavor": FLAVOR},
            }
        )
        with session_scope(db_url) as s:
            ids = [repo.create_job(s, "bench", spec).id for _ in range(jobs)]
        driver = WorkerDriver(REDIS, queue_name)
        try:
            calls.reset()
            for job_id in ids:
                queue.enqueue(queue.ALLOCATE, job_id)  # what POST /v1/jobs does
            outcome = driver.run(ids, boot_delay + 120)
            counted = calls.read()
        finally:
            driver.close()
            with session_scope(db_url) as s:
                servers = [r.server_id for r in s.query(Resource) if r.server_id]
            backend = registry.compute()
            for server_id in servers:
                with contextlib.suppress(Exception):
                    backend.delete_server(server_id)
            deadline = time.monotonic() + 60
            for server_id in servers:
                while backend.get_server(server_id).state is not ServerState.DELETED:
                    if time.monotonic() > deadline:
                        break
                    time.sleep(0.5)
            registry.reset()
    failed = {j: o for j, o in outcome.items() if o["next"] != queue.PROVISION}
    if failed:
        raise SystemExit(f"allocate did not bring every job to PROVISIONING: {failed}")
    return {"calls": counted, "jobs": outcome}


def baseline_side(url: str, jobs: int, boot_delay: float) -> dict[str, Any]:
    """openstacksdk's cloud layer, the obvious way, one thread (and connection) per job."""
    import openstack.config
    from openstack.connection import Connection

    from workers import ssh

    calls = EmulatorCalls(url)
    _, public_key = ssh.generate_keypair()
    seconds: dict[str, float] = {}
    servers: list[tuple[Any, str, str]] = []
    lock = threading.Lock()

    def connection() -> Any:
        region = openstack.config.get_cloud_region(
            load_yaml_config=False,
            load_envvars=False,
            auth_type="none",
            compute_endpoint_override=f"{url}/compute/v2.1",
            network_endpoint_override=f"{url}/network",
            image_endpoint_override=f"{url}/image",
            api_timeout=30,
        )
        return Connection(config=region)

    def one(i: int) -> None:
        conn = connection()
        name = f"bench-base-{i}"
        t0 = time.monotonic()
        conn.compute.create_keypair(name=name, public_key=public_key)
        server = conn.create_server(
            name,
            image="stackml-tensorflow-2.21",
            flavor=FLAVOR,
            network="private",
            key_name=name,
            meta={"stackml-job": name},
            wait=True,
            timeout=boot_delay + 90,
            auto_ip=False,
        )
        conn.compute.get_server_console_output(server.id)
        with lock:
            seconds[name] = round(time.monotonic() - t0, 2)
            servers.append((conn, server.id, name))

    calls.reset()
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        for f in [pool.submit(one, i) for i in range(jobs)]:
            f.result()
    counted = calls.read()
    for conn, server_id, name in servers:
        conn.delete_server(server_id, wait=True, timeout=60)
        conn.compute.delete_keypair(name)
    return {"calls": counted, "seconds": seconds}


def show(title: str, counts: dict[str, int], jobs: int) -> None:
    print(f"{title}: {sum(counts.values())} calls for {jobs} jobs")
    for kind, n in sorted(counts.items(), key=lambda kv: -kv[1]):
        print(f"  {n:4d}  {kind}")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--jobs", type=int, default=4)
    ap.add_argument("--boot-delay", type=float, default=30.0)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="stackml-bench-os-", dir="/var/tmp"))
    os.chmod(work, 0o755)
    proc, url = start_emulator(work, args.boot_delay)
    figures: dict[str, Any] = {"bench": "openstack_calls", "boot_delay_s": args.boot_delay}
    try:
        product = product_side(url, work, args.jobs, args.boot_delay)
        base = baseline_side(url, args.jobs, args.boot_delay)
        n = args.jobs
        p_total, b_total = sum(product["calls"].values()), sum(base["calls"].values())
        p_gets = product["calls"].get("GET /compute/v2.1/servers/<server_id>", 0)
        b_gets = base["calls"].get("GET /compute/v2.1/servers/<server_id>", 0)
        show(f"product: allocate step, BUILD {args.boot_delay:.0f}s", product["calls"], n)
        show("baseline: openstacksdk create_server(wait=True)", base["calls"], n)
        p_secs = sorted(o["seconds"] for o in product["jobs"].values())
        b_secs = sorted(base["seconds"].values())
        runs = sorted(o["allocate_runs"] for o in product["jobs"].values())
        print(
            f"per job: product {p_total / n:.1f} calls ({p_gets / n:.1f} server GETs, "
            f"{runs} allocate runs), baseline {b_total / n:.1f} calls ({b_gets / n:.1f} server "
            f"GETs); ratio product/baseline {p_total / b_total:.2f} (lower is better)"
        )
        print(
            f"server status polls per job: product {p_gets / n:.1f} (target <= 15), "
            f"baseline {b_gets / n:.1f}"
        )
        print(f"seconds to ACTIVE: product {p_secs}, baseline {b_secs}")
        figures.update(
            jobs=n,
            product_calls_per_job=round(p_total / n, 1),
            baseline_calls_per_job=round(b_total / n, 1),
            product_server_gets_per_job=round(p_gets / n, 1),
            baseline_server_gets_per_job=round(b_gets / n, 1),
            ratio=round(p_total / b_total, 3),
            product_allocate_runs=runs,
            product_seconds=p_secs,
            baseline_seconds=b_secs,
            product_by_kind=product["calls"],
            baseline_by_kind=base["calls"],
        )
    finally:
        stop_emulator(proc)
        cleanup(work / "state")
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
