"""The fault-injection suite's platform: real API, worker, Redis, PostgreSQL and sandboxes, with
short deadlines so that faults resolve in seconds, and a figure sheet printed at the end.

The tier's broker is a redis-server of its own (`CHAOS_REDIS`, on a port of its own, started
for the session): the tests shut it down and restart it mid-job, and nothing else on the
machine loses its broker, so `make test` runs another tier beside this one (the unit tier,
which uses no PostgreSQL either: test_faults restarts the machine's PostgreSQL)."""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from service.client import StackMLClient
from service.config import Settings
from service.platform import LocalPlatform
from service.runtime import ensure_runtime
from tests.e2e.conftest import assert_configured_redis
from tests.envutil import environ, free_port, reap_dead_runs, reap_sandboxes, wait_sandboxes_gone
from tests.pgutil import temp_database

RUNTIME_ROOT = Path(os.environ.get("STACKML_TEST_RUNTIME_ROOT", "/var/cache/stackml/runtimes"))
REDIS_START_DEADLINE = 20.0


class ChaosRedis:
    """A real redis-server on `port`, a child of the test process (no persistence): what the
    chaos tests shut down and restart. Fails loudly when redis-server is not installed."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.dir = Path(f"/var/tmp/stackml-chaos-redis-{os.getpid()}")
        self.proc: subprocess.Popen[bytes] | None = None

    def url(self, db: int) -> str:
        return f"redis://127.0.0.1:{self.port}/{db}"

    def ping(self) -> bool:
        return (
            subprocess.run(
                ["redis-cli", "-h", "127.0.0.1", "-p", str(self.port), "ping"],
                capture_output=True,
                timeout=5,
            ).returncode
            == 0
        )

    def start(self) -> None:
        server = shutil.which("redis-server")
        assert server, (
            "the chaos tier needs redis-server (Debian's redis-server; .ci/run installs it)"
        )
        self.dir.mkdir(parents=True, exist_ok=True)
        argv = [server, "--port", str(self.port), "--bind", "127.0.0.1", "--save", ""]
        argv += ["--appendonly", "no", "--dir", str(self.dir), "--logfile", "redis.log"]
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + REDIS_START_DEADLINE
        while not self.ping():
            assert self.proc.poll() is None, f"redis-server exited: see {self.dir}/redis.log"
            assert time.monotonic() < deadline, f"redis-server on port {self.port} never answered"
            time.sleep(0.1)

    def shutdown(self) -> None:
        """What a crash or a restart of the broker is to its clients: gone, nothing kept."""
        subprocess.run(
            ["redis-cli", "-h", "127.0.0.1", "-p", str(self.port), "shutdown", "nosave"],
            capture_output=True,
            timeout=30,
        )
        if self.proc is not None:
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
            self.proc = None

    def restart(self) -> None:
        self.shutdown()
        time.sleep(1.0)
        self.start()


CHAOS_REDIS = ChaosRedis(int(os.environ.get("STACKML_TEST_CHAOS_REDIS_PORT") or free_port()))
REDIS_URL = CHAOS_REDIS.url(10)
TERMINAL = {"SUCCEEDED", "FAILED", "CANCELLED"}
FIGURES: dict[str, Any] = {"faults": [], "load": {}}

STEADY = """
    import json, os, sys, time
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 20
    for i in range(n):
        print(f"line {i} of {os.environ['STACKML_JOB_ID']}", flush=True)
        time.sleep(0.1)
    print(json.dumps({"stackml_metric": 1, "step": n, "loss": 0.1}), flush=True)
    with open(os.path.join(os.environ["STACKML_MODEL_DIR"], "model.bin"), "wb") as fh:
        fh.write(os.urandom(4096))
"""
# first run: marks its checkpoint directory and trains "forever" (the test kills its sandbox);
# a run that finds the mark (restored from the store on a new server) finishes at once
RESUMABLE = """
    import os, time
    mark = os.path.join(os.environ["STACKML_CHECKPOINT_DIR"], "first-run")
    if not os.path.exists(mark):
        open(mark, "w").write(os.environ["STACKML_JOB_ID"])
        print("first run", flush=True)
        time.sleep(600)
    print("resumed", open(mark).read(), flush=True)
    open(os.path.join(os.environ["STACKML_MODEL_DIR"], "model.bin"), "wb").write(b"m")
"""
QUICK = """
    import os
    print("run", os.environ["STACKML_JOB_ID"], flush=True)
    open(os.path.join(os.environ["STACKML_MODEL_DIR"], "m"), "w").write("1")
"""


@pytest.fixture(scope="session", autouse=True)
def chaos_redis() -> Iterator[ChaosRedis]:
    CHAOS_REDIS.start()
    try:
        yield CHAOS_REDIS
    finally:
        CHAOS_REDIS.shutdown()
        shutil.rmtree(CHAOS_REDIS.dir, ignore_errors=True)


@pytest.fixture(scope="package")
def chaos_settings(chaos_redis: ChaosRedis) -> Iterator[Settings]:
    reap_dead_runs("chaos")  # what an interrupted earlier run left running
    data = Path(f"/var/tmp/stackml-chaos-{os.getpid()}")
    shutil.rmtree(data, ignore_errors=True)
    data.mkdir(parents=True, mode=0o755)
    with temp_database("chaos") as db_url:
        env = {
            "STACKML_DATA_DIR": str(data),
            "STACKML_DATABASE_URL": db_url,
            "STACKML_REDIS_URL": REDIS_URL,
            "STACKML_QUEUE": f"stackml-chaos-{os.getpid()}",
            "STACKML_PORT": str(free_port()),
            "STACKML_RUNTIME_ROOT": str(RUNTIME_ROOT),
            "STACKML_HEARTBEAT_TIMEOUT": "5",
            "STACKML_STUCK_AFTER": "3",
            "STACKML_RECONCILE_INTERVAL": "1",
            "STACKML_ORPHAN_GRACE": "2",
            "STACKML_COMMAND_TIMEOUT": "5",
            "STACKML_SSH_DEADLINE": "10",
            "STACKML_CHECKPOINT_SYNC_SECONDS": "1",
        }
        try:
            with environ(env):
                yield Settings()
        finally:
            if not os.environ.get("STACKML_KEEP_TEST_DATA"):
                shutil.rmtree(data, ignore_errors=True)


@pytest.fixture(scope="package")
def chaos_platform(chaos_settings: Settings) -> Iterator[LocalPlatform]:

    ensure_runtime(chaos_settings, chaos_settings.default_runtime, echo=print)
    p = LocalPlatform(chaos_settings, concurrency=4, quiet=True)
    p.start()
    try:
        # test_faults restarts the tier's Redis: the platform must be using it
        assert_configured_redis(p, REDIS_URL, chaos_settings.queue)
        yield p
    finally:
        try:
            wait_sandboxes_gone(chaos_settings.sandbox_dir, 60)
        finally:
            p.stop()
            try:
                assert_no_leaks(chaos_settings)
            finally:
                reap_sandboxes(chaos_settings.sandbox_dir)


@pytest.fixture(scope="package")
def client(chaos_platform: LocalPlatform) -> StackMLClient:
    return StackMLClient(chaos_platform.url, timeout=30)


@pytest.fixture(scope="package")
def package(client: StackMLClient, tmp_path_factory: pytest.TempPathFactory) -> str:
    root = tmp_path_factory.mktemp("chaos-pkg")
    (root / "trainer").mkdir()
    (root / "trainer" / "__init__.py").write_text("")
    (root / "trainer" / "steady.py").write_text(textwrap.dedent(STEADY))
    (root / "trainer" / "quick.py").write_text(textwrap.dedent(QUICK))
    (root / "trainer" / "resumable.py").write_text(textwrap.dedent(RESUMABLE))
    return str(client.stage_package(root)["package_uri"])


def submit(
    client: StackMLClient, package: str, module: str, *args: str, **extra: Any
) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "name": f"chaos-{module}",
        "trainer": {"package_uri": package, "module": f"trainer.{module}", "args": list(args)},
    }
    spec.update(extra)
    return client.create_job(spec)


def wait_until(
    client: StackMLClient, job_id: str, pred: Any, timeout: float = 90, what: str = ""
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        try:
            job = client.get_job(job_id)
            if pred(job):
                return job
        except Exception as e:  # noqa: BLE001 - the API may be briefly down during a fault
            job = {"state": f"unreachable: {e}"}
        assert time.monotonic() < deadline, (
            f"{job_id}: {what} not reached in {timeout}s: {job.get('state')} {job.get('failure')}"
        )
        time.sleep(0.1)


def wait_state(
    client: StackMLClient, job_id: str, states: set[str], timeout: float = 90
) -> dict[str, Any]:
    return wait_until(client, job_id, lambda j: j["state"] in states, timeout, str(states))


def wait_clean(client: StackMLClient, job_id: str, timeout: float = 60) -> dict[str, Any]:
    """Terminal, and every server confirmed deleted."""
    return wait_until(
        client,
        job_id,
        lambda j: j["state"] in TERMINAL and all(r["state"] == "deleted" for r in j["resources"]),
        timeout,
        "terminal with every server deleted",
    )


def steady_lines(client: StackMLClient, job_id: str) -> list[str]:
    data, _ = client.logs(job_id)
    return [ln for ln in data.decode().splitlines() if ln.startswith("line ")]


def assert_complete_log(client: StackMLClient, job_id: str, n: int) -> None:
    """Every line the trainer wrote is there, once and in order (nothing lost, not run twice)."""
    assert steady_lines(client, job_id) == [f"line {i} of {job_id}" for i in range(n)]


def record_fault(name: str, job: dict[str, Any], seconds: float) -> None:
    FIGURES["faults"].append(
        {
            "fault": name,
            "state": job["state"],
            "reason": (job.get("failure") or {}).get("reason"),
            "fault_to_final_s": round(seconds, 2),
        }
    )


def assert_no_leaks(settings: Settings) -> None:
    from service.backends.compute.sandbox import leak_report

    assert not leak_report(settings.sandbox_dir), leak_report(settings.sandbox_dir)
    left = subprocess.run(
        ["pgrep", "-af", str(settings.sandbox_dir)], capture_output=True, text=True
    ).stdout.strip()
    assert not left, left


def pytest_terminal_summary(terminalreporter: Any) -> None:
    faults = FIGURES["faults"]
    if not faults and not FIGURES["load"]:
        return
    tr = terminalreporter
    tr.section("chaos figures")
    for f in faults:
        tr.write_line(
            f"  {f['fault']:<40} -> {f['state']:<10} {f['reason'] or '':<22} "
            f"{f['fault_to_final_s']:>6.2f}s"
        )
    if faults:
        times = [f["fault_to_final_s"] for f in faults]
        tr.write_line(
            f"  faults injected: {len(faults)}, fault->final p50 "
            f"{statistics.median(times):.2f}s, max {max(times):.2f}s"
        )
    if FIGURES["load"]:
        tr.write_line(f"  load: {json.dumps(FIGURES['load'])}")
