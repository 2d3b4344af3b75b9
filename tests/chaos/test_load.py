"""A burst of 200 trivial jobs through the API, the sandbox backend capped at a few servers:
every job completes, none is lost or run twice, no server leaks. Figures: throughput, the API's
p99 submit latency during the burst, peak memory of the API and the worker.

200 jobs queue 33 deep behind the cap of 6, which is what the test is about;
`STACKML_LOAD_JOBS=500` runs a 500-job burst (about 2.5 minutes more)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil
import pytest
import requests

from service.client import StackMLClient
from tests.chaos.conftest import CHAOS_REDIS, FIGURES, QUICK, RUNTIME_ROOT, assert_no_leaks
from tests.envutil import free_port, reap_dead_runs, reap_sandboxes
from tests.pgutil import temp_database

JOBS = int(os.environ.get("STACKML_LOAD_JOBS", "200"))
CAP = 6
REDIS_URL = CHAOS_REDIS.url(11)


def _peak_rss_mb(proc: psutil.Process) -> float:
    try:
        with open(f"/proc/{proc.pid}/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


@pytest.mark.timeout(1500)  # 500 jobs take 2.5 to 5 minutes on 2 cores; its own deadline is 1200 s
def test_burst_of_jobs_completes_with_none_lost_or_run_twice(tmp_path: Path) -> None:
    from service.config import Settings

    reap_dead_runs("load")  # what an interrupted earlier run left running
    data = Path(f"/var/tmp/stackml-load-{os.getpid()}")
    shutil.rmtree(data, ignore_errors=True)
    data.mkdir(mode=0o755)
    port = free_port()
    with temp_database("load") as db_url:
        env = {k: v for k, v in os.environ.items() if not k.startswith("STACKML_")}
        env.update(
            {
                "STACKML_DATA_DIR": str(data),
                "STACKML_DATABASE_URL": db_url,
                "STACKML_REDIS_URL": REDIS_URL,
                "STACKML_QUEUE": f"stackml-load-{os.getpid()}",
                "STACKML_PORT": str(port),
                "STACKML_RUNTIME_ROOT": str(RUNTIME_ROOT),
                "STACKML_MAX_SERVERS": str(CAP),
                "STACKML_RECONCILE_INTERVAL": "2",
            }
        )
        up = subprocess.Popen(
            [sys.executable, "-m", "service.cli", "up"],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        url = f"http://127.0.0.1:{port}"
        peak_servers = 0
        stop = threading.Event()
        api = psutil.Process(up.pid)
        worker_peaks: dict[int, float] = {}
        peak_total = 0.0  # the most the platform's processes held at one moment

        def watch() -> None:
            nonlocal peak_servers, peak_total
            sandboxes = data / "sandboxes"
            while not stop.wait(0.1):
                if sandboxes.is_dir():
                    n = sum(1 for p in sandboxes.iterdir() if not p.name.startswith("."))
                    peak_servers = max(peak_servers, n)
                total = 0.0
                for child in api.children(recursive=True):
                    try:
                        rss = child.memory_info().rss / 2**20
                    except psutil.NoSuchProcess:
                        continue  # a worker child that just exited
                    worker_peaks[child.pid] = max(worker_peaks.get(child.pid, 0.0), rss)
                    total += rss
                peak_total = max(peak_total, total)

        try:
            deadline = time.monotonic() + 90
            while True:
                assert up.poll() is None, "stackml up exited"
                try:
                    if requests.get(f"{url}/readyz", timeout=2).status_code == 200:
                        break
                except requests.ConnectionError:
                    pass
                assert time.monotonic() < deadline
                time.sleep(0.3)
            client = StackMLClient(url, timeout=60)
            pkg = tmp_path / "pkg"
            (pkg / "trainer").mkdir(parents=True)
            (pkg / "trainer" / "__init__.py").write_text("")
            (pkg / "trainer" / "quick.py").write_text(textwrap.dedent(QUICK))
            uri = client.stage_package(pkg)["package_uri"]
            watcher = threading.Thread(target=watch, daemon=True)
            watcher.start()

            def one(i: int) -> tuple[str, float]:
                c = StackMLClient(url, timeout=60)
                t = time.perf_counter()
                job = c.create_job(
                    {
                        "name": f"load-{i}",
                        "trainer": {"package_uri": uri, "module": "trainer.quick"},
                    }
                )
                return job["id"], time.perf_counter() - t

            t0 = time.monotonic()
            with ThreadPoolExecutor(16) as pool:
                submitted = list(pool.map(one, range(JOBS)))
            ids = [i for i, _ in submitted]
            lat = sorted(t for _, t in submitted)
            assert len(set(ids)) == JOBS
            deadline = time.monotonic() + 1200
            active = ["QUEUED", "ALLOCATING", "PROVISIONING", "RUNNING", "EXPORTING", "CANCELLING"]
            while client.list_jobs(state=active, limit=1)["jobs"]:
                assert time.monotonic() < deadline, "jobs never finished"
                time.sleep(1)
            elapsed = time.monotonic() - t0
            jobs = {j["id"]: j for j in client.iter_jobs()}
            assert set(jobs) == set(ids)  # none lost
            states = {j["state"] for j in jobs.values()}
            assert states == {"SUCCEEDED"}, [
                j["failure"] for j in jobs.values() if j["state"] != "SUCCEEDED"
            ][:5]
            twice = [
                i
                for i in ids
                if client.logs(i)[0].decode().count(f"run {i}") != 1
                or len([r for r in jobs[i]["resources"] if r["server_id"]]) != 1
            ]
            assert twice == []
            deadline = time.monotonic() + 60
            while any(r["state"] != "deleted" for j in client.iter_jobs() for r in j["resources"]):
                assert time.monotonic() < deadline, "servers not all deleted"
                time.sleep(1)
            stop.set()
            assert peak_servers <= CAP, f"{peak_servers} servers at once, cap {CAP}"
            FIGURES["load"] = {
                "jobs": JOBS,
                "cap": CAP,
                "seconds": round(elapsed, 1),
                "jobs_per_min": round(JOBS / elapsed * 60, 1),
                "submit_p50_ms": round(lat[len(lat) // 2] * 1000, 1),
                "submit_p99_ms": round(lat[int(len(lat) * 0.99) - 1] * 1000, 1),
                "api_peak_rss_mb": round(_peak_rss_mb(api), 1),
                "worker_peak_rss_mb_max_process": round(max(worker_peaks.values(), default=0), 1),
                # every process under `stackml up` at its busiest sample (sandboxes included)
                "children_peak_rss_mb_total": round(peak_total, 1),
                "peak_servers": peak_servers,
                "lost": 0,
                "run_twice": 0,
            }
        finally:
            stop.set()
            if up.poll() is None:
                up.send_signal(signal.SIGINT)
                try:
                    up.wait(60)
                except subprocess.TimeoutExpired:
                    os.killpg(up.pid, signal.SIGKILL)
        try:
            assert_no_leaks(Settings(data_dir=data))
        finally:
            reap_sandboxes(data / "sandboxes")
            shutil.rmtree(data, ignore_errors=True)
