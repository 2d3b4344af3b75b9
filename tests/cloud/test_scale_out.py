"""Scale-out as docs/operations.md lays it out: two API processes behind one port (gunicorn) and
two Celery worker processes with a host's worth of settings each (their own data dir), one beat,
one PostgreSQL and one Redis, against the devcloud (Nova emulator + Swift, real Keystone). A
batch of jobs submitted at once is shared by both API processes and both workers, every job
succeeds exactly once (its trainer ran once, on one server), and nothing leaks."""

from __future__ import annotations

import json
import os
import re
import shutil
import textwrap
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from devcloud.cloud import DevCloud
from service.client import StackMLClient
from service.db.migrate import upgrade
from tests.cloud.conftest import RUNTIME_ROOT, scratch_dir
from tests.envutil import free_port
from tests.pgutil import temp_database
from tests.topology import Topology, api_argv, beat_argv, worker_argv

REDIS_URL = "redis://127.0.0.1:6379/12"
JOBS = 12
TRAINER = """
import os
print("run", os.environ["STACKML_JOB_ID"], flush=True)
open(os.path.join(os.environ["STACKML_MODEL_DIR"], "m.txt"), "w").write("1\\n")
"""
STEP_DONE = re.compile(r"Task (stackml\.[a-z_.]+)\[[0-9a-f-]+\] succeeded")


@pytest.fixture
def scaled_out(devcloud_emulator: DevCloud) -> Iterator[tuple[str, Path, DevCloud]]:
    root = scratch_dir("scale-out")
    logs = root / "logs"
    logs.mkdir(parents=True)
    port = free_port()
    try:
        with temp_database("scaleout") as db_url:
            upgrade(db_url)  # the schema first, as in production (`stackml db upgrade`)
            base = {k: v for k, v in os.environ.items() if not k.startswith("STACKML_")}
            base.update(
                {
                    "STACKML_DATABASE_URL": db_url,
                    "STACKML_REDIS_URL": REDIS_URL,
                    "STACKML_QUEUE": f"stackml-scale-out-{os.getpid()}",
                    "STACKML_PORT": str(port),
                    "STACKML_RUNTIME_ROOT": str(RUNTIME_ROOT),
                    "STACKML_COMPUTE": "openstack",
                    "STACKML_STORE": "swift",
                    "OS_CLIENT_CONFIG_FILE": str(devcloud_emulator.clouds_yaml),
                    "STACKML_OPENSTACK_CLOUD": "devcloud-stackml",
                    "STACKML_DEFAULT_FLAVOR": "m1.small",
                    "STACKML_RECONCILE_INTERVAL": "2",
                    # hosts share the key that signs grants and encrypts SSH keys at rest
                    "STACKML_SECRET_KEY": "scale-out-test-signing-key",
                    "STACKML_QUOTA_DEFAULTS": json.dumps({"jobs": JOBS, "servers": 6, "gpus": 0}),
                }
            )

            def host(name: str) -> dict[str, str]:
                data = root / name
                data.mkdir(mode=0o700)
                return {**base, "STACKML_DATA_DIR": str(data)}

            with Topology(logs) as procs:
                api = procs.start(
                    "api",
                    api_argv(
                        "service.wsgi:app", f"127.0.0.1:{port}", 2,
                        "--access-logfile", str(logs / "access.log"),
                        "--access-logformat", '%(p)s "%(r)s" %(s)s',
                    ),
                    host("api"),
                )  # fmt: skip
                for name in ("worker-a", "worker-b"):
                    procs.start(name, worker_argv(f"{name}-{os.getpid()}"), host(name))
                beat_env = host("beat")
                procs.start(
                    "beat",
                    beat_argv(Path(beat_env["STACKML_DATA_DIR"]) / "beat-schedule"),
                    beat_env,
                )
                url = f"http://127.0.0.1:{port}"
                procs.wait_api(api, url)
                yield url, logs, devcloud_emulator
    finally:
        shutil.rmtree(root, ignore_errors=True)


def test_two_api_and_two_worker_processes_share_a_burst_with_nothing_run_twice(
    scaled_out: tuple[str, Path, DevCloud], tmp_path: Path
) -> None:
    from service.backends.compute.sandbox import leak_report

    url, logs, cloud = scaled_out
    pkg = tmp_path / "pkg"
    (pkg / "trainer").mkdir(parents=True)
    (pkg / "trainer" / "__init__.py").write_text("")
    (pkg / "trainer" / "once.py").write_text(textwrap.dedent(TRAINER))
    uri = StackMLClient(url, timeout=60).stage_package(pkg)["package_uri"]

    def submit(i: int) -> str:
        c = StackMLClient(url, timeout=60)  # a connection of its own: either API process
        job = c.create_job(
            {"name": f"scale-{i}", "trainer": {"package_uri": uri, "module": "trainer.once"}}
        )
        return str(job["id"])

    with ThreadPoolExecutor(JOBS) as pool:
        ids = list(pool.map(submit, range(JOBS)))
    assert len(set(ids)) == JOBS

    def settled(c: StackMLClient, job_id: str) -> dict[str, object]:
        return c.wait(job_id, timeout=240, interval=0.5, max_interval=1.0)

    with ThreadPoolExecutor(JOBS) as pool:
        jobs = list(pool.map(lambda j: settled(StackMLClient(url, timeout=60), j), ids))
    failed = [(j["id"], j["state"], j["failure"]) for j in jobs if j["state"] != "SUCCEEDED"]
    assert failed == []
    client = StackMLClient(url, timeout=60)
    for job_id in ids:
        log = client.logs(job_id)[0].decode()
        assert log.count(f"run {job_id}") == 1, (job_id, log)  # the trainer ran once
        servers = [r for r in client.get_job(job_id)["resources"] if r["server_id"]]
        assert len(servers) == 1, (job_id, servers)  # on one server

    # both worker processes ran steps, and both API processes answered requests
    steps = {
        name: STEP_DONE.findall((logs / f"{name}.log").read_text(errors="replace"))
        for name in ("worker-a", "worker-b")
    }
    assert all(steps.values()), {k: len(v) for k, v in steps.items()}
    assert sum(len(v) for v in steps.values()) >= JOBS * 4  # allocate, provision, poll, export
    pids = {line.split(" ", 1)[0] for line in (logs / "access.log").read_text().splitlines()}
    assert len(pids) == 2, pids

    # nothing leaks: every server deleted in Nova, no sandbox behind them
    admin = cloud.connection("devcloud")
    deadline = time.monotonic() + 60
    while True:
        servers = [s.name for s in admin.compute.servers(all_projects=True)]
        if not servers or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert servers == []
    assert leak_report(cloud.sandbox_root) == []
