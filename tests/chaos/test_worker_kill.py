"""SIGKILL the worker inside each phase, start a new one: the job ends right, nothing is lost."""

from __future__ import annotations

import time

import pytest

from service.client import StackMLClient
from service.platform import LocalPlatform
from tests.chaos.conftest import (
    assert_complete_log,
    record_fault,
    submit,
    wait_clean,
    wait_until,
)

N_LINES = 15
PHASES = [
    ("allocate", lambda j: j["state"] == "ALLOCATING"),
    ("provision", lambda j: j["state"] == "PROVISIONING"),
    ("poll", lambda j: j["state"] == "RUNNING"),
    ("export", lambda j: j["state"] == "EXPORTING"),
    ("teardown", lambda j: j["state"] == "SUCCEEDED"),
]


@pytest.mark.parametrize(("step", "inside"), PHASES, ids=[p[0] for p in PHASES])
def test_worker_killed_inside_a_phase_resumes_on_a_new_worker(
    chaos_platform: LocalPlatform, client: StackMLClient, package: str, step: str, inside: object
) -> None:
    chaos_platform.restart_worker({"STACKML_CHAOS_PAUSE": f"{step}:60"})
    try:
        job = submit(client, package, "steady", str(N_LINES))
        wait_until(client, job["id"], inside, 60, f"inside {step}")
        if step == "poll":
            time.sleep(N_LINES * 0.1 + 0.5)  # the trainer finishes while nobody polls
        time.sleep(0.5)  # the paused task holds the message now
        chaos_platform.kill_worker()
        t0 = time.monotonic()
    finally:
        chaos_platform.restart_worker()
    done = wait_clean(client, job["id"], timeout=90)
    record_fault(f"worker SIGKILL in {step}", done, time.monotonic() - t0)
    assert done["state"] == "SUCCEEDED", done["failure"]
    assert_complete_log(client, job["id"], N_LINES)
    assert [o["key"] for o in done["output"]["objects"]] == ["model.bin"]
    servers = [r for r in done["resources"] if r["server_id"]]
    assert len(servers) == 1, done["resources"]  # booted once: the job did not run twice
