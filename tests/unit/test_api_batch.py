"""POST /v1/jobs with type batch_prediction through the Flask test client on a real SQLite
database and the local store: the label resolved once at submission and recorded, the format
inferred, every refusal (field named, nothing stored, nothing enqueued), 409 for an output
prefix in use, and a re-run of a failed run resuming its prefix (one server's manifest.json,
or the part manifests of a run over several servers that failed before its export merged
them)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from flask.testing import FlaskClient

from service import queue
from service.api.batch import OutputExists, check_output
from service.backends.storage.local import LocalStore
from service.db import registry as reg
from service.db.session import session_scope
from service.domain import batch as dom
from service.domain.states import JobState
from tests.unit.test_api_jobs import advance, job_count, submit

P = "local"
AREA = f"local://projects/{P}/"


def _model(client: FlaskClient, url: str, store: LocalStore, name: str = "demo") -> None:
    """A model with version 1 READY (labelled default) and version 2 CREATING."""
    store.put(f"projects/{P}/models/exported/saved_model.pb", b"pb")
    assert client.post("/v1/models", json={"name": name}).status_code == 201
    for _ in range(2):
        r = client.post(
            f"/v1/models/{name}/versions", json={"artifact_uri": AREA + "models/exported/"}
        )
        assert r.status_code == 202, r.get_json()
    with session_scope(url) as s:
        model = reg.find_model(s, P, name)
        assert reg.finish_version(s, reg.get_version(s, model, 1), checksums={}, signature={})
        reg.adopt_default(s, model, 1)


@pytest.fixture
def ready(client: FlaskClient, db_url: str, store: LocalStore) -> str:
    _model(client, db_url, store)
    store.put(f"projects/{P}/data/rows.jsonl", b"[1]\n[2]\n")
    store.put(f"projects/{P}/data/more/a.csv", b"1,2\n")
    return "demo"


def batch(**pred: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": "demo",
        "input_uris": [AREA + "data/rows.jsonl"],
        "output_prefix": AREA + "predictions/run1",
    }
    body.update(pred)
    return {"name": "b1", "type": "batch_prediction", "prediction": body}


def test_a_batch_job_records_the_version_its_label_resolved_to(
    client: FlaskClient, ready: str, enqueued: Any, db_url: str
) -> None:
    r = submit(client, batch())
    assert r.status_code == 202, r.get_json()
    job = r.get_json()
    assert job["type"] == "batch_prediction"
    pred = job["spec"]["prediction"]
    assert pred["format"] == "jsonl" and pred["label"] == "default" and pred["version"] is None
    assert pred["output_prefix"] == AREA + "predictions/run1/"
    assert "trainer" not in job["spec"] and "output" not in job["spec"]
    rec = job["output"]["prediction"]
    assert (rec["model"], rec["version"], rec["label"]) == ("demo", 1, "default")
    assert job["output"]["output_prefix"] == AREA + "predictions/run1/"
    assert enqueued.calls[-1] == (queue.ALLOCATE, job["id"])
    # the label moving later does not change the job: it was resolved once
    with session_scope(db_url) as s:
        model = reg.find_model(s, P, "demo")
        assert reg.finish_version(s, reg.get_version(s, model, 2), checksums={}, signature={})
    moved = client.put("/v1/models/demo/labels/default", json={"version": 2})
    assert moved.status_code == 200, moved.get_json()
    assert client.get(f"/v1/jobs/{job['id']}").get_json()["output"]["prediction"]["version"] == 1
    # what GET shows can be submitted again (to another prefix)
    again = {**job["spec"], "prediction": {**pred, "output_prefix": AREA + "predictions/run2/"}}
    del again["env"]
    assert submit(client, again).status_code == 202


REFUSALS = [
    ({"model": "nope"}, "prediction.model", "no model"),
    ({"label": "canary"}, "prediction.label", "no label"),
    ({"version": 2}, "prediction.version", "CREATING"),
    ({"version": 9}, "prediction.version", "no version 9"),
    ({"input_uris": [AREA + "data/absent.jsonl"]}, "prediction.input_uris.0", "nothing stored"),
    ({"input_uris": ["local://projects/other/data/x.jsonl"]}, "prediction.input_uris.0", "area"),
    ({"input_uris": [AREA + "data/more/"]}, "prediction.format", "cannot tell"),
    (
        {"input_uris": [AREA + "data/rows.jsonl", AREA + "data/more/a.csv"]},
        "prediction.format",
        "different formats",
    ),
    ({"output_prefix": AREA + "staging/x/"}, "prediction.output_prefix", "staging"),
    ({"output_prefix": AREA + "models/job-abc/"}, "prediction.output_prefix", "default"),
]


@pytest.mark.parametrize(("pred", "field", "why"), REFUSALS)
def test_refusals_name_the_field_and_store_nothing(
    client: FlaskClient, ready: str, db_url: str, enqueued: Any, error_of: Any, pred, field, why
) -> None:
    before = list(enqueued.calls)
    err = error_of(submit(client, batch(**pred)), 422, "validation_failed")
    problems = {f["field"]: f["message"] for f in err["details"]["fields"]}
    assert field in problems and why in problems[field], problems
    assert job_count(db_url) == 0 and enqueued.calls == before


@pytest.mark.parametrize(
    ("extra", "field"),
    [
        ({"trainer": {"package_uri": AREA + "staging/x/p.tar.gz", "module": "m"}}, "trainer"),
        ({"hyperparameters": {"lr": 1}}, "hyperparameters"),
        ({"output": {"model_uri": AREA + "models/x/"}}, "output"),
    ],
)
def test_a_training_field_on_a_batch_job_is_named(
    client: FlaskClient, ready: str, db_url: str, error_of: Any, extra, field
) -> None:
    err = error_of(submit(client, {**batch(), **extra}), 422, "validation_failed")
    assert [f["field"] for f in err["details"]["fields"]] == [field]
    assert job_count(db_url) == 0


def test_prediction_on_a_training_job_and_several_workers(
    client: FlaskClient, ready: str, db_url: str, error_of: Any, package_uri: str, spec: Any
) -> None:
    body = {**spec(package_uri), "prediction": batch()["prediction"]}
    err = error_of(submit(client, body), 422, "validation_failed")
    assert [f["field"] for f in err["details"]["fields"]] == ["prediction"]
    assert job_count(db_url) == 0
    # several servers are accepted (the shards are spread over them)
    r = submit(client, batch(max_workers=4))
    assert r.status_code == 202, r.get_json()
    assert r.get_json()["spec"]["prediction"]["max_workers"] == 4


def test_an_output_prefix_in_use_is_a_409(
    client: FlaskClient,
    ready: str,
    db_url: str,
    store: LocalStore,
    error_of: Any,
    package_uri: str,
    spec: Any,
) -> None:
    store.put(f"projects/{P}/predictions/full/x.txt", b"x")
    err = error_of(submit(client, batch(output_prefix=AREA + "predictions/full/")), 409)
    assert err["code"] == "output_exists" and err["details"]["field"] == "prediction.output_prefix"
    held = AREA + "predictions/deep/run1/"
    assert submit(client, batch(output_prefix=held)).status_code == 202
    # the same prefix and one above it: held by the job
    for uri in (held, AREA + "predictions/deep/"):
        err = error_of(submit(client, batch(output_prefix=uri)), 409, "output_exists")
        assert err["details"]["job_id"] and err["details"]["field"] == "prediction.output_prefix"
    # a training job's model_uri below it too, and the other way round
    train = spec(package_uri, output={"model_uri": held + "sub/"})
    err = error_of(submit(client, train), 409, "output_exists")
    assert err["details"]["field"] == "output.model_uri"
    assert submit(client, spec(package_uri, output={"model_uri": AREA + "m/x/"})).status_code == 202
    err = error_of(submit(client, batch(output_prefix=AREA + "m/x/y/")), 409, "output_exists")
    assert job_count(db_url) == 2


def test_a_failed_runs_prefix_is_resumed_by_the_same_request_only(
    client: FlaskClient, ready: str, db_url: str, store: LocalStore, error_of: Any
) -> None:
    first = submit(client, batch()).get_json()
    # the run wrote a manifest and a shard, then failed
    request = first["output"]["prediction"]["request"]
    shards = dom.plan_shards([2], 1)
    doc = dom.manifest("f" * 64, request, shards, {0: {"rows": 1, "errors": 0}})
    store.put(f"projects/{P}/predictions/run1/manifest.json", json.dumps(doc).encode())
    store.put(f"projects/{P}/predictions/run1/prediction.results-00000-of-00002", b"{}\n")
    err = error_of(submit(client, batch()), 409, "output_exists")  # still held: not finished
    advance(db_url, first["id"], JobState.FAILED)
    r = submit(client, batch())
    assert r.status_code == 202, r.get_json()
    assert r.get_json()["output"]["prediction"]["resumed"] is True
    events = client.get(f"/v1/jobs/{r.get_json()['id']}/events").get_json()["events"]
    assert any("resuming" in e["message"] for e in events)
    advance(db_url, r.get_json()["id"], JobState.FAILED)
    # another request (another format or shard_rows) is another run: refused
    err = error_of(submit(client, batch(shard_rows=5)), 409, "output_exists")
    assert "another request" in err["message"]


def _part(worker: int, workers: int, request: dict[str, Any]) -> bytes:
    """Worker k's part manifest of 4 one-row shards, shard k (its first) done."""
    shards = dom.plan_shards([4], 1)
    assert dom.owner(worker, workers) == worker
    done = {worker: {"rows": 1, "errors": 0}} if worker < len(shards) else {}
    return json.dumps(dom.manifest("f" * 64, request, shards, done)).encode()


def test_a_failed_run_over_several_servers_is_resumed_from_its_parts(
    client: FlaskClient, ready: str, db_url: str, store: LocalStore, error_of: Any
) -> None:
    """A run over W servers that failed before its export merged the parts has no
    manifest.json: its workers' part manifests name the request instead."""
    first = submit(client, batch(max_workers=2, shard_rows=1)).get_json()
    request = first["output"]["prediction"]["request"]
    run = f"projects/{P}/predictions/run1/"
    store.put(run + dom.part_manifest_name(0, 2), _part(0, 2, request))
    store.put(run + dom.part_manifest_name(1, 2), _part(1, 2, request))
    store.put(run + "prediction.results-00001-of-00004", b"{}\n")
    advance(db_url, first["id"], JobState.FAILED)
    # another request is refused: every part names the one it was computed for
    err = error_of(submit(client, batch(max_workers=2, shard_rows=5)), 409, "output_exists")
    assert "another request" in err["message"]
    r = submit(client, batch(max_workers=2, shard_rows=1))
    assert r.status_code == 202, r.get_json()
    assert r.get_json()["output"]["prediction"]["resumed"] is True
    advance(db_url, r.get_json()["id"], JobState.FAILED)

    # a part of another request among them, or one that is not JSON: refused
    other = {**request, "shard_rows": 5}
    store.put(run + dom.part_manifest_name(1, 2), _part(1, 2, other))
    err = error_of(submit(client, batch(max_workers=2, shard_rows=1)), 409, "output_exists")
    assert "another request" in err["message"]
    store.put(run + dom.part_manifest_name(1, 2), b"{not json")
    err = error_of(submit(client, batch(max_workers=2, shard_rows=1)), 409, "output_exists")
    assert "no readable manifest.worker-00001-of-00002.json" in err["message"]
    # once the export merged them, manifest.json is what counts (the parts may stay)
    merged = dom.merge_parts(
        {
            0: json.loads(_part(0, 2, request)),
            1: dom.manifest("f" * 64, request, dom.plan_shards([4], 1), {}),
        },
        2,
    )
    store.put(run + dom.MANIFEST, json.dumps(merged).encode())
    r = submit(client, batch(max_workers=2, shard_rows=1))
    assert r.status_code == 202, r.get_json()
    assert r.get_json()["output"]["prediction"]["resumed"] is True


def test_check_output_with_parts_only(store: LocalStore) -> None:
    request = {"model": "demo", "version": 1}
    uri = AREA + "predictions/parts/"
    run = f"projects/{P}/predictions/parts/"
    assert check_output(store, uri, request) is False  # empty
    store.put(run + dom.part_manifest_name(2, 3), _part(2, 3, request))
    assert check_output(store, uri, request) is True  # one part is enough
    with pytest.raises(OutputExists, match="another request"):
        check_output(store, uri, {**request, "version": 2})
    store.put(run + dom.part_manifest_name(0, 3), _part(0, 3, {**request, "version": 2}))
    with pytest.raises(OutputExists, match="another request"):
        check_output(store, uri, request)
    # shards without any manifest or part: as before, refused
    bare = f"projects/{P}/predictions/bare/"
    store.put(bare + "prediction.results-00000-of-00001", b"{}\n")
    with pytest.raises(OutputExists, match="no readable manifest.json"):
        check_output(store, AREA + "predictions/bare/", request)
