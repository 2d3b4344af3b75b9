"""Tuning jobs over the API (real SQLite): submission starts them RUNNING with no server and
hands them to the tune step; bad tuning sections are 422 naming the field and store nothing;
the view shows the trials table and the best trial; a trial names its tuning job; a tuning job
holds no quota of its own."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from flask.testing import FlaskClient
from sqlalchemy import func, select

from service.db import jobs as repo
from service.db import quotas
from service.db import tuning as tuning_repo
from service.db.models import Job, MetricRow, Resource
from service.db.session import session_scope
from service.domain.states import ResourceState
from service.queue import POLL

TUNING = {
    "metric": "loss",
    "goal": "minimize",
    "parameters": [{"name": "rate", "type": "double", "min": 0.001, "max": 1, "scale": "log"}],
    "max_trials": 3,
    "max_parallel_trials": 2,
}


def count(url: str) -> int:
    with session_scope(url) as s:
        return int(s.scalar(select(func.count()).select_from(Job)) or 0)


def test_a_tuning_job_starts_running_with_no_server_and_goes_to_its_step(
    client: FlaskClient, package_uri: str, spec: Any, enqueued: Any, db_url: str
) -> None:
    resp = client.post("/v1/jobs", json=spec(package_uri, tuning=TUNING))
    assert resp.status_code == 202, resp.get_json()
    job = resp.get_json()
    assert job["state"] == "RUNNING" and job["resources"] == []
    assert job["output"] == {} and job["spec"]["output"]["model_uri"] is None
    assert job["tuning"]["trials"] == [] and job["tuning"]["max_trials"] == 3
    assert enqueued.calls == [(POLL, job["id"])]
    events = client.get(f"/v1/jobs/{job['id']}/events").get_json()["events"]
    assert events[-1]["to"] == "RUNNING"
    assert events[-1]["message"] == "tuning loss (minimize) with tpe: 3 trials, 2 at a time"
    view = client.get(f"/v1/jobs/{job['id']}").get_json()
    assert view["tuning"]["trials"] == [] and view["tuning"]["best_trial"] is None
    with session_scope(db_url) as s:  # it holds nothing: its trials are counted
        used = quotas.in_use(s, {}, "local.small", ["local"])["local"]
        assert used.servers == 0 and used.jobs == 0


def test_the_view_shows_the_trials_and_the_best_one(
    client: FlaskClient, package_uri: str, spec: Any, db_url: str
) -> None:
    parent_id = client.post("/v1/jobs", json=spec(package_uri, tuning=TUNING)).get_json()["id"]
    with session_scope(db_url) as s:
        parent = repo.get_job(s, parent_id)
        ids = []
        for n, (lr, losses) in enumerate([(0.1, [3.0, 2.0]), (0.01, [2.5, 1.5])], start=1):
            child = tuning_repo.create_trial(
                s, parent, n, {"rate": lr}, "projects/local/", "local://{}".format
            )
            ids.append(child.id)
            for k, v in enumerate(losses, start=1):
                s.add(MetricRow(job_id=child.id, name="loss", value=v, step=k, log_offset=k * 10))
        t0 = datetime(2026, 12, 1, tzinfo=UTC)
        for child_id in ids:  # each trial's server ran 90 s
            s.add(
                Resource(
                    job_id=child_id,
                    project_id="local",
                    backend="sandbox",
                    role="chief",
                    name=f"stackml-{child_id}-chief-0",
                    flavor="local.small",
                    state=ResourceState.DELETED.value,
                    active_at=t0,
                    deleted_at=t0 + timedelta(seconds=90),
                )
            )
        for child_id in ids:
            assert repo.transition(s, child_id, repo.JobState.QUEUED, repo.JobState.CANCELLING)
            assert repo.transition(s, child_id, repo.JobState.CANCELLING, repo.JobState.CANCELLED)
        s.execute(Job.__table__.update().where(Job.id == ids[0]).values(state="SUCCEEDED"))
        s.execute(Job.__table__.update().where(Job.id == ids[1]).values(state="SUCCEEDED"))
    view = client.get(f"/v1/jobs/{parent_id}").get_json()["tuning"]
    assert [(t["trial"], t["state"], t["value"], t["steps"]) for t in view["trials"]] == [
        (1, "SUCCEEDED", 2.0, 2),
        (2, "SUCCEEDED", 1.5, 2),
    ]
    assert view["best_trial"] == {
        "trial": 2,
        "job_id": ids[1],
        "value": 1.5,
        "hyperparameters": {"rate": 0.01},
    }
    assert view["counts"] == {"SUCCEEDED": 2}
    assert view["trials_usage"]["vm_seconds"] == 180.0  # the trials' servers together
    assert client.get(f"/v1/jobs/{parent_id}").get_json()["usage"]["vm_seconds"] == 0.0
    child = client.get(f"/v1/jobs/{ids[1]}").get_json()
    assert child["parent_id"] == parent_id and child["trial"] == 2
    assert child["spec"]["hyperparameters"] == {"lr": 0.1, "rate": 0.01}  # fixed + tuned
    assert child["spec"]["tuning"] is None
    assert child["output"]["model_uri"] == f"local://projects/local/models/{ids[1]}/"
    assert "tuning" not in child


def test_bad_tuning_sections_are_422_naming_the_field_and_store_nothing(
    client: FlaskClient, package_uri: str, spec: Any, error_of: Any, enqueued: Any, db_url: str
) -> None:
    bad = {**TUNING, "max_parallel_trials": 5}
    err = error_of(client.post("/v1/jobs", json=spec(package_uri, tuning=bad)), 422)
    assert err["details"]["fields"][0]["field"] == "tuning"
    assert (
        "max_parallel_trials must not exceed max_trials" in err["details"]["fields"][0]["message"]
    )
    fixed = spec(package_uri, tuning=TUNING, hyperparameters={"rate": 0.1})
    err = error_of(client.post("/v1/jobs", json=fixed), 422, "validation_failed")
    assert [f["field"] for f in err["details"]["fields"]] == ["tuning.parameters"]
    gated = spec(
        package_uri,
        tuning=TUNING,
        output={
            "register_as": "m",
            "gate": {"metric": "rmse", "threshold": 1, "holdout_uri": "local://projects/local/h/"},
        },
    )
    err = error_of(client.post("/v1/jobs", json=gated), 422, "not_implemented")
    assert [f["field"] for f in err["details"]["fields"]] == ["output.gate"]
    assert count(db_url) == 0 and enqueued.calls == []


def test_a_schedule_fires_a_tuning_job_whose_trials_are_not_its_runs(
    client: FlaskClient, package_uri: str, spec: Any, db_url: str, settings: Any
) -> None:
    from service.db.models import Schedule
    from workers.steps import schedules as firing

    labelled = spec(package_uri, tuning=TUNING, labels={"team": "ml"})
    body = {"name": "nightly", "cron": "0 3 * * *", "timezone": "UTC", "job": labelled}
    resp = client.post("/v1/schedules", json=body)
    assert resp.status_code == 201, resp.get_json()
    sid = resp.get_json()["id"]
    with session_scope(db_url) as s:
        after = s.get(Schedule, sid).handled_until.replace(tzinfo=UTC)
    slot = (after + timedelta(days=1)).replace(hour=3, minute=0, second=0, microsecond=0)
    sent: list[tuple[str, str]] = []
    [fired] = firing.run(
        slot + timedelta(seconds=2), settings=settings, enqueue=lambda *a: sent.append(a)
    ).started()
    assert sent == [(POLL, fired.job_id)]  # its step submits the trials: nothing to allocate
    job = client.get(f"/v1/jobs/{fired.job_id}").get_json()
    assert job["state"] == "RUNNING" and job["output"] == {} and job["resources"] == []
    assert job["spec"]["labels"] == {
        "team": "ml",
        "stackml.schedule": sid,
        "stackml.slot": f"{slot:%Y-%m-%dT%H:%M:%SZ}",
    }
    assert job["tuning"]["max_trials"] == 3
    with session_scope(db_url) as s:
        parent = repo.get_job(s, fired.job_id)
        trial = tuning_repo.create_trial(
            s, parent, 1, {"rate": 0.1}, "projects/local/", "local://{}".format
        )
        trial_id = trial.id
    # the trial keeps the user's labels, not the schedule's: the schedule's jobs are its runs
    assert client.get(f"/v1/jobs/{trial_id}").get_json()["spec"]["labels"] == {"team": "ml"}
    listed = client.get(f"/v1/jobs?label=stackml.schedule={sid}").get_json()["jobs"]
    assert [j["id"] for j in listed] == [fired.job_id]
