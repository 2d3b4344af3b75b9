"""`openstack ml ...`: the REAL `openstack` executable (python-openstackclient, the plugin loaded
through its entry points) run as a subprocess with the devcloud's clouds.yaml, against the real
Keystone (tokens, the catalog's machine-learning endpoint), a running stackml (auth=keystone,
the openstack backend on the Nova emulator, Swift) — as a user of the cloud would run it.

One job of a quick trainer (it prints, then ticks until cancelled): created from its directory
(staged like `stackml jobs submit`), listed (`-f json`), shown, its log read, cancelled and
deleted; models and quotas listed; another project sees none of it (404 as CommandError)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from devcloud.cloud import ML_SERVICE_TYPE, DevCloud
from service.client import APIError, StackMLClient, keystone_tokens
from service.config import Settings
from service.platform import LocalPlatform
from tests.cloud.conftest import RUNTIME_ROOT, scratch_dir, wait_job
from tests.cloud.emulator_fixtures import ensure_runtime
from tests.envutil import environ, free_port
from tests.pgutil import temp_database

REDIS_URL = "redis://127.0.0.1:6379/12"
OPENSTACK = Path(sys.executable).with_name("openstack")
CLI_TIMEOUT = 60
QUICK_TRAINER = """
    import time
    print("quick trainer started", flush=True)
    for i in range(1200):  # until cancelled (2 minutes at most)
        print("tick", i, flush=True)
        time.sleep(0.1)
"""


@pytest.fixture(scope="module")
def stackml(devcloud_emulator: DevCloud) -> Iterator[tuple[LocalPlatform, DevCloud]]:
    """stackml with Keystone auth on the devcloud, registered in its catalog."""
    ensure_runtime()
    cloud = devcloud_emulator
    data = scratch_dir("osc")
    authtoken = {
        "auth_url": cloud.auth_url,
        "username": "stackml",
        "password": cloud.password("stackml"),
        "project_name": "service",
        "region_name": "RegionOne",
    }
    with temp_database("osc") as db_url:
        env = {
            "STACKML_DATA_DIR": str(data),
            "STACKML_DATABASE_URL": db_url,
            "STACKML_REDIS_URL": REDIS_URL,
            "STACKML_QUEUE": f"stackml-osc-{os.getpid()}",
            "STACKML_PORT": str(free_port()),
            "STACKML_RUNTIME_ROOT": str(RUNTIME_ROOT),
            "STACKML_AUTH": "keystone",
            "STACKML_KEYSTONE_AUTHTOKEN": json.dumps(authtoken),
            "STACKML_TENANCY": "project",
            "STACKML_COMPUTE": "openstack",
            "STACKML_STORE": "swift",
            "OS_CLIENT_CONFIG_FILE": str(cloud.clouds_yaml),
            "STACKML_OPENSTACK_CLOUD": "devcloud-stackml",
            "STACKML_DEFAULT_FLAVOR": "m1.small",
            "STACKML_BOOT_DEADLINE": "20",
            "STACKML_RECONCILE_INTERVAL": "2",
        }
        try:
            with environ(env), LocalPlatform(Settings(), concurrency=2, quiet=True) as p:
                cloud.register_stackml(p.url)
                yield p, cloud
        finally:
            shutil.rmtree(data, ignore_errors=True)


def openstack(cloud: DevCloud, user: str, *args: str) -> subprocess.CompletedProcess[str]:
    """`openstack --os-cloud <user> ARGS` in a clean environment: only the clouds.yaml."""
    assert OPENSTACK.exists(), (
        f"{OPENSTACK} is missing: `make venv` installs python-openstackclient"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OS_", "STACKML_"))}
    env["OS_CLIENT_CONFIG_FILE"] = str(cloud.clouds_yaml)
    return subprocess.run(
        [str(OPENSTACK), "--os-cloud", user, *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=CLI_TIMEOUT,
        check=False,
    )


def ok(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode == 0, f"{proc.args}: rc {proc.returncode}\n{proc.stderr}"
    return proc.stdout


def as_json(proc: subprocess.CompletedProcess[str]) -> Any:
    return json.loads(ok(proc))


def test_openstack_ml_runs_a_job_for_its_project_only(
    stackml: tuple[LocalPlatform, DevCloud], tmp_path: Path
) -> None:
    platform, cloud = stackml
    demo_project = cloud.projects["demo"]
    # the catalog entry the plugin follows (no --os-ml-endpoint anywhere below)
    [entry] = [
        e
        for e in as_json(openstack(cloud, "devcloud-demo", "catalog", "list", "-f", "json"))
        if e["Type"] == ML_SERVICE_TYPE
    ]
    assert platform.url in json.dumps(entry["Endpoints"])

    pkg = tmp_path / "quick"
    (pkg / "trainer").mkdir(parents=True)
    (pkg / "trainer" / "__init__.py").write_text("")
    (pkg / "trainer" / "quick.py").write_text(textwrap.dedent(QUICK_TRAINER))
    job = as_json(
        openstack(
            cloud,
            "devcloud-demo",
            "ml",
            "job",
            "create",
            "--package-path",
            str(pkg),
            "--module",
            "trainer.quick",
            "--name",
            "osc-quick",
            "--label",
            "via=openstack",
            "-f",
            "json",
        )
    )
    job_id = job["id"]
    assert job["name"] == "osc-quick" and job["project_id"] == demo_project
    assert job["package_uri"].startswith("swift://") and job["labels"] == {"via": "openstack"}

    listed = as_json(openstack(cloud, "devcloud-demo", "ml", "job", "list", "-f", "json"))
    assert [j["ID"] for j in listed] == [job_id]
    assert set(listed[0]) == {"ID", "Name", "State", "Created At", "Finished At"}

    # another project sees nothing of it: not listed, and a 404 said in one sentence
    assert as_json(openstack(cloud, "devcloud-alt", "ml", "job", "list", "-f", "json")) == []
    theirs = openstack(cloud, "devcloud-alt", "ml", "job", "show", job_id)
    assert theirs.returncode == 1
    assert f"job {job_id} not found [not_found, HTTP 404" in theirs.stderr
    assert "Traceback" not in theirs.stderr

    demo = StackMLClient(platform.url, auth=keystone_tokens("devcloud-demo"))  # the fixture's env
    try:
        wait_job(demo, job_id, lambda j: j["state"] == "RUNNING", timeout=90)
        deadline = time.monotonic() + 60
        while b"quick trainer started" not in demo.logs(job_id)[0]:
            assert time.monotonic() < deadline, "the trainer's first line never reached the log"
            time.sleep(0.5)
        logs = ok(openstack(cloud, "devcloud-demo", "ml", "job", "logs", job_id))
        assert "quick trainer started\ntick 0\n" in logs
        shown = as_json(
            openstack(cloud, "devcloud-demo", "ml", "job", "show", job_id, "-f", "json")
        )
        assert shown["state"] == "RUNNING" and shown["module"] == "trainer.quick"
        assert len(shown["servers"]) == 1 and "m1.small" in shown["servers"][0]

        assert ok(openstack(cloud, "devcloud-demo", "ml", "job", "cancel", job_id)) == ""
        wait_job(
            demo,
            job_id,
            lambda j: (
                j["state"] == "CANCELLED" and all(r["state"] == "deleted" for r in j["resources"])
            ),
            timeout=90,
        )
        # the job's trust goes a moment after its server: delete answers 409 until then
        deadline = time.monotonic() + 30
        while True:
            gone = openstack(cloud, "devcloud-demo", "ml", "job", "delete", job_id)
            if gone.returncode == 0:
                break
            assert "teardown_pending" in gone.stderr, gone.stderr
            assert time.monotonic() < deadline, gone.stderr
            time.sleep(1)
        with pytest.raises(APIError) as e:
            demo.get_job(job_id)
        assert e.value.status == 404
    finally:
        demo.close()

    assert as_json(openstack(cloud, "devcloud-demo", "ml", "model", "list", "-f", "json")) == []
    quota = as_json(openstack(cloud, "devcloud-demo", "ml", "quota", "show", "-f", "json"))
    assert quota["project_id"] == demo_project and quota["jobs_in_use"] == 0
    assert {"jobs", "servers", "gpus", "defaults", "overrides"} <= set(quota)
