"""Feedback, the serving log's index, live metrics and datasets on a real SQLite database and
the local store: POST /v1/models/{name}/feedback refuses bad items with a field path and
stores nothing, is idempotent per request id (created / unchanged / updated), and another
project's model is a 404; the index pass reads serving-log objects the ServingLog wrote, once;
live metrics come from the join; a dataset's CSV is what the example trainer reads, its
holdout side is fixed by the request id, and a dataset without labels is FAILED."""

from __future__ import annotations

import csv
import io
import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import func, select

from service import queue
from service.api import auth
from service.backends.storage.local import LocalStore
from service.config import Settings
from service.db import registry
from service.db.models import (
    DatasetVersion,
    Endpoint,
    Feedback,
    LoggedPrediction,
    ServingLogObject,
)
from service.db.session import session_scope
from service.domain import feedback as dom
from service.serving_log import Record, ServingLog
from tests.unit.test_auth import HeaderAuth, who
from workers import jobctx
from workers.steps import datasets as build_step
from workers.steps import serving_index

P = "local"
T0 = datetime(2026, 12, 1, 10, 0, tzinfo=UTC)


def count(url: str, model: Any) -> int:
    with session_scope(url) as s:
        return int(s.scalar(select(func.count()).select_from(model)) or 0)


def fields(err: dict[str, Any]) -> list[str]:
    return [f["field"] for f in err["error"]["details"]["fields"]]


@pytest.fixture
def model(client: FlaskClient, db_url: str) -> str:
    assert client.post("/v1/models", json={"name": "demo"}).status_code == 201
    with session_scope(db_url) as s:
        m = registry.find_model(s, P, "demo")
        m.created_at = T0 - timedelta(hours=1)
        s.add(
            Endpoint(
                id="ep-feedback0001",
                project_id=P,
                model_id=m.id,
                state="READY",
                replicas=1,
                flavor="local.small",
                created_by="u",
                target_label="default",
                log_sample_rate=1.0,
                created_at=T0 - timedelta(hours=1),  # the first listing starts here
            )
        )
    return "demo"


@pytest.fixture
def worker(
    settings: Settings, store: LocalStore, monkeypatch: pytest.MonkeyPatch
) -> list[tuple[str, str]]:
    """The workers' jobctx on the unit database and the app's store; what they enqueue."""
    sent: list[tuple[str, str]] = []
    monkeypatch.setattr(jobctx, "settings", lambda: settings)
    monkeypatch.setattr(jobctx, "store", lambda project_id=None, trust_id=None: store)
    return sent


def log_predictions(store: LocalStore, rows: list[tuple[str, Any, Any, int]], at: datetime) -> None:
    """Write serving-log objects with the real ServingLog: (request id, request, response,
    version) per prediction, logged at `at`."""
    slog = ServingLog(lambda _p: store, batch_records=1000, batch_seconds=0.05)
    for i, (rid, req, resp, version) in enumerate(rows):
        slog.record(
            Record(
                project_id=P,
                model="demo",
                version=version,
                endpoint="ep-feedback0001",
                request_id=rid,
                at=(at + timedelta(seconds=i)).timestamp(),
                caller="c",
                status=200,
                latency_ms=1.0,
                request=json.dumps(req).encode(),
                response=json.dumps(resp).encode(),
            )
        )
    slog.close(10)
    assert slog.stats()["written"] == len(rows)


def index(settings: Settings, store: LocalStore, now: datetime) -> serving_index.Report:
    sent: list[tuple[str, str]] = []
    return serving_index.run(
        now,
        settings=settings,
        store_for=lambda _p, _t: store,
        enqueue=lambda task, ident: sent.append((task, ident)),
    )


# -- POST /v1/models/{name}/feedback ------------------------------------------------------------


def test_feedback_is_idempotent_per_request_id(client: FlaskClient, model: str, db_url: str):
    body = {
        "feedback": [
            {"request_id": "req-1", "label": 1.5},
            {"request_id": "req-2", "label": "cat", "time": "2026-12-01T10:00:00Z"},
        ]
    }
    r = client.post("/v1/models/demo/feedback", json=body)
    assert r.status_code == 200, r.get_json()
    assert r.get_json() == {
        "model": "demo",
        "received": 2,
        "created": 2,
        "updated": 0,
        "unchanged": 0,
    }
    again = client.post("/v1/models/demo/feedback", json=body).get_json()
    assert (again["created"], again["updated"], again["unchanged"]) == (0, 0, 2)
    fix = {
        "feedback": [
            {"request_id": "req-1", "label": 2.5},
            {"request_id": "req-3", "label": [1, 2]},
        ]
    }
    out = client.post("/v1/models/demo/feedback", json=fix).get_json()
    assert (out["created"], out["updated"], out["unchanged"]) == (1, 1, 0)
    with session_scope(db_url) as s:
        rows = {f.request_id: (f.label, f.labelled_at) for f in s.scalars(select(Feedback))}
    assert rows["req-1"][0] == 2.5 and rows["req-3"][0] == [1, 2]
    assert rows["req-2"][1].replace(tzinfo=UTC) == datetime(2026, 12, 1, 10, tzinfo=UTC)
    assert count(db_url, Feedback) == 3


@pytest.mark.parametrize(
    ("items", "want"),
    [
        ([{"request_id": "", "label": 1}], "feedback.1.request_id"),
        ([{"request_id": "r x\n", "label": 1}], "feedback.1.request_id"),
        ([{"request_id": "r" * 129, "label": 1}], "feedback.1.request_id"),
        ([{"request_id": "r", "label": None}], "feedback.1.label"),
        ([{"request_id": "r", "label": {"a": 1}}], "feedback.1.label"),
        ([{"request_id": "r", "label": [1, None]}], "feedback.1.label"),
        ([{"request_id": "r", "label": "x" * 20000}], "feedback.1.label"),
        ([{"request_id": "r", "label": 1, "time": "yesterday"}], "feedback.1.time"),
        ([{"request_id": "r", "label": 1, "extra": 1}], "feedback.1.extra"),
        ([{"request_id": "r"}], "feedback.1.label"),
        ([{"request_id": 7, "label": 1}], "feedback.1.request_id"),
    ],
)
def test_a_bad_item_refuses_the_batch_and_stores_nothing(
    client: FlaskClient, model: str, db_url: str, items: list[Any], want: str
):
    body = {"feedback": [{"request_id": "good", "label": 1}, *items]}
    r = client.post("/v1/models/demo/feedback", json=body)
    assert r.status_code == 422, r.get_json()
    assert r.get_json()["error"]["code"] == "validation_failed"
    assert want in fields(r.get_json())
    assert count(db_url, Feedback) == 0


@pytest.mark.parametrize(
    "body",
    [{"feedback": []}, {"feedback": [{"request_id": "r", "label": 1}] * 1001}, {}, {"x": 1}],
)
def test_empty_oversized_or_missing_batches_are_422(
    client: FlaskClient, model: str, db_url: str, body
):
    r = client.post("/v1/models/demo/feedback", json=body)
    assert r.status_code == 422 and count(db_url, Feedback) == 0


def test_feedback_for_an_unknown_model_is_404(client: FlaskClient, db_url: str):
    r = client.post(
        "/v1/models/nope/feedback", json={"feedback": [{"request_id": "r", "label": 1}]}
    )
    assert r.status_code == 404 and r.get_json()["error"]["code"] == "not_found"


@pytest.fixture
def rc(app: Flask) -> FlaskClient:
    app.extensions[auth.EXTENSION] = HeaderAuth()
    return app.test_client()


def test_projects_and_roles(rc: FlaskClient, db_url: str, error_of: Any):
    a, b, reader = who("proj-a", "member"), who("proj-b", "member"), who("proj-a", "reader")
    assert rc.post("/v1/models", json={"name": "m"}, headers=a).status_code == 201
    body = {"feedback": [{"request_id": "r", "label": 1}]}
    error_of(rc.post("/v1/models/m/feedback", json=body, headers=b), 404)
    error_of(rc.post("/v1/models/m/feedback", json=body, headers=reader), 403, "forbidden")
    assert count(db_url, Feedback) == 0
    assert rc.post("/v1/models/m/feedback", json=body, headers=a).status_code == 200
    # datasets: another project's model and dataset are 404s, a reader cannot build
    error_of(rc.post("/v1/datasets", json={"name": "d", "model": "m"}, headers=b), 404)
    error_of(rc.post("/v1/datasets", json={"name": "d", "model": "m"}, headers=reader), 403)
    assert rc.post("/v1/datasets", json={"name": "d", "model": "m"}, headers=a).status_code == 202
    error_of(rc.get("/v1/datasets/d", headers=b), 404)
    error_of(rc.get("/v1/datasets/d/versions/1", headers=b), 404)
    assert rc.get("/v1/datasets", headers=b).get_json() == {"datasets": []}
    assert rc.get("/v1/datasets/d", headers=reader).status_code == 200


# -- the index pass and live metrics ------------------------------------------------------------


def test_index_pass_reads_each_object_once_and_live_metrics_join(
    client: FlaskClient, model: str, settings: Settings, store: LocalStore, db_url: str
):
    preds = [
        ("req-a", {"instances": [[1.0, 2.0]]}, {"predictions": [[3.0]]}, 1),
        ("req-b", {"instances": [[2.0, 2.0]]}, {"predictions": [[4.0]]}, 1),
        ("req-c", {"instances": [[0.0, 1.0], [1.0, 0.0]]}, {"predictions": [[1.0], [2.0]]}, 2),
    ]
    log_predictions(store, preds, T0)
    # lines that are not usable predictions are skipped, never an error
    junk = b'not json\n{"model":"demo"}\n{"model":"other","request_id":"x"}\n'
    store.put(f"projects/{P}/serving-logs/demo/2026/12/01/10/junk.jsonl", junk)
    r1 = index(settings, store, T0 + timedelta(minutes=5))
    assert (r1.objects, r1.predictions, r1.skipped_lines) == (2, 3, 3)
    r2 = index(settings, store, T0 + timedelta(minutes=6))
    assert (r2.objects, r2.predictions) == (0, 0)  # already read
    assert count(db_url, ServingLogObject) == 2 and count(db_url, LoggedPrediction) == 3

    fb = {
        "feedback": [
            {"request_id": "req-a", "label": 2.0},  # |3-2| = 1
            {"request_id": "req-b", "label": [4.0]},  # 0
            {"request_id": "req-c", "label": [1.0, 4.0]},  # 0 and 2
            {"request_id": "req-unseen", "label": 1.0},  # not logged (yet): stored anyway
        ]
    }
    assert client.post("/v1/models/demo/feedback", json=fb).get_json()["created"] == 4
    with session_scope(db_url) as s:
        m = registry.find_model(s, P, "demo")
        for v in (1, 2):
            s.add(_version(m.id, v, {"loss": 0.2, "mae": 0.3, "val_mae": 0.4} if v == 1 else {}))
    v1 = client.get("/v1/models/demo/versions/1").get_json()["live_metrics"]
    assert (v1["logged"], v1["labelled"], v1["label_coverage"], v1["scored"]) == (2, 2, 1.0, 2)
    assert v1["mae"] == pytest.approx(0.5) and v1["rmse"] == pytest.approx((0.5) ** 0.5)
    assert v1["mse"] == pytest.approx(0.5)
    # the trainer reported mae: live 0.5 against its held-out 0.4
    assert v1["declared"] == {
        "metric": "mae",
        "source": "trainer",
        "trained_as": "val_mae",
        "trained": 0.4,
        "live": pytest.approx(0.5),
    }
    v2 = client.get("/v1/models/demo/versions").get_json()["versions"][1]["live_metrics"]
    assert (v2["logged"], v2["labelled"], v2["scored"]) == (1, 1, 2)
    assert v2["mae"] == pytest.approx(1.0)
    assert v2["declared"] is None  # no gate, no trainer metric that feedback computes


def _version(model_id: str, v: int, metrics: dict[str, float] | None = None) -> Any:
    from service.db.models import ModelVersion

    return ModelVersion(
        model_id=model_id,
        version=v,
        state="READY",
        artifact_uri=f"local://projects/{P}/models/v{v}/",
        created_by="u",
        metrics=metrics or {},
    )


def test_the_declared_metric_is_the_gates_else_the_trainers() -> None:
    live = {"mae": 0.5, "mse": 0.5, "rmse": 0.7, "accuracy": 0.9}
    gate = dom.declared_metric("rmse", {"loss": 0.1, "mae": 0.2}, live)
    assert gate == {
        "metric": "rmse",
        "source": "gate",
        "trained_as": None,
        "trained": None,
        "live": 0.7,
    }
    keras = dom.declared_metric(None, {"loss": 0.1, "mean_squared_error": 0.25}, live)
    assert keras is not None and (keras["metric"], keras["trained"]) == ("mse", 0.25)
    cls = dom.declared_metric(None, {"loss": 1.0, "sparse_categorical_accuracy": 0.8}, {})
    assert cls is not None and (cls["metric"], cls["trained"], cls["live"]) == (
        "accuracy",
        0.8,
        None,
    )
    # a metric feedback cannot compute, or a value that is not a finite number: none
    assert dom.declared_metric("auc", {"auc": 0.9, "mae": float("nan")}, live) is None
    assert dom.declared_metric(None, {"mae": True}, live) is None


def test_accuracy_for_class_labels() -> None:
    score = dom.Score()
    dom.score_request(score, [[0.1, 0.9], [0.8, 0.2]], [1, 1])  # argmax 1 right, 0 wrong
    dom.score_request(score, ["cat"], "cat")
    dom.score_request(score, ["cat"], "dog")
    assert score.metrics() == {"accuracy": 0.5}
    dom.score_request(score, [[1.0]], [1.0, 2.0])  # does not fit: unscored
    assert score.unscored == 1


# -- datasets -----------------------------------------------------------------------------------


def _rows(store: LocalStore, prefix: str) -> list[list[str]]:
    out: list[list[str]] = []
    for obj in sorted(store.list(prefix), key=lambda o: o.key):
        out += list(csv.reader(io.StringIO(store.get(obj.key).decode())))
    return out


def _seed(store: LocalStore, settings: Settings, n: int) -> list[str]:
    rids = [f"req-{i:03d}" for i in range(n)]
    preds = [
        (rid, {"instances": [[float(i), float(i) / 2]]}, {"predictions": [[0.0]]}, 1)
        for i, rid in enumerate(rids)
    ]
    log_predictions(store, preds, T0)
    index(settings, store, T0 + timedelta(minutes=5))
    return rids


def test_dataset_csv_is_what_the_example_trainer_reads(
    client: FlaskClient,
    model: str,
    settings: Settings,
    store: LocalStore,
    worker: Any,
    enqueued: Any,
):
    rids = _seed(store, settings, 40)
    labels = {rid: float(i) * 3 for i, rid in enumerate(rids)}
    fb = [{"request_id": rid, "label": y} for rid, y in labels.items() if rid != "req-039"]
    client.post("/v1/models/demo/feedback", json={"feedback": fb})
    r = client.post("/v1/datasets", json={"name": "retrain", "model": "demo"})
    assert r.status_code == 202, r.get_json()
    dv = r.get_json()
    assert (dv["version"], dv["state"], dv["data_uri"]) == (1, "BUILDING", None)
    assert r.headers["Location"] == "/v1/datasets/retrain/versions/1"
    (task, vid) = enqueued.calls[-1]
    assert task == queue.BUILD_DATASET
    build_step.run(vid)
    build_step.run(vid)  # a redelivered task changes nothing
    got = client.get("/v1/datasets/retrain/versions/1").get_json()
    assert got["state"] == "READY", got
    m = got["manifest"]
    assert (m["logged"], m["labelled"], m["rows"]) == (40, 39, 39)
    assert m["label_coverage"] == pytest.approx(39 / 40)
    assert m["train_rows"] + m["holdout_rows"] == 39 and m["versions"] == [1]
    held = {rid for rid in rids[:39] if dom.in_holdout(rid, 0.2)}
    assert m["holdout_rows"] == len(held) and 0 < len(held) < 39
    area = f"projects/{P}/datasets/retrain/1/"
    assert got["data_uri"] == f"local://{area}train/"
    assert json.loads(store.get(area + "manifest.json"))["rows"] == 39
    # the example trainer's format (examples/keras_regression/trainer/task.py csv_data: a
    # header it skips, then the feature columns and the target); the trainer itself reads it
    # in tests/integration/test_feedback_postgres.py
    train = _rows(store, area + "train/")
    assert train[0] == ["f0", "f1", "label"] and len(train) == 39 - len(held) + 1
    for row in train[1:]:
        i = int(float(row[0]))
        assert float(row[1]) == i / 2 and float(row[2]) == labels[rids[i]]
        assert rids[i] not in held
    holdout = _rows(store, area + "holdout/")
    assert holdout[0] == ["f0", "f1", "label"] and len(holdout) == len(held) + 1

    # a second version: the same requests on the same sides; listing and describe
    r2 = client.post("/v1/datasets", json={"name": "retrain", "model": "demo", "format": "jsonl"})
    build_step.run(enqueued.calls[-1][1])
    v2 = client.get("/v1/datasets/retrain/versions/2").get_json()
    assert v2["state"] == "READY" and r2.get_json()["version"] == 2
    lines = [
        json.loads(line)
        for obj in store.list(f"projects/{P}/datasets/retrain/2/holdout/")
        for line in store.get(obj.key).decode().splitlines()
    ]
    assert {row["request_id"] for row in lines} == held
    assert all(row["label"] == labels[row["request_id"]] for row in lines)
    listed = client.get("/v1/datasets").get_json()["datasets"]
    assert [(d["name"], d["versions"], d["latest_ready_version"]) for d in listed] == [
        ("retrain", 2, 2)
    ]
    one = client.get("/v1/datasets/retrain").get_json()
    assert [v["version"] for v in one["version_list"]] == [1, 2]


def test_a_dataset_without_labels_is_failed_with_the_reason(
    client: FlaskClient, model: str, settings: Settings, store: LocalStore, worker: Any, enqueued
):
    _seed(store, settings, 3)
    client.post("/v1/datasets", json={"name": "empty", "model": "demo"})
    build_step.run(enqueued.calls[-1][1])
    got = client.get("/v1/datasets/empty/versions/1").get_json()
    assert got["state"] == "FAILED" and got["data_uri"] is None
    assert "no labelled predictions" in got["failure_message"]
    assert "3 logged" in got["failure_message"]
    assert store.list(f"projects/{P}/datasets/empty/") == []


def test_the_window_selects_predictions_by_time(
    client: FlaskClient, model: str, settings: Settings, store: LocalStore, worker: Any, enqueued
):
    rids = _seed(store, settings, 10)  # logged at T0 + i seconds
    fb = [{"request_id": rid, "label": 1.0} for rid in rids]
    client.post("/v1/models/demo/feedback", json={"feedback": fb})
    window = {"start": (T0 + timedelta(seconds=5)).isoformat(), "end": "2026-12-02T00:00:00Z"}
    body = {"name": "w", "model": "demo", "window": window, "holdout_fraction": 0}
    assert client.post("/v1/datasets", json=body).status_code == 202
    build_step.run(enqueued.calls[-1][1])
    m = client.get("/v1/datasets/w/versions/1").get_json()["manifest"]
    assert (m["logged"], m["rows"], m["train_rows"], m["holdout_rows"]) == (5, 5, 5, 0)


@pytest.mark.parametrize(
    ("body", "want"),
    [
        ({"model": "demo"}, "name"),
        ({"name": "Bad Name", "model": "demo"}, "name"),
        ({"name": "d"}, "model"),
        ({"name": "d", "model": "demo", "holdout_fraction": 1.0}, "holdout_fraction"),
        ({"name": "d", "model": "demo", "holdout_fraction": -0.1}, "holdout_fraction"),
        ({"name": "d", "model": "demo", "holdout_fraction": "0.2"}, "holdout_fraction"),
        ({"name": "d", "model": "demo", "format": "parquet"}, "format"),
        ({"name": "d", "model": "demo", "window": {"start": "soon"}}, "window.start"),
        ({"name": "d", "model": "demo", "window": {"end": 5}}, "window.end"),
        ({"name": "d", "model": "demo", "window": {"from": "x"}}, "window.from"),
        (
            {
                "name": "d",
                "model": "demo",
                "window": {"start": "2026-12-02T00:00:00Z", "end": "2026-12-01T00:00:00Z"},
            },
            "window",
        ),
    ],
)
def test_bad_dataset_requests_are_422_and_change_nothing(
    client: FlaskClient, model: str, db_url: str, enqueued: Any, body: dict[str, Any], want: str
):
    r = client.post("/v1/datasets", json=body)
    assert r.status_code == 422, r.get_json()
    assert want in fields(r.get_json())
    assert count(db_url, DatasetVersion) == 0 and enqueued.calls == []


def test_a_dataset_of_an_unknown_model_is_404(client: FlaskClient, db_url: str, enqueued):
    r = client.post("/v1/datasets", json={"name": "d", "model": "ghost"})
    assert r.status_code == 404 and count(db_url, DatasetVersion) == 0
    assert client.get("/v1/datasets/d").status_code == 404
    assert client.get("/v1/datasets/d/versions/99999999999").status_code == 404


def test_job_outputs_may_not_be_in_the_datasets_or_serving_log_areas():
    from service.domain import outputs

    area = "projects/p/"
    assert "datasets/" in (outputs.prefix_problem(area + "datasets/x/1/", area) or "")
    assert "serving-logs/" in (outputs.prefix_problem(area + "serving-logs/m/", area) or "")
    assert outputs.prefix_problem(area + "models/mine/", area) is None


def test_holdout_side_is_fixed_by_the_request_id() -> None:
    rids = [f"r{i}" for i in range(2000)]
    small = {r for r in rids if dom.in_holdout(r, 0.1)}
    large = {r for r in rids if dom.in_holdout(r, 0.3)}
    assert small <= large  # held out at 0.1: still held out at 0.3
    assert 100 < len(small) < 300 and 450 < len(large) < 750
    assert small == {r for r in rids if dom.in_holdout(r, 0.1)}


def test_rebuild_repeats_the_latest_version_for_a_schedule(
    client: FlaskClient, model: str, settings: Settings, store: LocalStore, worker: Any, enqueued
):
    from service.db import datasets as ds_repo

    with session_scope(settings.db_url) as s:
        missing = ds_repo.rebuild(s, P, "nightly", store=store, by="schedule")
    assert missing.version_id is None and "no dataset 'nightly'" in (missing.reason or "")
    rids = _seed(store, settings, 8)
    fb = [{"request_id": rid, "label": 1.0} for rid in rids]
    client.post("/v1/models/demo/feedback", json={"feedback": fb})
    body = {"name": "nightly", "model": "demo", "holdout_fraction": 0.5, "format": "jsonl"}
    client.post("/v1/datasets", json={**body, "window": {"start": T0.isoformat()}})
    build_step.run(enqueued.calls[-1][1])
    with session_scope(settings.db_url) as s:
        started = ds_repo.rebuild(s, P, "nightly", store=store, by="schedule")
    assert started.version == 2 and started.reason is None
    build_step.run(str(started.version_id))
    v2 = client.get("/v1/datasets/nightly/versions/2").get_json()
    assert v2["state"] == "READY", v2
    assert (v2["format"], v2["holdout_fraction"], v2["created_by"]) == ("jsonl", 0.5, "schedule")
    assert v2["window"]["start"] == "2026-12-01T10:00:00.000000Z"
    with session_scope(settings.db_url) as s:
        s.delete(s.get(Endpoint, "ep-feedback0001"))
        s.flush()
        registry.delete_model(s, registry.find_model(s, P, "demo"))
    assert count(settings.db_url, LoggedPrediction) == 0  # gone with the model
    assert count(settings.db_url, Feedback) == 0
    with session_scope(settings.db_url) as s:
        gone = ds_repo.rebuild(s, P, "nightly", store=store, by="schedule")
    assert gone.version_id is None and "no model 'demo'" in (gone.reason or "")


@pytest.mark.parametrize(
    ("request_body", "response", "rows", "preds"),
    [
        ({"instances": [[1, 2]]}, {"predictions": [[3]]}, [[1, 2]], [[3]]),
        ({"inputs": [[1], [2]]}, {"outputs": [[1], [2]]}, [[1], [2]], [[1], [2]]),
        (
            {"inputs": {"a": [1, 2], "b": [3, 4]}},
            {"outputs": {"y": [5, 6]}},
            [{"a": 1, "b": 3}, {"a": 2, "b": 4}],
            [{"y": 5}, {"y": 6}],
        ),
        ({"inputs": {"a": [1, 2], "b": [3]}}, None, None, None),
        ({"instances": []}, None, None, None),
        ("text", None, None, None),
    ],
)
def test_instances_and_predictions_in_tf_servings_forms(request_body, response, rows, preds):
    assert dom.instances_of(request_body) == rows
    assert dom.predictions_of(response) == preds


def test_csv_features_and_labels() -> None:
    assert dom.features({"b": [3, 4], "a": 1}) == [1.0, 3.0, 4.0]  # names in order
    assert dom.features([[1, 2], [True, 0]]) == [1.0, 2.0, 1.0, 0.0]
    assert dom.features(["x"]) is None and dom.features([]) is None
    assert dom.csv_target([2.5]) == 2.5 and dom.csv_target("cat") is None
    assert dom.labels_per_instance([1, 2], 1) == [[1, 2]]  # a vector target
    assert dom.labels_per_instance([1, 2], 2) == [1, 2]
    assert dom.labels_per_instance(1, 2) is None


def test_a_model_is_first_listed_from_its_endpoints_creation(
    model: str, settings: Settings, store: LocalStore, db_url: str
):
    """Not from the model's creation: a year-old model's first pass lists the hours since its
    endpoint exists, not a year of empty hours."""
    with session_scope(db_url) as s:
        m = registry.find_model(s, P, "demo")
        m.created_at = T0 - timedelta(days=365)
    log_predictions(store, [("req-x", {"instances": [[1.0]]}, {"predictions": [[1.0]]}, 1)], T0)
    report = index(settings, store, T0 + timedelta(minutes=5))
    assert (report.objects, report.predictions) == (1, 1)
