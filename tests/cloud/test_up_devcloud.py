"""`stackml up --devcloud`: the platform against the devcloud in one command (no `eval` of
`devcloud env`, no exports): its API reads Nova's flavors through the emulator and writes to
Swift through Keystone; Ctrl-C stops it cleanly. Without a running devcloud it refuses in a
sentence."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from devcloud.cloud import DevCloud
from tests.envutil import free_port

REPO_ROOT = Path(__file__).resolve().parents[2]
STACKML = [sys.executable, "-m", "service.cli"]


def _get(url: str) -> tuple[int, Any]:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def _env(tmp_path: Path) -> dict[str, str]:
    clean = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("OS_", "STACKML_")) or k == "STACKML_TEST_PG"
    }
    return {
        **clean,
        "PYTHONPATH": str(REPO_ROOT),
        "STACKML_DATA_DIR": str(tmp_path / "data"),
        "STACKML_REDIS_URL": "redis://127.0.0.1:6379/11",
        "STACKML_RUNTIME_ROOT": os.environ.get(
            "STACKML_TEST_RUNTIME_ROOT", "/var/cache/stackml/runtimes"
        ),
    }


def test_up_devcloud_runs_the_platform_on_nova_and_swift(
    devcloud_emulator: DevCloud, tmp_path: Path
) -> None:
    port = free_port()
    out = open(tmp_path / "up.log", "w+b")
    proc = subprocess.Popen(
        [
            *STACKML,
            "up",
            "--devcloud",
            "--devcloud-state-dir",
            str(devcloud_emulator.state_dir),
            "--port",
            str(port),
            "--workers",
            "1",
        ],  # fmt: skip
        env=_env(tmp_path),
        cwd=REPO_ROOT,
        stdout=out,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, (tmp_path / "up.log").read_text()
            try:
                status, ready = _get(f"{base}/readyz")
            except OSError:
                status, ready = 0, None
            # "Press Ctrl-C" comes last: after the worker is ready and the catalog is written
            if status == 200 and "Press Ctrl-C to stop." in (tmp_path / "up.log").read_text():
                break
            assert time.monotonic() < deadline, (status, ready, (tmp_path / "up.log").read_text())
            time.sleep(0.5)
        # the store check of /readyz wrote to and deleted from Swift through Keystone
        assert ready["checks"] == {"database": "ok", "broker": "ok", "store": "ok"}
        status, flavors = _get(f"{base}/v1/flavors")
        assert status == 200
        names = {f["name"] for f in flavors["flavors"]}
        assert "m1.small" in names  # Nova's (the emulator's) flavors, not the sandbox's
        assert not any(n.startswith("local.") for n in names)
        # `openstack ml` and Horizon find this API in the devcloud's catalog
        assert f"catalog:  machine-learning -> {base}" in (tmp_path / "up.log").read_text()
        assert DevCloud(devcloud_emulator.state_dir).stackml_url == base
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(90)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        out.close()
    log = (tmp_path / "up.log").read_text()
    assert "compute=openstack store=swift" in log, log
    assert "stackml stopped." in log, log


def test_up_devcloud_without_a_devcloud_says_so(tmp_path: Path) -> None:
    proc = subprocess.run(
        [*STACKML, "up", "--devcloud", "--devcloud-state-dir", str(tmp_path / "none")],
        env=_env(tmp_path),
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "stackml devcloud up" in proc.stderr, proc.stderr
    assert not (tmp_path / "data").exists()  # nothing started, nothing written
