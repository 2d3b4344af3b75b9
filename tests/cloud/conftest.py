"""Cloud-tier fixtures: a real Keystone and a real Swift on free loopback ports, started once
per session in a scratch state directory (and the Nova emulator on demand), stopped at the end
with a check that no process is left.

`devcloud` is a `devcloud.cloud.DevCloud`: `keystone_url`, `auth_url`, `swift_url`,
`admin_password`, `clouds_yaml`, `projects` (ids by name), `credentials(cloud)` and
`connection(cloud)` for the clouds `devcloud` (admin), `devcloud-demo`, `devcloud-alt`,
`devcloud-reader` and `devcloud-stackml` (the service user). `devcloud_emulator` is the same
devcloud with the Nova/Neutron/Glance emulator started (compute tests).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from devcloud.cloud import DevCloud

# shared between runs on one machine: Keystone's and Swift's virtualenvs are built once
VENV_ROOT = Path(os.environ.get("STACKML_DEVCLOUD_VENVS", "/var/cache/stackml/devcloud-venvs"))
RUNTIME_ROOT = Path(os.environ.get("STACKML_TEST_RUNTIME_ROOT", "/var/cache/stackml/runtimes"))
REPO_ROOT = Path(__file__).resolve().parents[2]


def leftover_processes(state_dir: Path) -> list[str]:
    """Processes whose command line names `state_dir` (what the devcloud started there)."""
    proc = subprocess.run(
        ["pgrep", "-af", str(state_dir)], capture_output=True, text=True, check=False
    )
    return [line for line in proc.stdout.splitlines() if "pgrep" not in line]


def wait_job(client: Any, job_id: str, pred: Any, timeout: float = 120) -> dict[str, Any]:
    """The job once `pred(job)` holds, read through the API; fails with its state at the
    deadline."""
    deadline = time.monotonic() + timeout
    job = client.get_job(job_id)
    while not pred(job):
        assert time.monotonic() < deadline, f"{job_id}: {job['state']} {job['failure']}"
        time.sleep(0.2)
        job = client.get_job(job_id)
    return dict(job)


def scratch_dir(name: str) -> Path:
    # not under pytest's 0700 tmp: the emulator's sandbox users must traverse it
    path = Path(f"/var/tmp/stackml-{name}-{os.getpid()}")
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True, mode=0o755)
    return path


@pytest.fixture(scope="package")
def devcloud() -> Iterator[DevCloud]:
    state = scratch_dir("cloud")
    cloud = DevCloud(state, venv_root=VENV_ROOT, runtime_root=RUNTIME_ROOT)
    try:
        cloud.up(keystone_port=0, swift_port=0, emulator_port=0, emulator=False, echo=print)
        yield cloud
    finally:
        cloud.down(echo=print)
        left = leftover_processes(state)
        shutil.rmtree(state, ignore_errors=True)
        assert not left, f"devcloud down left processes behind: {left}"


@pytest.fixture(scope="package")
def devcloud_emulator(devcloud: DevCloud) -> DevCloud:
    """The session's devcloud with the Nova emulator running (its port is in the catalog)."""
    devcloud.start_emulator(echo=print)
    return devcloud
