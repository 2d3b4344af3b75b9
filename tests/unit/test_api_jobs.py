"""The /v1/jobs API, the error shape, and the health endpoints, over a real SQLite database."""

from __future__ import annotations

import json
import threading
import time
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import func, select

from service.config import Settings
from service.db import jobs as repo
from service.db.models import Job, Resource
from service.db.session import session_scope
from service.domain.spec import JobSpec
from service.domain.states import JobState, ResourceState
from service.queue import ALLOCATE, CANCEL

# -- helpers ------------------------------------------------------------------------------


def job_count(url: str) -> int:
    with session_scope(url) as s:
        return int(s.scalar(select(func.count()).select_from(Job)) or 0)


def submit(client: FlaskClient, body: dict[str, Any]) -> Any:
    return client.post("/v1/jobs", json=body)


def advance(url: str, job_id: str, *states: JobState) -> None:
    """Walk a job along the lifecycle, as the workers would."""
    with session_scope(url) as s:
        cur = JobState(repo.get_job(s, job_id).state)
        for st in states:
            assert repo.transition(s, job_id, cur, st)
            cur = st


def foreign_job(url: str, package_uri: str) -> str:
    """A job of another project, made directly through the repository."""
    spec = JobSpec.model_validate(
        {"name": "theirs", "trainer": {"package_uri": package_uri, "module": "m"}}
    )
    with session_scope(url) as s:
        return repo.create_job(s, "other", spec).id


# -- submission ---------------------------------------------------------------------------


def test_submit_queues_job_and_enqueues_allocate(client, package_uri, spec, enqueued):
    resp = submit(client, spec(package_uri))
    assert resp.status_code == 202, resp.get_json()
    job = resp.get_json()
    assert job["state"] == "QUEUED"
    assert job["project_id"] == "local"
    assert job["id"].startswith("job-")
    assert resp.headers["Location"] == f"/v1/jobs/{job['id']}"
    assert resp.headers["X-Request-Id"].startswith("req-")
    default_uri = f"local://projects/local/models/{job['id']}/"
    assert job["output"]["model_uri"] == default_uri
    assert job["spec"]["output"]["model_uri"] == default_uri
    assert job["spec"]["resources"]["flavor"] == "local.small"  # the default, made explicit
    assert enqueued.calls == [(ALLOCATE, job["id"])]
    again = client.get(f"/v1/jobs/{job['id']}").get_json()
    assert again["spec"] == job["spec"]


def test_submit_keeps_given_model_uri(client, package_uri, spec):
    body = spec(package_uri, output={"model_uri": "local://projects/local/my/model"})
    job = submit(client, body).get_json()
    assert job["output"]["model_uri"] == "local://projects/local/my/model/"


def test_default_output_prefix_is_the_jobs_own(client, package_uri, spec):
    a, b = (submit(client, spec(package_uri)).get_json() for _ in range(2))
    for job in (a, b):
        assert job["output"]["model_uri"] == f"local://projects/local/models/{job['id']}/"
    assert a["output"]["model_uri"] != b["output"]["model_uri"]


def test_output_prefix_with_objects_under_it_is_409(
    client, package_uri, spec, store, error_of, db_url, enqueued
):
    store.put("projects/local/out/theirs/saved_model.pb", b"model")
    for uri in ("local://projects/local/out/theirs", "local://projects/local/out/theirs/"):
        err = error_of(submit(client, spec(package_uri, output={"model_uri": uri})), 409)
        assert err["code"] == "output_exists"
        assert err["details"]["model_uri"] == "local://projects/local/out/theirs/"
        assert err["details"]["objects"] == 1
    # a prefix above it shares that object too
    err = error_of(
        submit(client, spec(package_uri, output={"model_uri": "local://projects/local/out/"})),
        409,
        "output_exists",
    )
    assert err["details"]["model_uri"] == "local://projects/local/out/"
    assert job_count(db_url) == 0 and enqueued.calls == []
    assert store.get("projects/local/out/theirs/saved_model.pb") == b"model"
    # beside it is new
    new = {"model_uri": "local://projects/local/out/mine/"}
    assert submit(client, spec(package_uri, output=new)).status_code == 202


def test_an_output_prefix_another_job_holds_is_409(client, package_uri, spec, error_of, db_url):
    uri = "local://projects/local/models/shared/"
    first = submit(client, spec(package_uri, output={"model_uri": uri})).get_json()
    for taken in (uri, uri.rstrip("/"), uri + "sub/", "local://projects/local/"):
        resp = submit(client, spec(package_uri, output={"model_uri": taken}))
        if taken == "local://projects/local/":
            error_of(resp, 422, "validation_failed")  # the area itself is never a prefix
            continue
        err = error_of(resp, 409, "output_exists")
        assert err["details"]["job_id"] == first["id"]
    assert job_count(db_url) == 1
    # prefixes beside it are free, including one that is only a string prefix of it
    beside = submit(client, spec(package_uri, output={"model_uri": "local://projects/local/x/"}))
    assert beside.status_code == 202
    string_prefix = {"model_uri": "local://projects/local/models/sh"}  # models/sh/, no parent
    assert submit(client, spec(package_uri, output=string_prefix)).status_code == 202
    # a succeeded job's model is there: still held; a failed one's upload was removed: free
    advance(db_url, first["id"], JobState.ALLOCATING, JobState.FAILED)
    again = submit(client, spec(package_uri, output={"model_uri": uri + "sub/"})).get_json()
    advance(db_url, again["id"], JobState.ALLOCATING, JobState.PROVISIONING, JobState.RUNNING)
    advance(db_url, again["id"], JobState.EXPORTING, JobState.SUCCEEDED)
    err = error_of(submit(client, spec(package_uri, output={"model_uri": uri})), 409)
    assert err["details"]["job_id"] == again["id"]


def test_two_submissions_racing_for_one_prefix_one_wins(
    app, package_uri, spec, db_url, monkeypatch
):
    """Both pass the early check; the reservation under the lock lets only one insert."""
    real_create = repo.create_job
    both_checked = threading.Barrier(2)

    def create_job(*args: Any, **kwargs: Any) -> Any:
        try:
            both_checked.wait(timeout=2)  # without the lock both get here, then both insert
        except threading.BrokenBarrierError:
            pass  # the other one waits for our transaction: it checks after we commit
        return real_create(*args, **kwargs)

    monkeypatch.setattr(repo, "create_job", create_job)
    body = spec(package_uri, output={"model_uri": "local://projects/local/models/race/"})
    statuses: list[int] = []

    def post() -> None:
        statuses.append(app.test_client().post("/v1/jobs", json=body).status_code)

    threads = [threading.Thread(target=post) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert sorted(statuses) == [202, 409]
    assert job_count(db_url) == 1


def test_parameter_servers_without_two_workers_are_422_and_change_nothing(
    client, package_uri, spec, error_of, db_url, enqueued
):
    before = client.get("/v1/quotas").get_json()
    for workers in (1, None):
        resources = {"parameter_servers": 1} | ({"workers": workers} if workers else {})
        err = error_of(submit(client, spec(package_uri, resources=resources)), 422)
        assert err["code"] == "validation_failed", err
        (field,) = err["details"]["fields"]
        assert field["field"] == "resources", err
        assert "parameter_servers needs workers >= 2" in field["message"], err
    assert job_count(db_url) == 0 and enqueued.calls == []
    assert client.get("/v1/quotas").get_json() == before
    # with two workers or more, a job of parameter servers is taken: all its servers counted
    resp = submit(client, spec(package_uri, resources={"workers": 3, "parameter_servers": 2}))
    assert resp.status_code == 202, resp.get_json()
    assert resp.get_json()["spec"]["resources"]["parameter_servers"] == 2
    assert job_count(db_url) == 1


def test_the_values_a_stored_spec_repeats_are_accepted(client, package_uri, spec):
    """A spec read back from GET (workers 1, no parameter servers, register_as null,
    type training) may be submitted again."""
    job = submit(client, spec(package_uri)).get_json()
    again = dict(job["spec"])
    again["output"] = {"model_uri": None, "register_as": None}
    resp = submit(client, again)
    assert resp.status_code == 202, resp.get_json()
    assert resp.get_json()["spec"]["resources"] == job["spec"]["resources"]


def test_env_values_are_never_shown(client, package_uri, spec, db_url):
    secret = "s3cr3t-token-value"
    resp = submit(client, spec(package_uri, env={"API_TOKEN": secret, "MODE": "fast"}))
    job = resp.get_json()
    assert job["spec"]["env"] == {"API_TOKEN": "***", "MODE": "***"}
    job_id = job["id"]
    with session_scope(db_url) as s:  # the workers read the real values from the row
        assert repo.get_job(s, job_id).spec["env"] == {"API_TOKEN": secret, "MODE": "fast"}
    shown = [
        resp,
        client.get("/v1/jobs"),
        client.get(f"/v1/jobs/{job_id}"),
        client.get(f"/v1/jobs/{job_id}/events"),
        client.post(f"/v1/jobs/{job_id}/cancel"),
        client.get("/v1/jobs?state=CANCELLED"),
    ]
    for r in shown:
        assert r.status_code in (200, 202)
        assert secret not in r.get_data(as_text=True) and "fast" not in r.get_data(as_text=True)
    listed = client.get("/v1/jobs").get_json()["jobs"][0]
    assert listed["spec"]["env"] == {"API_TOKEN": "***", "MODE": "***"}


def test_submit_survives_a_dead_broker(client, package_uri, spec, enqueued, db_url):
    enqueued.fail = True
    resp = submit(client, spec(package_uri))
    assert resp.status_code == 202
    assert resp.get_json()["state"] == "QUEUED"
    assert job_count(db_url) == 1


BAD_FIELDS = [
    (lambda b: b.update(name="no spaces!"), "name"),
    (lambda b: b["trainer"].update(module="1bad"), "trainer.module"),
    (lambda b: b["trainer"].update(package_uri="http://x/y.tgz"), "trainer.package_uri"),
    (
        lambda b: b["trainer"].update(package_uri="local://projects/local/../x"),
        "trainer.package_uri",
    ),
    (lambda b: b["trainer"].update(args=["ok", "bad\x00"]), "trainer.args"),
    (lambda b: b.update(max_runtime_seconds=0), "max_runtime_seconds"),
    (lambda b: b.update(bogus=1), "bogus"),
    (lambda b: b.update(resources={"workers": 0}), "resources.workers"),
    (lambda b: b.update(resources={"flavor": "local.small", "gpus": 1}), "resources"),
    (lambda b: b.update(env={"STACKML_JOB_ID": "x"}), "env"),
    (lambda b: b.pop("trainer"), "trainer"),
    (lambda b: b.update(type="inference"), "type"),
    # semantic checks, after the schema
    (lambda b: b.update(runtime={"version": "9.9"}), "runtime"),
    (lambda b: b.update(resources={"flavor": "huge"}), "resources.flavor"),
    (lambda b: b.update(resources={"gpus": 1}), "resources.gpus"),
    (
        lambda b: b["trainer"].update(package_uri="local://projects/local/staging/none.tgz"),
        "trainer.package_uri",
    ),
    (
        lambda b: b["trainer"].update(package_uri="local://projects/other/pkg.tgz"),
        "trainer.package_uri",
    ),
    (lambda b: b["trainer"].update(package_uri="swift://bucket/pkg.tgz"), "trainer.package_uri"),
    (
        lambda b: b.update(inputs={"data_uri": "local://projects/local/data/none/"}),
        "inputs.data_uri",
    ),
    (lambda b: b.update(output={"model_uri": "local://elsewhere/model/"}), "output.model_uri"),
    (lambda b: b.update(output={"model_uri": "local://projects/local//m/"}), "output.model_uri"),
    # shared prefixes: the project's area, its staging area (packages), the models area, a
    # job's own default prefix
    (lambda b: b.update(output={"model_uri": "local://projects/local"}), "output.model_uri"),
    (
        lambda b: b.update(output={"model_uri": "local://projects/local/staging"}),
        "output.model_uri",
    ),
    (
        lambda b: b.update(output={"model_uri": "local://projects/local/staging/abc/"}),
        "output.model_uri",
    ),
    (
        lambda b: b.update(output={"model_uri": "local://projects/local/staging/new/"}),
        "output.model_uri",
    ),
    (
        lambda b: b.update(output={"model_uri": "local://projects/local/models/"}),
        "output.model_uri",
    ),
    (
        lambda b: b.update(output={"model_uri": "local://projects/local/models/job-0123abcd/x/"}),
        "output.model_uri",
    ),
    (
        lambda b: b["trainer"].update(package_uri="local://projects/local//p.tgz"),
        "trainer.package_uri",
    ),
]


@pytest.mark.parametrize(("mutate", "path"), BAD_FIELDS)
def test_bad_field_is_422_with_its_path(
    client, package_uri, spec, error_of, db_url, enqueued, mutate, path
):
    body = spec(package_uri)
    mutate(body)
    err = error_of(submit(client, body), 422, "validation_failed")
    fields = [f["field"] for f in err["details"]["fields"]]
    assert path in fields, fields
    assert all(set(f) == {"field", "message"} for f in err["details"]["fields"])
    assert job_count(db_url) == 0
    assert enqueued.calls == []


def test_every_semantic_problem_is_listed(client, package_uri, spec, error_of):
    body = spec(package_uri, runtime={"version": "1.0"}, resources={"flavor": "huge"})
    err = error_of(submit(client, body), 422)
    assert {f["field"] for f in err["details"]["fields"]} == {"runtime", "resources.flavor"}


def test_secret_values_are_not_echoed(client, package_uri, spec):
    body = spec(package_uri, env={"TOKEN": "hunter2\x01"})
    resp = submit(client, body)
    assert resp.status_code == 422
    assert "hunter2" not in resp.get_data(as_text=True)


def test_data_uri_may_name_a_prefix(client, package_uri, spec, store):
    store.put("projects/local/data/mnist/train.csv", b"1,2\n")
    body = spec(package_uri, inputs={"data_uri": "local://projects/local/data/mnist"})
    assert submit(client, body).status_code == 202


@pytest.mark.parametrize(
    ("data", "ctype", "status", "code"),
    [
        (b"{not json", "application/json", 400, "invalid_request"),
        (b'{"name": NaN}', "application/json", 400, "invalid_request"),
        (b"[1, 2]", "application/json", 400, "invalid_request"),
        (b"\xff\xfe\x00", "application/json", 400, "invalid_request"),
        (b"", "application/json", 400, "invalid_request"),
        (b"name=x", "application/x-www-form-urlencoded", 415, "unsupported_media_type"),
        (b"{}", "text/plain", 415, "unsupported_media_type"),
    ],
)
def test_malformed_requests(client, error_of, db_url, data, ctype, status, code):
    resp = client.post("/v1/jobs", data=data, content_type=ctype)
    error_of(resp, status, code)
    assert job_count(db_url) == 0


def test_body_too_large_is_413(client, package_uri, spec, error_of, db_url, settings):
    body = spec(package_uri, labels={"pad": "x"}, env={"PAD": "y" * settings.max_body_bytes})
    resp = client.post("/v1/jobs", data=json.dumps(body), content_type="application/json")
    error_of(resp, 413, "payload_too_large")
    assert job_count(db_url) == 0


# -- the error shape everywhere -----------------------------------------------------------


def test_unknown_route_and_method(client, error_of):
    error_of(client.get("/v1/nothing-here"), 404, "not_found")
    err = client.delete("/v1/jobs")
    error_of(err, 405, "method_not_allowed")
    assert "GET" in err.headers["Allow"]


def test_unexpected_exception_is_500_without_traceback(
    settings, db_url, enqueued, error_of, caplog
):
    from service.api import create_app

    app = create_app(settings, enqueue=enqueued)

    @app.get("/boom")
    def boom() -> str:
        raise RuntimeError("secret internals at /etc/passwd")

    resp = app.test_client().get("/boom")
    err = error_of(resp, 500, "internal_error")
    text = resp.get_data(as_text=True)
    assert "secret internals" not in text and "Traceback" not in text
    assert err["request_id"] in caplog.text  # logged server-side under the same id


def test_every_response_has_a_request_id(client, package_uri, spec):
    for resp in (client.get("/healthz"), client.get("/v1/jobs"), submit(client, spec(package_uri))):
        assert resp.headers["X-Request-Id"]
    a, b = client.get("/healthz"), client.get("/healthz")
    assert a.headers["X-Request-Id"] != b.headers["X-Request-Id"]


# -- listing ------------------------------------------------------------------------------


def test_list_pagination_round_trip(client, package_uri, spec):
    ids = [submit(client, spec(package_uri, name=f"j{i}")).get_json()["id"] for i in range(5)]
    seen: list[str] = []
    marker = None
    pages = 0
    while True:
        q = "/v1/jobs?limit=2" + (f"&marker={marker}" if marker else "")
        body = client.get(q).get_json()
        seen += [j["id"] for j in body["jobs"]]
        pages += 1
        marker = body["next"]
        if marker is None:
            break
    assert seen == list(reversed(ids))  # newest first, each once
    assert pages == 3


def test_list_filters(client, package_uri, spec, db_url):
    a = submit(client, spec(package_uri, name="a", labels={"team": "vision"})).get_json()["id"]
    b = submit(client, spec(package_uri, name="b", labels={"team": "nlp"})).get_json()["id"]
    advance(db_url, b, JobState.ALLOCATING)

    def ids(q: str) -> list[str]:
        return [j["id"] for j in client.get(q).get_json()["jobs"]]

    assert ids("/v1/jobs?state=QUEUED") == [a]
    assert ids("/v1/jobs?state=allocating") == [b]
    assert set(ids("/v1/jobs?state=QUEUED,ALLOCATING")) == {a, b}
    assert set(ids("/v1/jobs?state=QUEUED&state=ALLOCATING")) == {a, b}
    assert ids("/v1/jobs?label=team=nlp") == [b]
    assert ids("/v1/jobs?label=team=nlp&state=QUEUED") == []


@pytest.mark.parametrize(
    "query",
    [
        "state=SLEEPING",
        "limit=0",
        "limit=201",
        "limit=x",
        "label=novalue",
        "label==v",
        "marker=job-doesnotexist",
    ],
)
def test_list_bad_query_is_400(client, error_of, query):
    error_of(client.get(f"/v1/jobs?{query}"), 400, "invalid_request")


# -- project scoping ----------------------------------------------------------------------


def test_other_projects_jobs_are_404(client, package_uri, db_url, error_of):
    theirs = foreign_job(db_url, package_uri)
    for resp in (
        client.get(f"/v1/jobs/{theirs}"),
        client.post(f"/v1/jobs/{theirs}/cancel"),
        client.delete(f"/v1/jobs/{theirs}"),
        client.get(f"/v1/jobs/{theirs}/logs"),
        client.get(f"/v1/jobs/{theirs}/events"),
        client.get(f"/v1/jobs/{theirs}/metrics"),
    ):
        error_of(resp, 404, "not_found")
    assert client.get("/v1/jobs").get_json()["jobs"] == []
    error_of(client.get(f"/v1/jobs?marker={theirs}"), 400)
    error_of(client.get("/v1/jobs/job-unknown"), 404, "not_found")


# -- cancel and delete --------------------------------------------------------------------


def test_cancel_queued_job_finishes_at_once(client, package_uri, spec, enqueued):
    job_id = submit(client, spec(package_uri)).get_json()["id"]
    resp = client.post(f"/v1/jobs/{job_id}/cancel")
    assert resp.status_code == 202
    body = resp.get_json()
    assert body["state"] == "CANCELLED"
    assert body["cancel_requested"] is True
    assert body["finished_at"]
    assert (CANCEL, job_id) not in enqueued.calls
    events = client.get(f"/v1/jobs/{job_id}/events").get_json()["events"]
    assert [(e["from"], e["to"]) for e in events] == [
        (None, "QUEUED"),
        ("QUEUED", "CANCELLING"),
        ("CANCELLING", "CANCELLED"),
    ]


def test_cancel_running_job_hands_teardown_to_workers(
    client, package_uri, spec, enqueued, db_url, error_of
):
    job_id = submit(client, spec(package_uri)).get_json()["id"]
    advance(db_url, job_id, JobState.ALLOCATING, JobState.PROVISIONING, JobState.RUNNING)
    resp = client.post(f"/v1/jobs/{job_id}/cancel")
    assert resp.status_code == 202
    assert resp.get_json()["state"] == "CANCELLING"
    assert enqueued.calls[-1] == (CANCEL, job_id)
    again = client.post(f"/v1/jobs/{job_id}/cancel")  # idempotent while cancelling
    assert again.status_code == 202 and again.get_json()["state"] == "CANCELLING"
    assert enqueued.calls.count((CANCEL, job_id)) == 1
    advance(db_url, job_id, JobState.CANCELLED)
    err = error_of(client.post(f"/v1/jobs/{job_id}/cancel"), 409, "job_terminal")
    assert err["details"]["state"] == "CANCELLED"


def test_cancel_with_dead_broker_still_accepted(client, package_uri, spec, enqueued, db_url):
    job_id = submit(client, spec(package_uri)).get_json()["id"]
    advance(db_url, job_id, JobState.ALLOCATING)
    enqueued.fail = True
    resp = client.post(f"/v1/jobs/{job_id}/cancel")
    assert resp.status_code == 202 and resp.get_json()["state"] == "CANCELLING"


def test_delete_rules(client, package_uri, spec, db_url, error_of):
    job_id = submit(client, spec(package_uri)).get_json()["id"]
    advance(db_url, job_id, JobState.ALLOCATING)
    with session_scope(db_url) as s:
        s.add(
            Resource(
                job_id=job_id,
                project_id="local",
                backend="sandbox",
                name=f"{job_id}-0",
                flavor="local.small",
                state=ResourceState.ACTIVE.value,
            )
        )
    error_of(client.delete(f"/v1/jobs/{job_id}"), 409, "job_not_terminal")
    advance(db_url, job_id, JobState.FAILED)
    err = error_of(client.delete(f"/v1/jobs/{job_id}"), 409, "teardown_pending")
    assert err["details"]["resources"] == [f"{job_id}-0"]
    with session_scope(db_url) as s:
        for r in repo.resources(s, job_id):
            r.state = ResourceState.DELETED.value
    resp = client.delete(f"/v1/jobs/{job_id}")
    assert resp.status_code == 204 and resp.data == b""
    error_of(client.get(f"/v1/jobs/{job_id}"), 404)
    assert job_count(db_url) == 0


def test_delete_of_a_job_still_holding_its_trust_hands_it_to_the_teardown(
    client, package_uri, spec, db_url, error_of, enqueued
):
    """The API never deletes a trust itself: the teardown must first look for servers under
    the job's tag through it (nothing can after). It gets a teardown, the caller a 409."""
    job_id = submit(client, spec(package_uri)).get_json()["id"]
    advance(db_url, job_id, JobState.ALLOCATING, JobState.FAILED)
    with session_scope(db_url) as s:
        repo.get_job(s, job_id).trust_id = "trust-1"
    enqueued.calls.clear()
    err = error_of(client.delete(f"/v1/jobs/{job_id}"), 409, "teardown_pending")
    assert err["details"] == {"trust_held": True}
    assert enqueued.calls == [("stackml.teardown", job_id)]
    assert job_count(db_url) == 1  # nothing deleted
    with session_scope(db_url) as s:
        repo.get_job(s, job_id).trust_id = None  # the teardown let it go
    assert client.delete(f"/v1/jobs/{job_id}").status_code == 204


# -- logs, events, metrics ----------------------------------------------------------------


def test_logs_by_offset(client, package_uri, spec, db_url, error_of):
    job_id = submit(client, spec(package_uri)).get_json()["id"]
    with session_scope(db_url) as s:
        repo.append_log(s, job_id, 0, b"hello ")
        repo.append_log(s, job_id, 6, b"world\n")
    resp = client.get(f"/v1/jobs/{job_id}/logs")
    assert resp.status_code == 200
    assert resp.mimetype == "text/plain"
    assert resp.data == b"hello world\n"
    assert resp.headers["X-Next-Offset"] == "12"
    assert resp.headers["X-Job-State"] == "QUEUED"
    part = client.get(f"/v1/jobs/{job_id}/logs?offset=3&limit=4")
    assert part.data == b"lo w" and part.headers["X-Next-Offset"] == "7"
    end = client.get(f"/v1/jobs/{job_id}/logs?offset=12")
    assert end.data == b"" and end.headers["X-Next-Offset"] == "12"
    for q in ("offset=-1", "offset=x", "follow=maybe", "follow=true&timeout=0"):
        error_of(client.get(f"/v1/jobs/{job_id}/logs?{q}"), 400, "invalid_request")


def replica_server(s: Any, job_id: str, name: str) -> int:
    """A worker server row of `job_id` (its resource id)."""
    r = Resource(
        job_id=job_id,
        project_id="p",
        backend="sandbox",
        role="worker",
        name=f"stackml-{job_id}-{name}",
        flavor="cpu.small",
        state=ResourceState.ACTIVE.value,
    )
    s.add(r)
    s.flush()
    return int(r.id)


def test_a_replicas_log_is_its_own_and_a_replica_the_job_lacks_is_400(
    client, package_uri, spec, db_url, error_of
):
    body = spec(package_uri)
    body["resources"] = {"workers": 3}
    job_id = submit(client, body).get_json()["id"]

    def server(s: Any, name: str) -> int:
        return replica_server(s, job_id, name)

    with session_scope(db_url) as s:
        repo.append_log(s, job_id, 0, b"chief says\n")
        rid = {k: server(s, f"worker-{k}") for k in (1, 2)}
        assert repo.append_replica_log(s, job_id, 1, rid[1], 0, b"worker one, ")
        assert not repo.append_replica_log(s, job_id, 1, rid[1], 0, b"worker one, ")  # again
        assert repo.append_replica_log(s, job_id, 1, rid[1], 12, b"goes on\n")
        # a new server for replica 2 after a restart: its file starts at 0, its log follows
        assert repo.append_replica_log(s, job_id, 2, rid[2], 0, b"first run\n")
        assert repo.append_replica_log(s, job_id, 2, server(s, "r1-worker-2"), 0, b"second run\n")
    assert client.get(f"/v1/jobs/{job_id}/logs").data == b"chief says\n"
    assert client.get(f"/v1/jobs/{job_id}/logs?replica=chief").data == b"chief says\n"
    one = client.get(f"/v1/jobs/{job_id}/logs?replica=worker-1")
    assert one.data == b"worker one, goes on\n" and one.headers["X-Next-Offset"] == "20"
    two = client.get(f"/v1/jobs/{job_id}/logs?replica=worker-2&offset=10")
    assert two.data == b"second run\n"
    for bad in ("worker-3", "worker-0", "worker-01", "ps-0", "Chief", "worker-"):
        err = error_of(client.get(f"/v1/jobs/{job_id}/logs?replica={bad}"), 400, "invalid_request")
        assert "chief, worker-1 .. worker-2" in err["message"], err
    alone = submit(client, spec(package_uri)).get_json()["id"]
    err = error_of(client.get(f"/v1/jobs/{alone}/logs?replica=worker-1"), 400, "invalid_request")
    assert "one server (chief)" in err["message"], err


def test_a_replicas_metrics_and_events_are_its_own(client, package_uri, spec, db_url, error_of):
    body = spec(package_uri)
    body["resources"] = {"workers": 2}
    job_id = submit(client, body).get_json()["id"]
    line = b'{"stackml_metric": 1, "step": %d, "loss": %s}\n'
    with session_scope(db_url) as s:
        repo.append_log(s, job_id, 0, line % (1, b"0.9"), max_points=10)
        rid = replica_server(s, job_id, "worker-1")
        # a metric line cut between two pulls is whole once its end arrives
        first = line % (1, b"0.5") + line % (2, b"0.4")
        assert repo.append_replica_log(s, job_id, 1, rid, 0, first[:-10], max_points=10)
        assert repo.append_replica_log(
            s, job_id, 1, rid, len(first) - 10, first[-10:], max_points=10
        )
        # replica 1 holds at most 10 points of its own; the chief's 1 does not count
        many = b"".join(line % (k, b"0.1") for k in range(3, 20))
        assert repo.append_replica_log(s, job_id, 1, rid, len(first), many, max_points=10)
        repo.add_event(s, job_id, "poll", "replica worker-1 exited 0: done", replica=1)
    chief = client.get(f"/v1/jobs/{job_id}/metrics").get_json()["metrics"]["loss"]
    assert [(p["step"], p["value"]) for p in chief] == [(1, 0.9)]
    assert client.get(f"/v1/jobs/{job_id}/metrics?replica=chief").get_json()["metrics"] == {
        "loss": chief
    }
    one = client.get(f"/v1/jobs/{job_id}/metrics?replica=worker-1").get_json()["metrics"]["loss"]
    assert [(p["step"], p["value"]) for p in one[:2]] == [(1, 0.5), (2, 0.4)]
    assert len(one) == 10
    assert client.get(f"/v1/jobs/{job_id}").get_json()["metrics"] == {"loss": 0.9}
    events = client.get(f"/v1/jobs/{job_id}/events?replica=worker-1").get_json()["events"]
    assert [(e["kind"], e["replica"]) for e in events] == [
        ("metrics_capped", "worker-1"),
        ("poll", "worker-1"),
    ]
    assert "replica worker-1's log holds max_metric_points=10" in events[0]["message"]
    everything = client.get(f"/v1/jobs/{job_id}/events").get_json()["events"]
    assert everything[0]["replica"] is None and len(everything) == len(events) + 1
    for what in ("metrics", "events"):
        err = error_of(client.get(f"/v1/jobs/{job_id}/{what}?replica=worker-2"), 400)
        assert "chief, worker-1" in err["message"]


def test_follow_streams_until_terminal(client, package_uri, spec, db_url):
    job_id = submit(client, spec(package_uri)).get_json()["id"]
    advance(db_url, job_id, JobState.ALLOCATING, JobState.PROVISIONING, JobState.RUNNING)
    with session_scope(db_url) as s:
        repo.append_log(s, job_id, 0, b"line 0\n")
    chunks = [f"line {i}\n".encode() for i in range(1, 6)]

    def trainer() -> None:
        off = 7
        for c in chunks:
            time.sleep(0.03)
            with session_scope(db_url) as s:
                off = repo.append_log(s, job_id, off, c)
        advance(db_url, job_id, JobState.EXPORTING, JobState.SUCCEEDED)

    t = threading.Thread(target=trainer)
    started = time.monotonic()
    resp = client.get(f"/v1/jobs/{job_id}/logs?follow=true&offset=2&timeout=20", buffered=False)
    t.start()  # the headers are made; the body is streamed as the log grows
    assert resp.status_code == 200
    assert resp.headers["X-Job-State"] == "RUNNING"
    assert "Content-Length" not in resp.headers
    got = b"".join(resp.response)  # type: ignore[arg-type]
    resp.close()
    t.join()
    assert got == b"ne 0\n" + b"".join(chunks)
    assert time.monotonic() - started < 10


def test_follow_stops_at_its_timeout(client, package_uri, spec):
    job_id = submit(client, spec(package_uri)).get_json()["id"]
    started = time.monotonic()
    resp = client.get(f"/v1/jobs/{job_id}/logs?follow=1&timeout=0.2")
    assert resp.status_code == 200 and resp.data == b""
    assert 0.15 < time.monotonic() - started < 5


def test_events_timeline(client, package_uri, spec, db_url):
    job_id = submit(client, spec(package_uri)).get_json()["id"]
    advance(db_url, job_id, JobState.ALLOCATING)
    events = client.get(f"/v1/jobs/{job_id}/events").get_json()["events"]
    assert [(e["kind"], e["from"], e["to"]) for e in events] == [
        ("transition", None, "QUEUED"),
        ("transition", "QUEUED", "ALLOCATING"),
    ]
    assert events[0]["message"] == "job submitted"
    assert events[0]["at"].endswith("Z")


def test_metrics_series(client, package_uri, spec, db_url):
    job_id = submit(client, spec(package_uri)).get_json()["id"]
    lines = (
        b'{"stackml_metric": 1, "epoch": 0, "loss": 0.9}\nnoise\n'
        b'{"stackml_metric": 1, "epoch": 1, "loss": 0.5, "acc": 0.8}\n'
    )
    with session_scope(db_url) as s:
        repo.append_log(s, job_id, 0, lines)
    m = client.get(f"/v1/jobs/{job_id}/metrics").get_json()["metrics"]
    assert [p["value"] for p in m["loss"]] == [0.9, 0.5]
    assert [p["epoch"] for p in m["loss"]] == [0, 1]
    assert m["acc"][0]["value"] == 0.8 and m["acc"][0]["step"] is None
    assert client.get(f"/v1/jobs/{job_id}").get_json()["metrics"] == {"loss": 0.5, "acc": 0.8}


# -- health -------------------------------------------------------------------------------


def test_healthz(client):
    resp = client.get("/healthz")
    assert resp.status_code == 200 and resp.get_json() == {"status": "ok"}


def test_readyz_names_the_failing_part(client, error_of):
    resp = client.get("/readyz")
    err = error_of(resp, 503, "not_ready")
    assert err["details"]["failing"] == ["broker"]
    assert err["details"]["checks"]["database"] == "ok"
    assert err["details"]["checks"]["store"] == "ok"
    assert int(resp.headers["Retry-After"]) > 0


def test_readyz_ok(settings: Settings, db_url, enqueued):
    from service.api import create_app

    app: Flask = create_app(
        settings.model_copy(update={"redis_url": "memory://"}), enqueue=enqueued
    )
    resp = app.test_client().get("/readyz")
    assert resp.status_code == 200
    assert resp.get_json()["checks"] == {"database": "ok", "broker": "ok", "store": "ok"}


def test_noauth_refuses_a_public_bind(settings):
    from service.api import create_app
    from service.api.auth import ConfigurationError

    with pytest.raises(ConfigurationError):
        create_app(settings.model_copy(update={"host": "0.0.0.0"}), enqueue=lambda t, j: None)


def test_api_timestamps_always_carry_microseconds_so_they_sort_as_times() -> None:
    from datetime import UTC, datetime

    from service.db.models import iso

    whole = datetime(2026, 11, 1, 12, 0, 36, tzinfo=UTC)
    later = whole.replace(microsecond=500_000)
    assert iso(whole) == "2026-11-01T12:00:36.000000Z"
    assert iso(whole.replace(tzinfo=None)) == "2026-11-01T12:00:36.000000Z"  # SQLite: UTC
    assert sorted([iso(later), iso(whole)]) == [iso(whole), iso(later)]
    assert iso(None) is None
