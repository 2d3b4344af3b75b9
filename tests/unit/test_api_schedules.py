"""/v1/schedules over a real SQLite database, and the firing pass (workers/steps/schedules.py)
driven with an explicit `now`: bad input is refused with a field-level 422 (or 409) and
changes nothing; other projects' schedules are 404s; slots fire once, with the policies."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

import pytest
from flask.testing import FlaskClient
from sqlalchemy import func, select

from service.config import Settings
from service.db import jobs as jobs_repo
from service.db import schedules as repo
from service.db.models import Job, Schedule, ScheduleRun
from service.db.session import session_scope
from service.domain import schedules as dom
from service.domain.states import JobState
from service.queue import ALLOCATE
from workers.steps import schedules as firing


def count(url: str, model: Any) -> int:
    with session_scope(url) as s:
        return int(s.scalar(select(func.count()).select_from(model)) or 0)


def body(job: dict[str, Any], **over: Any) -> dict[str, Any]:
    out = {"name": "nightly", "cron": "0 3 * * *", "timezone": "Europe/Berlin", "job": job}
    out.update(over)
    return out


def fields(err: dict[str, Any]) -> list[str]:
    return [f["field"] for f in err["details"]["fields"]]


def test_create_get_list_pause_resume_delete(client: FlaskClient, package_uri, spec, db_url):
    job = spec(package_uri, env={"SECRET": "s3cret"})
    resp = client.post("/v1/schedules", json=body(job, concurrency="Allow", max_catchup=3))
    assert resp.status_code == 201, resp.get_json()
    sch = resp.get_json()
    assert sch["id"].startswith("sch-") and resp.headers["Location"] == f"/v1/schedules/{sch['id']}"
    assert sch["cron"] == "0 3 * * *" and sch["timezone"] == "Europe/Berlin"
    assert (sch["concurrency"], sch["catchup"], sch["max_catchup"]) == ("Allow", "none", 3)
    assert sch["paused"] is False and len(sch["next_fire_times"]) == 5
    assert all(t.endswith(":00:00.000000Z") for t in sch["next_fire_times"])
    assert sch["job"]["env"] == {"SECRET": "***"}
    assert sch["job"]["resources"]["flavor"] == "local.small"  # resolved as jobs are
    assert sch["last_run"] is None
    assert client.get("/v1/schedules/nightly").get_json()["id"] == sch["id"]  # by name too
    listed = client.get("/v1/schedules").get_json()["schedules"]
    assert [s["name"] for s in listed] == ["nightly"] and "job" not in listed[0]

    paused = client.patch(f"/v1/schedules/{sch['id']}", json={"paused": True}).get_json()
    assert paused["paused"] is True and paused["next_fire_times"] == []
    assert paused["next_fire_at"] is None
    resumed = client.patch("/v1/schedules/nightly", json={"paused": False}).get_json()
    assert resumed["paused"] is False and resumed["next_fire_at"] is not None

    assert client.delete(f"/v1/schedules/{sch['id']}").status_code == 204
    assert client.get(f"/v1/schedules/{sch['id']}").status_code == 404
    assert count(db_url, Schedule) == 0


@pytest.mark.parametrize(
    ("over", "want"),
    [
        ({"cron": "61 * * * *"}, ["cron"]),
        ({"cron": "* * * * * *"}, ["cron"]),
        ({"cron": "0 0 30 2 *"}, ["cron"]),
        ({"cron": 5}, ["cron"]),
        ({"timezone": "Mars/Base"}, ["timezone"]),
        ({"timezone": "../../etc/passwd"}, ["timezone"]),
        ({"concurrency": "forbid"}, ["concurrency"]),
        ({"catchup": "some"}, ["catchup"]),
        ({"max_catchup": 0}, ["max_catchup"]),
        ({"max_catchup": 101}, ["max_catchup"]),
        ({"paused": "yes"}, ["paused"]),
        ({"name": "bad name"}, ["name"]),
        ({"extra": 1}, ["extra"]),
    ],
)
def test_bad_input_is_a_422_naming_the_field(
    client, package_uri, spec, error_of, db_url, over, want
):
    resp = client.post("/v1/schedules", json=body(spec(package_uri), **over))
    err = error_of(resp, 422, "validation_failed")
    assert fields(err) == want
    assert count(db_url, Schedule) == 0


@pytest.mark.parametrize(
    ("job_over", "want"),
    [
        ({"trainer": {"module": "m"}}, "job.trainer.package_uri"),
        ({"runtime": {"version": "9.9"}}, "job.runtime"),
        ({"resources": {"flavor": "huge.nope"}}, "job.resources.flavor"),
        ({"output": {"model_uri": "local://projects/local/m/"}}, "job.output.model_uri"),
        ({"labels": {f"k{i}": "v" for i in range(63)}}, "job.labels"),
    ],
)
def test_bad_job_template_is_a_422_under_job(
    client, package_uri, spec, error_of, db_url, job_over, want
):
    job = spec(package_uri)
    job.update(job_over)
    if "trainer" in job_over:
        job["trainer"] = job_over["trainer"]
    err = error_of(client.post("/v1/schedules", json=body(job)), 422)
    assert want in [f["field"] for f in err["details"].get("fields", [])], err
    assert count(db_url, Schedule) == 0


def test_unbuilt_job_type_is_refused(client, package_uri, spec, error_of, db_url):
    job = spec(package_uri, type="batch_prediction")
    del job["trainer"], job["hyperparameters"]
    job["prediction"] = {
        "model": "demo",
        "input_uris": ["local://projects/local/data/x.csv"],
        "output_prefix": "local://projects/local/predictions/x/",
    }
    err = error_of(client.post("/v1/schedules", json=body(job)), 422, "not_implemented")
    assert "job.type" in fields(err)
    assert count(db_url, Schedule) == 0


def test_duplicate_name_is_a_409(client, package_uri, spec, error_of, db_url):
    assert client.post("/v1/schedules", json=body(spec(package_uri))).status_code == 201
    err = error_of(
        client.post("/v1/schedules", json=body(spec(package_uri))), 409, "schedule_exists"
    )
    assert err["details"] == {"schedule": "nightly"}
    assert count(db_url, Schedule) == 1


def test_patch_and_runs_refuse_bad_input(client, package_uri, spec, error_of):
    sid = client.post("/v1/schedules", json=body(spec(package_uri))).get_json()["id"]
    error_of(client.patch(f"/v1/schedules/{sid}", json={"paused": "no"}), 422)
    error_of(client.patch(f"/v1/schedules/{sid}", json={"cron": "* * * * *"}), 422)
    error_of(client.patch(f"/v1/schedules/{sid}", data="x", content_type="text/plain"), 415)
    error_of(client.get(f"/v1/schedules/{sid}/runs?limit=0"), 400)
    error_of(client.get(f"/v1/schedules/{sid}/runs?limit=x"), 400)
    assert client.get(f"/v1/schedules/{sid}").get_json()["paused"] is False


def test_keystone_tenancy_refuses_schedules(
    app, client, package_uri, spec, error_of, db_url, monkeypatch
):
    from service import trusts

    monkeypatch.setattr(trusts, "enabled", lambda settings: True)
    err = error_of(
        client.post("/v1/schedules", json=body(spec(package_uri))), 422, "not_implemented"
    )
    assert "keystone" in err["message"]
    assert count(db_url, Schedule) == 0


def _foreign(db_url: str, job: dict[str, Any]) -> str:
    with session_scope(db_url) as s:
        return repo.create_schedule(
            s,
            "other",
            name="nightly",
            cron="* * * * *",
            timezone="UTC",
            job=job,
            concurrency=dom.Concurrency.FORBID,
            catchup=dom.Catchup.NONE,
            max_catchup=10,
            paused=False,
            by="them",
        ).id


def test_another_projects_schedule_is_a_404(client, package_uri, spec, error_of, db_url):
    theirs = _foreign(db_url, spec(package_uri))
    for method, path in [
        ("get", f"/v1/schedules/{theirs}"),
        ("get", f"/v1/schedules/{theirs}/runs"),
        ("delete", f"/v1/schedules/{theirs}"),
        ("get", "/v1/schedules/nightly"),
    ]:
        error_of(getattr(client, method)(path), 404, "not_found")
    error_of(client.patch(f"/v1/schedules/{theirs}", json={"paused": True}), 404)
    assert client.get("/v1/schedules").get_json() == {"schedules": []}
    # the same name is free in this project
    assert client.post("/v1/schedules", json=body(spec(package_uri))).status_code == 201
    with session_scope(db_url) as s:
        assert s.get(Schedule, theirs).paused is False


# -- firing -----------------------------------------------------------------------------


class Sent:
    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []

    def __call__(self, task: str, job_id: str) -> None:
        self.calls.append((task, job_id))


def _make(client, package_uri, spec, **over: Any) -> dict[str, Any]:
    b = body(spec(package_uri), cron="*/10 * * * *", timezone="UTC")
    b.update(over)
    resp = client.post("/v1/schedules", json=b)
    assert resp.status_code == 201, resp.get_json()
    return resp.get_json()


def _created(db_url: str, sid: str) -> datetime:
    with session_scope(db_url) as s:
        return dom._aware(s.get(Schedule, sid).handled_until)


def _slot_after(t: datetime, minutes: int = 10) -> datetime:
    return t.replace(second=0, microsecond=0) + timedelta(minutes=minutes - t.minute % minutes)


def test_a_due_slot_fires_one_job_once(client, package_uri, spec, db_url, settings: Settings):
    sch = _make(client, package_uri, spec)
    slot = _slot_after(_created(db_url, sch["id"]))
    sent = Sent()
    assert firing.run(slot - timedelta(seconds=1), settings=settings, enqueue=sent).slots == []
    rep = firing.run(slot + timedelta(seconds=2), settings=settings, enqueue=sent)
    [fired] = rep.started()
    assert fired.fire_time == slot
    assert sent.calls == [(ALLOCATE, fired.job_id)]
    job = client.get(f"/v1/jobs/{fired.job_id}").get_json()
    assert job["state"] == "QUEUED"
    assert job["spec"]["labels"]["stackml.schedule"] == sch["id"]
    assert job["output"]["model_uri"] == f"local://projects/local/models/{fired.job_id}/"
    # the same pass again, and a stale state (as a restarted beat might hold): nothing fires
    assert firing.run(slot + timedelta(seconds=3), settings=settings, enqueue=sent).slots == []
    with session_scope(db_url) as s:
        row = s.get(Schedule, sch["id"])
        row.handled_until = slot - timedelta(minutes=1)
        row.next_fire_at = slot
    rep = firing.run(slot + timedelta(seconds=4), settings=settings, enqueue=sent)
    assert rep.slots == [] and rep.lost_races == 1
    assert count(db_url, Job) == 1 and count(db_url, ScheduleRun) == 1
    runs = client.get(f"/v1/schedules/{sch['id']}/runs").get_json()["runs"]
    assert [(r["outcome"], r["job_id"]) for r in runs] == [("started", fired.job_id)]
    assert client.get(f"/v1/schedules/{sch['id']}").get_json()["last_run"]["job_id"] == fired.job_id


def test_forbid_skips_while_the_previous_run_is_live(client, package_uri, spec, db_url, settings):
    sch = _make(client, package_uri, spec)
    slot = _slot_after(_created(db_url, sch["id"]))
    sent = Sent()
    [first] = firing.run(slot, settings=settings, enqueue=sent).started()
    rep = firing.run(slot + timedelta(minutes=10), settings=settings, enqueue=sent)
    [skipped] = rep.slots
    assert skipped.outcome == "skipped" and first.job_id in skipped.reason
    with session_scope(db_url) as s:  # the first run finishes: the next slot starts again
        assert jobs_repo.transition(s, first.job_id, JobState.QUEUED, JobState.CANCELLING)
        assert jobs_repo.transition(s, first.job_id, JobState.CANCELLING, JobState.CANCELLED)
    [again] = firing.run(slot + timedelta(minutes=20), settings=settings, enqueue=sent).started()
    assert again.job_id != first.job_id
    runs = client.get(f"/v1/schedules/{sch['id']}/runs").get_json()["runs"]
    assert [r["outcome"] for r in runs] == ["started", "skipped", "started"]


def test_allow_starts_alongside_and_replace_cancels(client, package_uri, spec, db_url, settings):
    allow = _make(client, package_uri, spec, name="allow", concurrency="Allow")
    slot = _slot_after(_created(db_url, allow["id"]))
    sent = Sent()
    firing.run(slot, settings=settings, enqueue=sent)
    assert (
        len(firing.run(slot + timedelta(minutes=10), settings=settings, enqueue=sent).started())
        == 1
    )
    client.delete("/v1/schedules/allow")

    rep_s = _make(client, package_uri, spec, name="replace", concurrency="Replace")
    slot = _slot_after(_created(db_url, rep_s["id"]))
    [first] = firing.run(slot, settings=settings, enqueue=sent).started()
    [second] = firing.run(slot + timedelta(minutes=10), settings=settings, enqueue=sent).started()
    assert first.job_id in second.reason
    assert client.get(f"/v1/jobs/{first.job_id}").get_json()["state"] == "CANCELLED"
    assert client.get(f"/v1/jobs/{second.job_id}").get_json()["state"] == "QUEUED"


def test_catchup_after_downtime(client, package_uri, spec, db_url, settings):
    none = _make(client, package_uri, spec, name="none", concurrency="Allow")
    allc = _make(
        client, package_uri, spec, name="all", concurrency="Allow", catchup="all", max_catchup=3
    )
    first = _slot_after(_created(db_url, none["id"]))
    # down across 5 slots of each schedule
    rep = firing.run(first + timedelta(minutes=45), settings=settings, enqueue=Sent())
    by = {}
    for f in rep.started():
        by.setdefault(f.schedule_id, []).append(f.fire_time)
    assert by[none["id"]] == [first + timedelta(minutes=40)]
    assert by[allc["id"]] == [first + timedelta(minutes=m) for m in (20, 30, 40)]
    [latest] = client.get(f"/v1/schedules/{none['id']}/runs?limit=1").get_json()["runs"]
    assert latest["missed"] == 4


def test_paused_schedule_does_not_fire_and_resume_skips_the_pause(
    client, package_uri, spec, db_url, settings
):
    sch = _make(client, package_uri, spec, concurrency="Allow", catchup="all")
    slot = _slot_after(_created(db_url, sch["id"]))
    client.patch(f"/v1/schedules/{sch['id']}", json={"paused": True})
    assert firing.run(slot + timedelta(minutes=30), settings=settings, enqueue=Sent()).slots == []
    client.patch(f"/v1/schedules/{sch['id']}", json={"paused": False})
    # resumed now (real time), before `slot`: the pass later fires only slots after the resume
    rep = firing.run(slot, settings=settings, enqueue=Sent())
    assert [f.fire_time for f in rep.started()] == [slot]


def test_a_template_no_longer_accepted_records_a_failed_slot(
    client, package_uri, spec, db_url, settings
):
    sch = _make(client, package_uri, spec)
    with session_scope(db_url) as s:
        row = s.get(Schedule, sch["id"])
        row.job = {**row.job, "trainer": {"module": "m"}}  # as if the schema had changed
    slot = _slot_after(_created(db_url, sch["id"]))
    [failed] = firing.run(slot, settings=settings, enqueue=Sent()).slots
    assert failed.outcome == "failed" and "package_uri" in failed.reason
    assert count(db_url, Job) == 0
    assert firing.run(slot + timedelta(seconds=5), settings=settings, enqueue=Sent()).slots == []
