"""End-to-end fixtures: the real platform (API over HTTP, Celery worker, sandboxes over OpenSSH,
local store, PostgreSQL, Redis) started once per session, and a leak check at the end."""

from __future__ import annotations

import os
import shutil
import subprocess
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from service.client import StackMLClient
from service.config import Settings
from service.platform import LocalPlatform
from service.runtime import ensure_runtime
from tests.envutil import environ, free_port, reap_dead_runs, reap_sandboxes, wait_sandboxes_gone
from tests.pgutil import temp_database

# shared between runs on one machine: building the TensorFlow runtime downloads ~270 MB once
RUNTIME_ROOT = Path(os.environ.get("STACKML_TEST_RUNTIME_ROOT", "/var/cache/stackml/runtimes"))
REDIS_URL = os.environ.get("STACKML_TEST_REDIS", "redis://127.0.0.1:6379/7")
TERMINAL = {"SUCCEEDED", "FAILED", "CANCELLED"}


@pytest.fixture(scope="package")
def e2e_settings() -> Iterator[Settings]:
    if shutil.which("sshd") is None and not Path("/usr/sbin/sshd").exists():
        pytest.fail(
            "openssh-server is not installed: the e2e tier needs real sshd "
            "(apt-get install openssh-server, or `make deps`)"
        )
    reap_dead_runs("e2e")  # what an interrupted earlier run left running
    data_dir = Path(f"/var/tmp/stackml-e2e-{os.getpid()}")
    shutil.rmtree(data_dir, ignore_errors=True)
    data_dir.mkdir(parents=True, mode=0o755)
    with temp_database("e2e") as db_url:
        env = {
            "STACKML_DATA_DIR": str(data_dir),
            "STACKML_DATABASE_URL": db_url,
            "STACKML_REDIS_URL": REDIS_URL,
            "STACKML_QUEUE": f"stackml-e2e-{os.getpid()}",
            "STACKML_PORT": str(free_port()),
            "STACKML_RUNTIME_ROOT": str(RUNTIME_ROOT),
            "STACKML_HEARTBEAT_TIMEOUT": "6",
            "STACKML_STUCK_AFTER": "15",
            "STACKML_RECONCILE_INTERVAL": "2",
            "STACKML_CHECKPOINT_SYNC_SECONDS": "1",
        }
        try:
            with environ(env):
                yield Settings()
        finally:
            shutil.rmtree(data_dir, ignore_errors=True)


@pytest.fixture(scope="package")
def runtime_python(e2e_settings: Settings) -> Path:
    return ensure_runtime(e2e_settings, e2e_settings.default_runtime, echo=print)


@pytest.fixture(scope="package")
def platform(e2e_settings: Settings, runtime_python: Path) -> Iterator[LocalPlatform]:

    p = LocalPlatform(e2e_settings, concurrency=4, quiet=True)
    p.start()
    try:
        # test_redaction scans this Redis for secrets: it must be the one the platform uses
        assert_configured_redis(p, REDIS_URL, e2e_settings.queue)
        yield p
    finally:
        try:
            wait_sandboxes_gone(e2e_settings.sandbox_dir, 60)
        finally:
            p.stop()
            try:
                _assert_no_leaks(e2e_settings)
            finally:
                reap_sandboxes(e2e_settings.sandbox_dir)


def assert_configured_redis(platform: LocalPlatform, url: str, queue: str) -> None:
    """Fail loudly unless the platform really uses the Redis at `url`: no embedded Redis
    (LocalPlatform starts one when nothing answers at the configured URL), and the worker's
    queue binding, written by the platform's own Celery worker, is visible at `url`. A tier that
    restarts Redis or scans it for secrets proves nothing against a fallback nobody looks at."""
    assert not platform.redis_embedded, (
        f"nothing answered at {url}: the platform fell back to an embedded Redis "
        f"({platform.redis_url}); start redis-server on {url} and run again"
    )
    assert platform.redis_url == url, (platform.redis_url, url)
    client = redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=5)
    try:
        deadline = time.monotonic() + 30
        while True:
            bound = [
                key
                for key in client.scan_iter(match="_kombu.binding.*", count=1000)
                if any(queue.encode() in member for member in client.smembers(key))
            ]
            if bound:
                return
            assert time.monotonic() < deadline, (
                f"no queue binding for {queue} at {url}: the platform's worker does not use it"
            )
            time.sleep(0.2)
    finally:
        client.close()


def _assert_no_leaks(settings: Settings) -> None:
    from service.backends.compute.sandbox import leak_report

    leaks = leak_report(settings.sandbox_dir)
    sshd = subprocess.run(
        ["pgrep", "-af", str(settings.sandbox_dir)], capture_output=True, text=True
    ).stdout.strip()
    assert not leaks, f"sandboxes leaked: {leaks}"
    assert not sshd, f"processes leaked: {sshd}"


@pytest.fixture(scope="package")
def client(platform: LocalPlatform) -> StackMLClient:
    return StackMLClient(platform.url, timeout=30)


def make_package(root: Path, modules: dict[str, str]) -> Path:
    """A trainer package directory `root/trainer/` with the given modules."""
    pkg = root / "trainer"
    pkg.mkdir(parents=True, exist_ok=True)
    (pkg / "__init__.py").write_text("")
    for name, src in modules.items():
        (pkg / f"{name}.py").write_text(textwrap.dedent(src))
    return root


TRIVIAL = {
    "ok": """
        import json, os, sys
        print("hello from", os.environ["STACKML_JOB_ID"], "args", sys.argv[1:], flush=True)
        print(json.dumps({"stackml_metric": 1, "epoch": 1, "loss": 0.5}), flush=True)
        model = os.environ["STACKML_MODEL_DIR"]
        with open(os.path.join(model, "weights.txt"), "w") as fh:
            fh.write("42\\n")
        os.makedirs(os.path.join(model, "assets"), exist_ok=True)
        with open(os.path.join(model, "assets", "vocab.txt"), "w") as fh:
            fh.write("a\\nb\\n")
    """,
    "fail": """
        import sys
        for i in range(30):
            print(f"line {i}", flush=True)
        print("something went badly wrong", file=sys.stderr, flush=True)
        sys.exit(3)
    """,
    "sleep": """
        import sys, time
        print("sleeping", flush=True)
        for i in range(int(sys.argv[1]) * 10):
            time.sleep(0.1)
            if i % 10 == 0:
                print(f"tick {i // 10}", flush=True)
    """,
    "nomodel": """
        print("trained nothing", flush=True)
    """,
}


@pytest.fixture(scope="package")
def trivial_package(client: StackMLClient, tmp_path_factory: pytest.TempPathFactory) -> str:
    root = make_package(tmp_path_factory.mktemp("trivial"), TRIVIAL)
    return str(client.stage_package(root)["package_uri"])


def job_spec(package_uri: str, module: str, **extra: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "name": f"e2e-{module.rsplit('.', 1)[-1]}",
        "trainer": {"package_uri": package_uri, "module": module},
    }
    spec.update(extra)
    return spec


def wait_state(
    client: StackMLClient, job_id: str, states: set[str], timeout: float = 120
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    job = client.get_job(job_id)
    while job["state"] not in states:
        assert time.monotonic() < deadline, f"job {job_id} still {job['state']} after {timeout}s"
        time.sleep(0.1)
        job = client.get_job(job_id)
    return job


def wait_resources_deleted(client: StackMLClient, job_id: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while True:
        job = client.get_job(job_id)
        if job["resources"] and all(r["state"] == "deleted" for r in job["resources"]):
            return
        assert time.monotonic() < deadline, f"resources of {job_id} not deleted: {job['resources']}"
        time.sleep(0.2)
