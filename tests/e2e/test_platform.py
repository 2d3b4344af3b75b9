"""The local platform as a user runs it: `stackml demo`, `stackml up` + Ctrl-C, embedded Redis."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from service.config import Settings
from service.platform import LocalPlatform
from tests.e2e.conftest import RUNTIME_ROOT
from tests.envutil import environ, free_port

STACKML = [sys.executable, "-m", "service.cli"]


@pytest.fixture
def data_dir() -> Iterator[Path]:
    d = Path(f"/var/tmp/stackml-e2e-platform-{os.getpid()}")
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(mode=0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def _env(data_dir: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("STACKML_")}
    env.update(
        {
            "STACKML_DATA_DIR": str(data_dir),
            "STACKML_PORT": str(free_port()),
            "STACKML_RUNTIME_ROOT": str(RUNTIME_ROOT),
            "STACKML_REDIS_URL": "redis://127.0.0.1:6379/9",
            "STACKML_QUEUE": f"stackml-platform-{os.getpid()}",
        },
        **extra,
    )
    return env


def _leftovers(data_dir: Path) -> str:
    out = subprocess.run(["pgrep", "-af", str(data_dir)], capture_output=True, text=True)
    return out.stdout.strip()


def test_demo_trains_exports_predicts_and_leaves_nothing_running(
    data_dir: Path, runtime_python: Path
) -> None:
    proc = subprocess.run(
        [*STACKML, "demo"], env=_env(data_dir), capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "SUCCEEDED" in proc.stdout
    assert "model: local://projects/local/models/job-" in proc.stdout
    assert '{"predictions": [[' in proc.stdout
    models = list((data_dir / "store" / "projects" / "local" / "models").iterdir())
    assert len(models) == 1 and (models[0] / "saved_model.pb").exists()
    assert not any((data_dir / "sandboxes").iterdir())
    assert _leftovers(data_dir) == ""


def test_up_serves_until_ctrl_c_and_stops_with_no_orphans(data_dir: Path) -> None:
    env = _env(data_dir)
    proc = subprocess.Popen(
        [*STACKML, "up"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{env['STACKML_PORT']}"
    try:
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
            try:
                if requests.get(f"{url}/readyz", timeout=2).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            assert time.monotonic() < deadline, "stackml up never became ready"
            time.sleep(0.3)
        assert _leftovers(data_dir) != ""  # the worker runs with the data dir in its env...
        proc.send_signal(signal.SIGINT)
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    time.sleep(0.5)
    ps = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True).stdout
    assert "workers.celery_app" not in "\n".join(
        line for line in ps.splitlines() if str(data_dir) in line
    )
    with pytest.raises(requests.ConnectionError):
        requests.get(f"{url}/healthz", timeout=2)


def test_embedded_redis_when_none_answers(data_dir: Path) -> None:
    env = {
        "STACKML_DATA_DIR": str(data_dir),
        "STACKML_PORT": str(free_port()),
        "STACKML_REDIS_URL": "redis://127.0.0.1:1/0",
    }
    with environ(env), LocalPlatform(Settings(), concurrency=1, beat=False, quiet=True) as p:
        assert p.redis_embedded
        assert p.redis_url.startswith("redis+socket://")
        ready = requests.get(f"{p.url}/readyz", timeout=10)
        assert ready.status_code == 200, ready.text
    assert _leftovers(data_dir) == ""
