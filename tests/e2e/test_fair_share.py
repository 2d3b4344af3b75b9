"""Quotas, admission and usage on the real platform: a tight quota set through the API holds jobs
in QUEUED with a visible reason, the `priority` label goes first, and usage is metered."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
import requests

from service.client import StackMLClient
from service.platform import LocalPlatform
from tests.e2e.conftest import job_spec, make_package, wait_state

QUOTA_WAIT = "waiting for quota: project {p} uses 1 of 1 concurrent jobs"
NAP = """
    import os, sys, time
    time.sleep(float(sys.argv[1]))
    with open(os.path.join(os.environ["STACKML_MODEL_DIR"], "m.txt"), "w") as fh:
        fh.write("1")
"""


@pytest.fixture(scope="module")
def nap_package(client: StackMLClient, tmp_path_factory: pytest.TempPathFactory) -> str:
    root = make_package(tmp_path_factory.mktemp("nap"), {"nap": NAP})
    return str(client.stage_package(root)["package_uri"])


@pytest.fixture
def api(platform: LocalPlatform) -> Iterator[str]:
    url = platform.url
    project = requests.get(f"{url}/v1/quotas", timeout=10).json()["project_id"]
    try:
        yield url
    finally:  # the platform is shared by the session: leave its quota as it was
        requests.delete(f"{url}/v1/quotas/{project}", timeout=10)


def _event_time(client: StackMLClient, job_id: str, to: str) -> str:
    return next(e["at"] for e in client.events(job_id)["events"] if e["to"] == to)


def _wait_for(check: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        got = check()
        if got:
            return got
        assert time.monotonic() < deadline, f"{what} after {timeout}s"
        time.sleep(0.2)


def test_over_quota_jobs_wait_with_a_reason_and_priority_goes_first(
    api: str, client: StackMLClient, nap_package: str
) -> None:
    quota = requests.get(f"{api}/v1/quotas", timeout=10).json()
    project = quota["project_id"]
    resp = requests.put(f"{api}/v1/quotas/{project}", json={"jobs": 1}, timeout=10)
    assert resp.status_code == 200, resp.text
    assert resp.json()["limits"]["jobs"] == 1

    def sleeper(name: str, seconds: int, **extra: Any) -> dict[str, Any]:
        spec = job_spec(nap_package, "trainer.nap", **extra)
        spec["name"] = name
        spec["trainer"]["args"] = [str(seconds)]
        return client.create_job(spec)

    first = sleeper("fair-first", 12)
    wait_state(client, first["id"], {"RUNNING"}, timeout=60)
    low = sleeper("fair-low", 1)
    high = sleeper("fair-high", 1, labels={"priority": "5"})

    # each waits with the reason in its timeline (low: behind high, whichever step came first)
    reason = QUOTA_WAIT.format(p=project)
    for job in (low, high):
        _wait_for(
            lambda job=job: any(
                e["kind"] == "waiting" and e["message"].startswith(reason)
                for e in client.events(job["id"])["events"]
            ),
            20,
            f"no waiting event on {job['name']}",
        )
    assert client.get_job(low["id"])["state"] == "QUEUED"
    assert client.get_job(high["id"])["state"] == "QUEUED"
    held = requests.get(f"{api}/v1/quotas", timeout=10).json()
    assert held["in_use"]["jobs"] == 1
    assert held["queued"] >= 2

    done = {
        j["id"]: wait_state(client, j["id"], {"SUCCEEDED", "FAILED"}, 240)
        for j in (first, low, high)
    }
    assert {d["state"] for d in done.values()} == {"SUCCEEDED"}, [
        d["failure"] for d in done.values()
    ]
    # one at a time: each started after the one before it had let go of its slot
    assert _event_time(client, high["id"], "ALLOCATING") > _event_time(
        client, first["id"], "SUCCEEDED"
    )
    assert _event_time(client, low["id"], "ALLOCATING") > _event_time(
        client, high["id"], "SUCCEEDED"
    )

    # usage: each job's servers were metered, and the project's report has the three
    for d in done.values():
        assert d["usage"]["vm_seconds"] > 0
        assert d["usage"]["cost"] > 0
        assert d["usage"]["gpu_hours"] == 0
    report = requests.get(f"{api}/v1/usage", timeout=10).json()
    rows = {r["id"]: r for r in report["jobs"]}
    assert set(done) <= set(rows)
    first_row = rows[first["id"]]
    assert first_row["vm_seconds"] >= 12  # it slept 12 s on its server
    # the totals are the sum of the rows shown, to the millisecond: jobs' and endpoints' servers
    # (the report may hold more jobs, and other tests' endpoints)
    rows = [*report["jobs"], *report.get("endpoints", [])]
    assert report["totals"]["vm_seconds"] == round(sum(r["vm_seconds"] for r in rows), 3)
    assert report["totals"]["jobs"] == len(report["jobs"])
    bad = requests.get(f"{api}/v1/usage?since=last-week", timeout=10)
    assert bad.status_code == 400
