"""Schedules' exactly-once firing against real processes, across real fire times: a minutely
schedule while a second worker with its own beat runs beside the first, then while the worker
that runs beat is SIGKILLed before a fire time and restarted after it, with the broker (Redis)
down across that fire time too. Each slot fires exactly once (one schedule_runs row, one job,
one run of the trainer), none is lost, and every job it started succeeds.

A fault is timed against the next minute boundary, so the test takes about two minutes."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections import Counter
from datetime import UTC, datetime, timedelta
from typing import Any

from service.client import StackMLClient
from service.config import Settings
from service.domain.schedules import SCHEDULE_LABEL
from service.platform import LocalPlatform
from tests.chaos.conftest import CHAOS_REDIS, TERMINAL, wait_clean

MINUTE = 60.0


def _until_boundary() -> float:
    """Seconds to the next whole minute (UTC)."""
    now = time.time()
    return MINUTE - (now % MINUTE)


def _boundary_after(t: float) -> datetime:
    return datetime.fromtimestamp((int(t // MINUTE) + 1) * MINUTE, UTC)


def _wait_slot(client: StackMLClient, sid: str, slot: datetime, timeout: float) -> dict[str, Any]:
    want = slot.isoformat().replace("+00:00", "Z")
    deadline = time.monotonic() + timeout
    while True:
        for run in client.schedule_runs(sid, limit=20):  # the API reads runs without Redis
            if _same_instant(run["fire_time"], want):
                return run
        assert time.monotonic() < deadline, f"slot {want} of {sid} did not fire in {timeout}s"
        time.sleep(0.5)


def _sleep_until(t: datetime) -> None:
    time.sleep(max(0.0, t.timestamp() - time.time()))


def _same_instant(a: str, b: str) -> bool:
    def parse(x: str) -> datetime:
        return datetime.fromisoformat(x.replace("Z", "+00:00"))

    return parse(a) == parse(b)


def _second_beat(settings: Settings) -> subprocess.Popen[bytes]:
    """Another worker process with its own beat, on the same queue, broker and database: what
    a second host started with the same settings runs."""
    log = open(settings.data_dir / "second-beat.log", "ab")
    try:
        return subprocess.Popen(
            [
                sys.executable, "-m", "celery", "-A", "workers.celery_app:app", "worker",
                "--loglevel=INFO", "--concurrency=2", "--pool=prefork",
                "-n", f"second-{os.getpid()}@{socket.gethostname()}",
                "--without-gossip", "--without-mingle",
                "--beat", "--schedule", str(settings.data_dir / "beat-schedule-2"),
            ],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=os.environ.copy(),
        )  # fmt: skip
    finally:
        log.close()


def _stop(proc: subprocess.Popen[bytes]) -> None:
    try:
        os.killpg(proc.pid, 15)
        proc.wait(30)
    except ProcessLookupError:
        pass
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        proc.wait(10)


def test_each_slot_fires_once_across_two_beats_and_beat_and_broker_down(
    chaos_platform: LocalPlatform, chaos_settings: Settings, client: StackMLClient, package: str
) -> None:
    # start the faults well before a boundary: a fault needs ~8 s of lead
    if _until_boundary() < 15:
        time.sleep(_until_boundary() + 1)
    template = {
        "name": "beat-chaos",
        "trainer": {"package_uri": package, "module": "trainer.quick"},
    }
    sch = client.create_schedule("beat-chaos", "* * * * *", template, concurrency="Allow")
    sid = sch["id"]
    slots: list[datetime] = []
    try:
        # 1. a second beat (another worker process) beside the first across a fire time
        if _until_boundary() < 15:  # the second beat must be up before the fire time
            time.sleep(_until_boundary() + 1)
        second = _second_beat(chaos_settings)
        try:
            slot = _boundary_after(time.time())
            _sleep_until(slot + timedelta(seconds=12))  # both beats pass over it (every 5 s)
            run = _wait_slot(client, sid, slot, 60)
            assert run["outcome"] == "started", run
            slots.append(slot)
        finally:
            _stop(second)

        # 2. the worker running beat SIGKILLed 8 s before a fire time and the broker (Redis)
        # down from 5 s before it to 10 s after it; the worker restarted 15 s after it: no beat
        # could fire the slot then; once both are back it fires, late, once
        if _until_boundary() < 15:
            time.sleep(_until_boundary() + 1)
        slot = _boundary_after(time.time())
        time.sleep(max(0.0, _until_boundary() - 8))
        chaos_platform.kill_worker()
        time.sleep(3)
        CHAOS_REDIS.shutdown()
        _sleep_until(slot + timedelta(seconds=10))
        CHAOS_REDIS.start()
        _sleep_until(slot + timedelta(seconds=15))
        chaos_platform.restart_worker()
        run = _wait_slot(client, sid, slot, 90)
        assert run["outcome"] == "started", run
        slots.append(slot)
    finally:
        client.pause_schedule(sid)

    runs = client.schedule_runs(sid, limit=50)
    per_slot = Counter(datetime.fromisoformat(r["fire_time"].replace("Z", "+00:00")) for r in runs)
    assert all(n == 1 for n in per_slot.values()), per_slot
    # no slot between the first faulted one and the last was lost (catchup none fires the
    # latest missed one; none was missed by more than one minute here)
    first, last = slots[0], slots[-1]
    minutes = int((last - first).total_seconds() // MINUTE) + 1
    expected = {first + timedelta(minutes=i) for i in range(minutes)}
    assert expected <= set(per_slot), sorted(expected - set(per_slot))
    jobs = [r["job_id"] for r in runs if datetime.fromisoformat(
        r["fire_time"].replace("Z", "+00:00")) in expected]  # fmt: skip
    assert len(jobs) == len(set(jobs)) == len(expected), runs
    for job_id in jobs:
        job = wait_clean(client, job_id, 120)
        assert job["state"] == "SUCCEEDED", job
        data, _ = client.logs(job_id)
        assert data.decode().count(f"run {job_id}") == 1  # the trainer ran once
    # and no other job was started for this schedule
    listed = client.list_jobs(labels={SCHEDULE_LABEL: sid}, limit=200)["jobs"]
    assert {j["id"] for j in listed} == {r["job_id"] for r in runs if r["job_id"]}
    assert all(j["state"] in TERMINAL for j in listed)
