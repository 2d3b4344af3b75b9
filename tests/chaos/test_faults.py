"""Infrastructure and server faults mid-job: Redis and PostgreSQL restarts, a sandbox killed or
frozen, a job row deleted by hand. Each ends in the right state, loses no log line and leaks
no server."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time

import psycopg
import pytest

from service.client import StackMLClient
from service.config import Settings
from service.platform import LocalPlatform
from tests.chaos.conftest import (
    CHAOS_REDIS,
    assert_complete_log,
    record_fault,
    steady_lines,
    submit,
    wait_clean,
    wait_state,
    wait_until,
)
from tests.pgutil import ADMIN_URL

N_LINES = 40


def _server_record(settings: Settings, job: dict) -> dict:
    server_id = [r for r in job["resources"] if r["server_id"]][-1]["server_id"]
    return json.loads((settings.sandbox_dir / server_id / "server.json").read_text())


def _restart_redis() -> None:
    CHAOS_REDIS.restart()


def _restart_postgres() -> None:
    version = sorted(os.listdir("/etc/postgresql"))[0]
    subprocess.run(
        ["pg_ctlcluster", "--skip-systemctl-redirect", version, "main", "restart"],
        check=True,
        timeout=120,
        capture_output=True,
    )
    deadline = time.monotonic() + 60
    while True:
        try:
            psycopg.connect(
                ADMIN_URL.replace("postgresql+psycopg://", "postgresql://"), connect_timeout=3
            ).close()
            return
        except psycopg.OperationalError:
            assert time.monotonic() < deadline, "PostgreSQL did not come back"
            time.sleep(0.3)


@pytest.mark.parametrize("service", ["redis", "postgres"])
def test_broker_or_database_restart_mid_job_loses_nothing(
    chaos_platform: LocalPlatform, client: StackMLClient, package: str, service: str
) -> None:
    job = submit(client, package, "steady", str(N_LINES))
    wait_until(
        client,
        job["id"],
        lambda j: j["state"] == "RUNNING" and len(steady_lines(client, j["id"])) >= 5,
        60,
        "running with some log",
    )
    (_restart_redis if service == "redis" else _restart_postgres)()
    t0 = time.monotonic()
    done = wait_clean(client, job["id"], timeout=120)
    record_fault(f"{service} restart while RUNNING", done, time.monotonic() - t0)
    assert done["state"] == "SUCCEEDED", done["failure"]
    assert_complete_log(client, job["id"], N_LINES)


def _running_steady(client: StackMLClient, package: str) -> tuple[dict, dict]:
    """A long steady job, once it runs and has written a few log lines."""
    job = submit(client, package, "steady", "600")
    running = wait_until(
        client,
        job["id"],
        lambda j: j["state"] == "RUNNING" and len(steady_lines(client, j["id"])) >= 5,
        60,
        "running",
    )
    return job, running


def test_sandbox_killed_mid_training_fails_with_server_lost(
    chaos_platform: LocalPlatform, chaos_settings: Settings, client: StackMLClient, package: str
) -> None:
    job, running = _running_steady(client, package)
    before = steady_lines(client, job["id"])
    os.kill(int(_server_record(chaos_settings, running)["sshd_pid"]), signal.SIGKILL)
    t0 = time.monotonic()
    done = wait_clean(client, job["id"], timeout=60)
    record_fault("sandbox killed while RUNNING", done, time.monotonic() - t0)
    assert (done["state"], done["failure"]["reason"]) == ("FAILED", "server_lost")
    assert steady_lines(client, job["id"])[: len(before)] == before


def test_sandbox_killed_then_the_worker_killed_inside_the_restart_still_resumes(
    chaos_platform: LocalPlatform, chaos_settings: Settings, client: StackMLClient, package: str
) -> None:
    """restart_policy OnFailure: the sandbox is killed once the checkpoint is in the store, and
    the worker is SIGKILLed right after the job went back to QUEUED, before it deleted the lost
    server or enqueued the allocation. The reconciler re-drives the job; it resumes from the
    checkpoint on one new server, and both servers are deleted."""
    from service.backends import registry

    chaos_platform.restart_worker({"STACKML_CHAOS_PAUSE": "restart:60"})
    try:
        job = submit(client, package, "resumable", restart_policy="OnFailure", max_restarts=1)
        store = registry.store()
        area = store.key_of(package).split("staging/", 1)[0]
        mark = f"{area}checkpoints/{job['id']}/first-run"
        running = wait_until(
            client,
            job["id"],
            lambda j: j["state"] == "RUNNING" and store.info(mark) is not None,
            60,
            "running with its checkpoint in the store",
        )
        os.kill(int(_server_record(chaos_settings, running)["sshd_pid"]), signal.SIGKILL)
        wait_until(
            client,
            job["id"],
            lambda j: j["state"] == "QUEUED" and j["restarts"] == 1,
            60,
            "back in QUEUED for its restart",
        )
        time.sleep(0.5)  # inside the paused restart step
        chaos_platform.kill_worker()
        t0 = time.monotonic()
    finally:
        chaos_platform.restart_worker()
    done = wait_clean(client, job["id"], timeout=120)
    record_fault("sandbox killed, then the worker inside the restart", done, time.monotonic() - t0)
    assert done["state"] == "SUCCEEDED", done["failure"]
    log = client.logs(job["id"])[0].decode()
    assert log.count("first run") == 1 and f"resumed {job['id']}" in log, log
    assert done["restarts"] == 1
    assert len(done["resources"]) == 2, done["resources"]  # the lost server and one new one


def test_frozen_sandbox_fails_with_server_lost_within_the_heartbeat_deadline(
    chaos_platform: LocalPlatform, chaos_settings: Settings, client: StackMLClient, package: str
) -> None:
    job, running = _running_steady(client, package)
    from service.backends.compute.sandbox import v2_cgroup

    rec = _server_record(chaos_settings, running)
    group = v2_cgroup(rec["cgroups"])  # pure v2 (Debian 12) or the unified one of a mixed host
    assert group is not None, f"no cgroup v2 group to freeze: {rec['cgroups']}"
    (group / "cgroup.freeze").write_text("1")  # SSH now hangs: nothing answers
    t0 = time.monotonic()
    done = wait_clean(client, job["id"], timeout=90)
    record_fault("sandbox frozen (cgroup freezer)", done, time.monotonic() - t0)
    assert (done["state"], done["failure"]["reason"]) == ("FAILED", "server_lost")
    assert time.monotonic() - t0 < 60


def test_job_row_deleted_by_hand_the_reaper_still_removes_its_server(
    chaos_platform: LocalPlatform, chaos_settings: Settings, client: StackMLClient, package: str
) -> None:
    from service.backends.compute.sandbox import SandboxBackend

    job = submit(client, package, "steady", "600")
    running = wait_state(client, job["id"], {"RUNNING"})
    server_id = _server_record(chaos_settings, running)["id"]
    url = chaos_settings.db_url.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("DELETE FROM jobs WHERE id = %s", (job["id"],))
    t0 = time.monotonic()
    backend = SandboxBackend(chaos_settings.sandbox_dir, chaos_settings.flavors())
    deadline = time.monotonic() + 60
    while any(r.id == server_id for r in backend.list_servers()):
        assert time.monotonic() < deadline, "the orphan server was not reaped"
        time.sleep(0.2)
    record_fault("job row deleted by hand", {"state": "reaped"}, time.monotonic() - t0)


@pytest.mark.parametrize("phase", ["provision", "export"])
def test_ssh_refused_for_a_while_is_retried_not_fatal(
    chaos_platform: LocalPlatform,
    chaos_settings: Settings,
    client: StackMLClient,
    package: str,
    phase: str,
) -> None:
    """The sandbox's sshd drops every connection and refuses the job's key for longer than one
    reconnect window (what a loaded sshd did once in CI, in export): the server is still
    ACTIVE, so the phase runs again and the job succeeds instead of failing with
    ssh_unreachable."""
    import psutil

    # the phase starts 5 s late (time to break SSH before it connects); SSH may fail for 30 s
    # before the server counts as lost
    chaos_platform.restart_worker(
        {"STACKML_CHAOS_PAUSE": f"{phase}:5", "STACKML_HEARTBEAT_TIMEOUT": "30"}
    )
    try:
        job = submit(client, package, "steady", "10")
        inside = wait_until(
            client, job["id"], lambda j: j["state"] == f"{phase.upper()}ING", 60, phase
        )
        rec = _server_record(chaos_settings, inside)
        keys = chaos_settings.sandbox_dir / rec["id"] / "authorized_keys"
        good = keys.read_text()
        keys.write_text("")  # the job's key is refused from now on
        for child in psutil.Process(int(rec["sshd_pid"])).children(recursive=True):
            with contextlib.suppress(psutil.NoSuchProcess):  # one that just ended by itself
                child.kill()  # and every open connection (a worker's cached one) is gone
        t0 = time.monotonic()
        # past the pause plus a reconnect window (5 s): the phase's first try fails
        time.sleep(13.0)
        with contextlib.suppress(FileNotFoundError):  # gone if the job failed meanwhile
            keys.write_text(good)
        done = wait_clean(client, job["id"], timeout=60)
    finally:
        chaos_platform.restart_worker()
    record_fault(f"SSH refused for 13 s in {phase}", done, time.monotonic() - t0)
    assert done["state"] == "SUCCEEDED", done["failure"]
    events = [(e["kind"], e["message"]) for e in client.events(job["id"])["events"]]
    assert any(k == phase and m.startswith("SSH failed") for k, m in events), events
    assert_complete_log(client, job["id"], 10)
