"""The prediction lane (service/api/predict.py `Lane`: predictions answered outside Flask)
against Flask's own path, side by side: two apps on one real SQLite database and the same
replicas (stdlib HTTP servers on loopback), one with the lane and one without, take the same
requests, and every answer must be the same (status, headers, body; request ids aside), with
the same latency series and the same sampled serving-log records. The lane must have answered
the predictions itself (Flask never dispatched them), and left every refusal to Flask."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

import pytest
from flask import Flask
from prometheus_client import generate_latest

from service.api import auth, create_app
from service.api import metrics as metrics_api
from service.api import predict as predict_mod
from service.config import Settings
from service.serving_log import Record
from tests.unit.replicas import FakeReplica, add_model, add_replica, dead_port
from tests.unit.test_predict_proxy import HeaderCaller

ROW = {"instances": [[1.0, 2.0]]}
AS_P = {"X-Test-Project": "local", "X-Test-User": "alice"}


class Side:
    """One app, counting what Flask dispatched and what the serving log recorded."""

    def __init__(self, settings: Settings, lane: bool) -> None:
        changed = {"predict_lane": lane, "predict_max_body_bytes": 4096}
        self.app: Flask = create_app(
            Settings(**{**settings.model_dump(), **changed}), enqueue=lambda t, j: None
        )
        self.app.extensions[auth.EXTENSION] = HeaderCaller()
        self.dispatched = 0
        self.records: list[Record] = []
        inner = self.app.full_dispatch_request

        def counting() -> Any:
            self.dispatched += 1
            return inner()

        self.app.full_dispatch_request = counting  # type: ignore[method-assign]
        self.app.extensions[predict_mod.LOG_EXTENSION].record = self.records.append
        self.client = self.app.test_client()

    def call(self, method: str, path: str, data: bytes | None, headers: dict[str, str]) -> Any:
        r = self.client.open(path, method=method, data=data, headers=headers)
        return r

    def latency_counts(self) -> list[str]:
        registry = self.app.extensions[metrics_api.EXTENSION].registry
        return sorted(
            line
            for line in generate_latest(registry).decode().splitlines()
            if line.startswith("stackml_api_request_duration_seconds_count")
        )


@pytest.fixture
def world(settings: Settings, db_url: str) -> Iterator[dict[str, Any]]:
    up = [FakeReplica("v1"), FakeReplica("v2"), FakeReplica("bad")]
    v1, v2, bad = up
    bad.mode = "error"
    _, ep = add_model(
        db_url, "m", versions=(1, 2), labels={"canary": 2}, serving_version=1, log_sample_rate=1.0
    )
    add_replica(db_url, ep, v1.port, 1)
    add_replica(db_url, ep, v2.port, 2)
    _, split = add_model(db_url, "split", versions=(1, 2), traffic={"1": 50, "2": 50})
    add_replica(db_url, split, v1.port, 1)
    add_replica(db_url, split, v2.port, 2)
    _, failing = add_model(db_url, "failing")
    add_replica(db_url, failing, bad.port, 1)
    _, gone = add_model(db_url, "gone")
    add_replica(db_url, gone, dead_port(), 1)
    add_replica(db_url, gone, dead_port(), 1)
    _, waiting = add_model(db_url, "waiting")
    add_replica(db_url, waiting, v1.port, 1, state="loading")
    add_model(db_url, "undeployed", endpoint=False)
    yield {"lane": Side(settings, True), "flask": Side(settings, False)}
    for r in up:
        r.kill()


JSON = {"Content-Type": "application/json"}
BODY = json.dumps(ROW).encode()
CASES: list[tuple[str, str, str, bytes | None, dict[str, str]]] = [
    # (what, method, path, body, headers)
    ("default route", "POST", "/v1/models/m:predict", BODY, {**AS_P, **JSON}),
    ("version route", "POST", "/v1/models/m/versions/2:classify", BODY, {**AS_P, **JSON}),
    ("label route", "POST", "/v1/models/m/labels/canary:regress", BODY, {**AS_P, **JSON}),
    ("split, caller header", "POST", "/v1/models/split:predict", BODY,
     {**AS_P, **JSON, "X-Stackml-Caller": "app-7"}),
    ("split, user id", "POST", "/v1/models/split:predict", BODY, {**AS_P, **JSON}),
    ("empty body", "POST", "/v1/models/m:predict", b"", {**AS_P, **JSON}),
    ("replica's own error", "POST", "/v1/models/failing:predict", BODY, {**AS_P, **JSON}),
    ("no such model", "POST", "/v1/models/nope:predict", BODY, {**AS_P, **JSON}),
    ("bad model name", "POST", "/v1/models/Nope:predict", BODY, {**AS_P, **JSON}),
    ("no such version", "POST", "/v1/models/m/versions/7:predict", BODY, {**AS_P, **JSON}),
    ("a leading zero", "POST", "/v1/models/m/versions/02:predict", BODY, {**AS_P, **JSON}),
    ("no such label", "POST", "/v1/models/m/labels/prod:predict", BODY, {**AS_P, **JSON}),
    ("no such method", "POST", "/v1/models/m:explain", BODY, {**AS_P, **JSON}),
    ("no endpoint", "POST", "/v1/models/undeployed:predict", BODY, {**AS_P, **JSON}),
    ("no ready replica", "POST", "/v1/models/waiting:predict", BODY, {**AS_P, **JSON}),
    ("every replica down", "POST", "/v1/models/gone:predict", BODY, {**AS_P, **JSON}),
    ("another project", "POST", "/v1/models/m:predict", BODY,
     {**JSON, "X-Test-Project": "other"}),
    ("no token", "POST", "/v1/models/m:predict", BODY, JSON),
    ("no reader role", "POST", "/v1/models/m:predict", BODY,
     {**AS_P, **JSON, "X-Test-Roles": "nothing"}),
    ("a web form", "POST", "/v1/models/m:predict", BODY,
     {**AS_P, "Content-Type": "text/plain"}),
    ("too large", "POST", "/v1/models/m:predict", b"[" + b"1," * 3000 + b"1]",
     {**AS_P, **JSON}),
    ("chunked", "POST", "/v1/models/m:predict", BODY,
     {**AS_P, **JSON, "Transfer-Encoding": "chunked"}),
    ("metadata", "GET", "/v1/models/m/metadata", None, AS_P),
    ("trailing slash", "POST", "/v1/models/m:predict/", BODY, {**AS_P, **JSON}),
]  # fmt: skip
SERVED = {"default route", "version route", "label route", "split, caller header",
          "split, user id", "empty body", "replica's own error", "a leading zero"}  # fmt: skip


def answer(r: Any) -> tuple[str, dict[str, str], Any]:
    """(status, headers, body) with the request id checked and set aside."""
    headers = dict(r.headers)
    rid = headers.pop("X-Request-Id")
    assert re.fullmatch(r"req-[0-9a-f-]{36}", rid), rid
    body: Any = r.get_data()
    try:
        body = json.loads(body)
    except ValueError:
        pass
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        assert body["error"].pop("request_id") == rid  # a refusal names the request id
    return r.status, headers, body


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_the_lane_answers_as_flask_does(world: dict[str, Any], case: Any) -> None:
    what, method, path, body, headers = case
    lane, flask = world["lane"], world["flask"]
    got, want = (answer(s.call(method, path, body, headers)) for s in (lane, flask))
    assert got == want
    assert lane.latency_counts() == flask.latency_counts()
    assert [_kept(r) for r in lane.records] == [_kept(r) for r in flask.records]
    # the lane answered what it serves without Flask, and left the rest to it
    assert lane.dispatched == (0 if what in SERVED else 1)
    assert flask.dispatched == 1


def test_a_served_prediction_keeps_its_request_id_end_to_end(world: dict[str, Any]) -> None:
    lane = world["lane"]
    r = lane.call("POST", "/v1/models/m:predict", BODY, {**AS_P, **JSON})
    assert r.status_code == 200 and r.headers["X-Model-Version"] == "1"
    (record,) = lane.records
    assert record.request_id == r.headers["X-Request-Id"]
    assert (record.status, record.version, record.model) == (200, 1, "m")
    # a refusal after a replica was asked: the id the replicas saw is the one in the answer
    r = lane.call("POST", "/v1/models/gone:predict", BODY, {**AS_P, **JSON})
    assert r.status_code == 503 and r.get_json()["error"]["code"] == "no_replica"
    assert r.get_json()["error"]["request_id"] == r.headers["X-Request-Id"]
    assert r.headers["X-Model-Version"] == "1" and r.headers["Retry-After"] == "1"


def _kept(r: Record) -> tuple[Any, ...]:
    """A serving-log record without what differs between two requests (id, time, latency)."""
    return (r.project_id, r.model, r.version, r.caller, r.status, r.request, r.response)
