"""POST /v1/jobs with `output.gate` on the real SQLite database and the local store: a valid
gate is stored with its defaults; a gate without register_as, a holdout that does not exist,
one outside the project or in the models/staging areas, and bad gate fields are 422 naming the
field, and store nothing; the same checks hold for a schedule's job template."""

from __future__ import annotations

from typing import Any

from flask.testing import FlaskClient

from service.backends.storage.local import LocalStore
from tests.unit.conftest import PROJECT
from tests.unit.test_api_jobs import job_count

HOLDOUT = f"projects/{PROJECT}/data/holdout/"


def _gate(**over: Any) -> dict[str, Any]:
    g: dict[str, Any] = {"metric": "rmse", "threshold": 0.5, "holdout_uri": f"local://{HOLDOUT}"}
    g.update(over)
    return g


def test_a_gate_is_stored_with_its_defaults(
    client: FlaskClient, package_uri: str, spec: Any, store: LocalStore
) -> None:
    store.put(HOLDOUT + "part-0.csv", b"1,2,3\n")
    body = spec(
        package_uri,
        output={"register_as": "demo", "gate": _gate(holdout_uri=f"local://{HOLDOUT}".rstrip("/"))},
    )
    r = client.post("/v1/jobs", json=body)
    assert r.status_code == 202, r.get_json()
    gate = r.get_json()["spec"]["output"]["gate"]
    assert gate == {
        "metric": "rmse",
        "direction": "minimize",
        "threshold": 0.5,
        "min_improvement": None,
        "holdout_uri": f"local://{HOLDOUT}",  # taken as a prefix
        "label": "default",
        "promote": True,
    }


def test_bad_gates_are_422_naming_the_field_and_store_nothing(
    client: FlaskClient,
    package_uri: str,
    spec: Any,
    store: LocalStore,
    db_url: str,
    error_of: Any,
) -> None:
    store.put(HOLDOUT + "part-0.csv", b"1,2,3\n")
    store.put(f"projects/{PROJECT}/models/old/h.csv", b"1,2\n")
    store.put("projects/other/data/h.csv", b"1,2\n")
    cases = [
        ({"gate": _gate()}, "output.gate", "register_as"),
        (
            {
                "register_as": "demo",
                "gate": _gate(holdout_uri=f"local://projects/{PROJECT}/data/none/"),
            },
            "output.gate.holdout_uri",
            "nothing stored",
        ),
        (
            {"register_as": "demo", "gate": _gate(holdout_uri="local://projects/other/data/")},
            "output.gate.holdout_uri",
            "inside this project's area",
        ),
        (
            {
                "register_as": "demo",
                "gate": _gate(holdout_uri=f"local://projects/{PROJECT}/models/old/"),
            },
            "output.gate.holdout_uri",
            "a trainer must not be able to write",
        ),
        (
            {"register_as": "demo", "gate": _gate(metric="accuracy", direction="minimize")},
            "output.gate.direction",
            "must be maximize",
        ),
        ({"register_as": "demo", "gate": _gate(threshold=None)}, "output.gate", "threshold"),
    ]
    for output, field, says in cases:
        err = error_of(client.post("/v1/jobs", json=spec(package_uri, output=output)), 422)
        assert err["code"] == "validation_failed"
        fields = {f["field"]: f["message"] for f in err["details"]["fields"]}
        assert field in fields, (output, fields)
        assert says in fields[field], fields
    assert job_count(db_url) == 0


def test_a_schedules_template_gets_the_same_gate_checks(
    client: FlaskClient, package_uri: str, spec: Any, error_of: Any
) -> None:
    body = {
        "name": "nightly",
        "cron": "0 3 * * *",
        "job": spec(
            package_uri,
            output={
                "register_as": "demo",
                "gate": _gate(holdout_uri=f"local://projects/{PROJECT}/data/none/"),
            },
        ),
    }
    err = error_of(client.post("/v1/schedules", json=body), 422, "validation_failed")
    assert [f["field"] for f in err["details"]["fields"]] == ["job.output.gate.holdout_uri"]
    assert client.get("/v1/schedules").get_json()["schedules"] == []


def test_a_job_is_not_deleted_while_its_gate_has_not_decided(
    client: FlaskClient,
    package_uri: str,
    spec: Any,
    store: LocalStore,
    db_url: str,
    error_of: Any,
) -> None:
    from service.db import evaluations
    from service.db import jobs as jobs_repo
    from service.db.models import ModelEvaluation
    from service.db.session import session_scope
    from workers.steps import register

    store.put(HOLDOUT + "part-0.csv", b"1,2,3\n")
    r = client.post(
        "/v1/jobs", json=spec(package_uri, output={"register_as": "demo", "gate": _gate()})
    )
    job_id = r.get_json()["id"]
    with session_scope(db_url) as s:
        job = jobs_repo.get_job(s, job_id)
        job.state = "SUCCEEDED"
        vid = register.register_job_output(s, job)
        assert vid is not None
    err = error_of(client.delete(f"/v1/jobs/{job_id}"), 409, "teardown_pending")
    assert err["details"] == {"evaluation_pending": True}
    assert "evaluation gate has not decided" in err["message"]
    with session_scope(db_url) as s:
        (ev,) = evaluations.of_version(s, vid)
        evaluations.conclude(s, ev, candidate=None, champion=None, rows=None, failure="test")
        assert s.get_one(ModelEvaluation, ev.id).reason == "evaluation_failed"
    assert client.delete(f"/v1/jobs/{job_id}").status_code == 204
