"""GET /metrics: the platform's numbers computed from the database at scrape time (whatever
process moved the jobs), the API's own request latency, and who may scrape."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import update

from service.api import create_app
from service.config import Settings
from service.db import jobs as repo
from service.db.models import Job, JobEvent, Resource
from service.db.session import session_scope
from service.domain.spec import JobSpec
from service.domain.states import FailureReason, JobState, Phase

T0 = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)
Q, A, P, R, E = (
    JobState.QUEUED,
    JobState.ALLOCATING,
    JobState.PROVISIONING,
    JobState.RUNNING,
    JobState.EXPORTING,
)


def _spec(package_uri: str) -> JobSpec:
    return JobSpec.model_validate(
        {"name": "m", "trainer": {"package_uri": package_uri, "module": "trainer.task"}}
    )


def make_job(
    db_url: str,
    project: str,
    package_uri: str,
    path: list[tuple[JobState, float]],
    *,
    failure: repo.Failure | None = None,
) -> str:
    """A job moved along `path` ((state, seconds after T0 it entered it), the first QUEUED)
    with its events' times set to those."""
    with session_scope(db_url) as s:
        job_id = repo.create_job(s, project, _spec(package_uri)).id
    prev = JobState.QUEUED
    for state, _ in path[1:]:
        with session_scope(db_url) as s:
            fail = failure if state is JobState.FAILED else None
            assert repo.transition(s, job_id, prev, state, "", failure=fail)
        prev = state
    with session_scope(db_url) as s:
        ids = s.scalars(
            JobEvent.__table__.select()
            .with_only_columns(JobEvent.id)
            .where(JobEvent.job_id == job_id, JobEvent.kind == "transition")
            .order_by(JobEvent.id)
        ).all()
        assert len(ids) == len(path)
        for event_id, (_, secs) in zip(ids, path, strict=True):
            s.execute(
                update(JobEvent)
                .where(JobEvent.id == event_id)
                .values(at=T0 + timedelta(seconds=secs))
            )
    return job_id


def scrape(client: FlaskClient, **kw: Any) -> dict[str, Any]:
    resp = client.get("/metrics", **kw)
    assert resp.status_code == 200, resp.get_data(as_text=True)
    assert resp.content_type.startswith("text/plain; version=0.0.4")
    return {f.name: f for f in text_string_to_metric_families(resp.get_data(as_text=True))}


def value(fams: dict[str, Any], sample_name: str, **labels: str) -> float:
    family = sample_name
    for suffix in ("_bucket", "_count", "_sum"):
        family = family.removesuffix(suffix)
    found = [
        s.value
        for s in fams[family].samples
        if s.name == sample_name and all(s.labels.get(k) == v for k, v in labels.items())
    ]
    assert len(found) == 1, (sample_name, labels, fams[family].samples)
    return float(found[0])


def test_platform_metrics_come_from_the_database(
    client: FlaskClient, db_url: str, package_uri: str
) -> None:
    ssh = repo.Failure(Phase.PROVISION, FailureReason.SSH_UNREACHABLE, "no route")
    # local: one SUCCEEDED (queue 3s; allocating 4, provisioning 13, running 60, exporting 2)
    done = make_job(
        db_url,
        "local",
        package_uri,
        [(Q, 0), (A, 3), (P, 7), (R, 20), (E, 80), (JobState.SUCCEEDED, 82)],
    )
    # one FAILED with SSH (queue 0.5s; allocating 1; provisioning 40), one still QUEUED
    failed = make_job(
        db_url,
        "local",
        package_uri,
        [(Q, 0), (A, 0.5), (P, 1.5), (JobState.FAILED, 41.5)],
        failure=ssh,
    )
    make_job(db_url, "local", package_uri, [(Q, 0)])
    # another project: one RUNNING (queue 2s; allocating 1; provisioning 1; running: not over)
    running = make_job(db_url, "other", package_uri, [(Q, 0), (A, 2), (P, 3), (R, 4)])
    with session_scope(db_url) as s:
        for _ in range(2):
            repo.add_event(s, failed, "provision", "SSH failed (ssh_error); retrying")
        repo.add_event(s, failed, "provision", "booted; not about SSH failed")
        s.execute(update(Job).where(Job.id == done).values(output={"size": 1234, "objects": []}))
        for i, (job, state) in enumerate(
            [(running, "active"), (done, "deleted"), (failed, "deleted")]
        ):
            s.add(
                Resource(
                    job_id=job,
                    project_id="local",
                    backend="sandbox",
                    name=f"srv-{i}",
                    flavor="local.small",
                    state=state,
                )
            )

    fams = scrape(client)
    assert value(fams, "stackml_database_up") == 1
    # jobs by project and state, zeros included
    assert value(fams, "stackml_jobs", project="local", state="SUCCEEDED") == 1
    assert value(fams, "stackml_jobs", project="local", state="FAILED") == 1
    assert value(fams, "stackml_jobs", project="local", state="QUEUED") == 1
    assert value(fams, "stackml_jobs", project="local", state="RUNNING") == 0
    assert value(fams, "stackml_jobs", project="other", state="RUNNING") == 1
    assert sum(s.value for s in fams["stackml_jobs"].samples) == 4
    # queue wait: the three jobs that left QUEUED (3s, 0.5s, 2s); the one still queued is not in
    qw = "stackml_job_queue_wait_seconds"
    assert value(fams, qw + "_count") == 3 and value(fams, qw + "_sum") == pytest.approx(5.5)
    assert [value(fams, qw + "_bucket", le=le) for le in ("0.1", "0.5", "1.0", "2.5", "5.0")] == [
        0,
        1,
        1,
        2,
        3,
    ]
    assert value(fams, qw + "_bucket", le="+Inf") == 3
    # phases: finished stays only
    ph = "stackml_job_phase_duration_seconds"
    expected = {"ALLOCATING": (3, 6.0), "PROVISIONING": (3, 54.0), "RUNNING": (1, 60.0)}
    expected["EXPORTING"] = (1, 2.0)
    for state, (count, total) in expected.items():
        assert value(fams, ph + "_count", state=state) == count, state
        assert value(fams, ph + "_sum", state=state) == pytest.approx(total, abs=1e-3), state
    assert value(fams, ph + "_bucket", state="PROVISIONING", le="10.0") == 1
    assert value(fams, ph + "_bucket", state="PROVISIONING", le="30.0") == 2
    assert value(fams, ph + "_bucket", state="PROVISIONING", le="60.0") == 3
    assert {s.labels["state"] for s in fams[ph].samples} == set(expected)
    # servers, SSH failures, failures by reason, store bytes
    assert value(fams, "stackml_servers", backend="sandbox", state="active") == 1
    assert value(fams, "stackml_servers", backend="sandbox", state="deleted") == 2
    assert value(fams, "stackml_ssh_failures", phase="provision") == 2
    assert value(fams, "stackml_job_failures", phase="provision", reason="ssh_unreachable") == 1
    assert value(fams, "stackml_store_model_bytes", project="local") == 1234


def test_request_latency_is_counted_by_method_route_and_status(
    client: FlaskClient, db_url: str
) -> None:
    for _ in range(3):
        assert client.get("/v1/jobs").status_code == 200
    assert client.get("/v1/jobs/job-nope").status_code == 404
    assert client.post("/v1/jobs", data="x", content_type="text/plain").status_code == 415
    for path in ("/nowhere", "/also/nowhere", "/v1/jobs/a/b/c/d"):
        assert client.get(path).status_code == 404
    fams = scrape(client)
    lat = "stackml_api_request_duration_seconds"
    assert value(fams, lat + "_count", method="GET", route="/v1/jobs", status="200") == 3
    assert value(fams, lat + "_count", method="GET", route="/v1/jobs/<job_id>", status="404") == 1
    assert value(fams, lat + "_count", method="POST", route="/v1/jobs", status="415") == 1
    # unknown paths share one label value: a scanner cannot blow up the series
    assert value(fams, lat + "_count", method="GET", route="<unmatched>", status="404") == 3
    buckets = [s for s in fams[lat].samples if s.name == lat + "_bucket"]
    assert all(
        s.labels["route"] in {"/v1/jobs", "/v1/jobs/<job_id>", "<unmatched>"} for s in buckets
    )
    # the scrape itself is counted at the next one
    fams = scrape(client)
    assert value(fams, lat + "_count", method="GET", route="/metrics", status="200") == 1


def test_two_apps_in_one_process_keep_their_own_numbers(
    settings: Settings, db_url: str, app: Flask
) -> None:
    other = create_app(settings, enqueue=lambda task, job_id: None)
    app.test_client().get("/v1/jobs")
    fams = scrape(other.test_client())
    assert not [
        s
        for s in fams["stackml_api_request_duration_seconds"].samples
        if s.labels.get("route") == "/v1/jobs"
    ]


def test_a_database_outage_is_a_metric_not_a_500(settings: Settings, tmp_path: Any) -> None:
    broken = settings.model_copy(update={"database_url": f"sqlite:///{tmp_path}/nodir/x/y.db"})
    broken_app = create_app(broken, enqueue=lambda task, job_id: None)
    fams = scrape(broken_app.test_client())  # the tables do not exist there
    assert value(fams, "stackml_database_up") == 0
    assert "stackml_jobs" not in fams


def test_metrics_token_guards_the_scrape(settings: Settings, db_url: str, error_of: Any) -> None:
    guarded = create_app(
        settings.model_copy(update={"metrics_token": "scrape-secret"}),
        enqueue=lambda task, job_id: None,
    ).test_client()
    error_of(guarded.get("/metrics"), 401, "unauthorized")
    error_of(guarded.get("/metrics", headers={"Authorization": "Bearer nope"}), 401)
    error_of(guarded.get("/metrics", headers={"Authorization": "Basic scrape-secret"}), 401)
    fams = scrape(guarded, headers={"Authorization": "Bearer scrape-secret"})
    assert value(fams, "stackml_database_up") == 1


def test_keystone_mode_does_not_serve_metrics_to_anyone(
    settings: Settings, db_url: str, error_of: Any
) -> None:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{sock.getsockname()[1]}/v3"
    ks = Settings(
        **{
            **settings.model_dump(),
            "auth": "keystone",
            "host": "0.0.0.0",
            "metrics_token": "scrape-secret",
            "keystone_authtoken": {
                "auth_url": dead,
                "username": "stackml",
                "password": "pw",
                "project_name": "service",
                "http_request_max_retries": "0",
                "http_connect_timeout": "2",
            },
        }
    )
    ks_client = create_app(ks, enqueue=lambda task, job_id: None).test_client()
    error_of(ks_client.get("/metrics"), 401, "unauthorized")  # no Keystone token, no bearer
    fams = scrape(ks_client, headers={"Authorization": "Bearer scrape-secret"})
    assert value(fams, "stackml_database_up") == 1
