"""Sampled request/response logging (service/serving_log.py), through the proxy and alone:
sampling at the endpoint's rate, batches by count and time, the JSONL layout and content, a
slow or failing store (drops counted, requests still answered, memory bounded), the flush at
shutdown, and the counters on /metrics."""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from flask import Flask

from service.api import create_app
from service.backends.interfaces import ObjectInfo
from service.backends.storage.local import LocalStore
from service.config import Settings
from service.serving_log import Record, ServingLog
from tests.unit.replicas import FakeReplica, add_model, add_replica

ROW = {"instances": [[1.0, 2.0]]}


@pytest.fixture
def replica() -> Iterator[FakeReplica]:
    r = FakeReplica("r")
    yield r
    r.kill()


def app_with(settings: Settings, **changes: Any) -> Flask:
    return create_app(Settings(**{**settings.model_dump(), **changes}), enqueue=lambda t, j: None)


def slog_of(app: Flask) -> ServingLog:
    s: ServingLog = app.extensions["stackml.serving_log"]
    return s


def lines(store: LocalStore, prefix: str) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for info in store.list(prefix):
        out += [json.loads(line) for line in store.get(info.key).decode().splitlines()]
    return out


def rec(i: int, *, project: str = "local", model: str = "m", body: bytes = b"{}") -> Record:
    return Record(
        project_id=project,
        model=model,
        version=1,
        endpoint="ep-1",
        request_id=f"req-{i}",
        at=time.time(),
        caller="c",
        status=200,
        latency_ms=1.0,
        request=body,
        response=b'{"predictions": [1]}',
    )


def local(root: Path) -> LocalStore:
    return LocalStore(root, "http://127.0.0.1:1", b"unit-test-key")


class BlockingStore(LocalStore):
    """A store whose writes hang until released (a store that stopped answering)."""

    def __init__(self, root: Path) -> None:
        super().__init__(root, "http://127.0.0.1:1", b"unit-test-key")
        self.release = threading.Event()
        self.calls = 0

    def put(self, key: str, data: bytes) -> ObjectInfo:
        self.calls += 1
        self.release.wait(120)  # released by the test; a bound so nothing hangs forever
        return super().put(key, data)


class FailingStore(LocalStore):
    def put(self, key: str, data: bytes) -> ObjectInfo:
        raise OSError("store down")


# -- through the proxy --------------------------------------------------------------------------


def test_every_prediction_is_logged_at_rate_1_as_jsonl(settings, db_url, replica):
    app = app_with(settings, serving_log_batch_records=5, serving_log_batch_seconds=60)
    client = app.test_client()
    _, ep = add_model(db_url, "iris", log_sample_rate=1.0)
    add_replica(db_url, ep, replica.port, 1)
    ids = []
    for i in range(12):
        r = client.post(
            "/v1/models/iris:predict",
            json={"instances": [[float(i)]]},
            headers={"X-Stackml-Caller": "app-7"},
        )
        assert r.status_code == 200
        ids.append(r.headers["X-Request-Id"])
    slog = slog_of(app)
    slog.close(30)
    store: LocalStore = app.extensions["stackml"].store
    objects = store.list("projects/local/serving-logs/iris/")
    hour = time.strftime("%Y/%m/%d/%H", time.gmtime())
    assert len(objects) == 3  # 5 + 5 by count, the last 2 flushed at close
    assert all(o.key.startswith(f"projects/local/serving-logs/iris/{hour}/") for o in objects)
    assert all(o.key.endswith(".jsonl") for o in objects)
    got = lines(store, "projects/local/serving-logs/iris/")
    assert sorted(x["request_id"] for x in got) == sorted(ids)
    first = next(x for x in got if x["request_id"] == ids[3])
    assert first["request"] == {"instances": [[3.0]]}
    assert first["response"]["served_by"] == "r" and first["status"] == 200
    assert first["model"] == "iris" and first["version"] == 1 and first["endpoint"] == ep
    assert first["caller"] == hashlib.sha256(b"app-7").hexdigest()[:16]  # never the key
    assert "app-7" not in json.dumps(got)
    assert first["latency_ms"] > 0 and first["time"].endswith("+00:00")
    assert slog.stats()["written"] == 12 and slog.stats()["batches"] == 3


def test_sampling_follows_the_endpoint_rate(settings, db_url, replica):
    app = app_with(settings, serving_log_batch_seconds=60)
    client = app.test_client()
    _, ep = add_model(db_url, "half", log_sample_rate=0.5)
    add_replica(db_url, ep, replica.port, 1)
    _, ep0 = add_model(db_url, "none", log_sample_rate=0.0)
    add_replica(db_url, ep0, replica.port, 1)
    for _ in range(400):
        assert client.post("/v1/models/half:predict", json=ROW).status_code == 200
    for _ in range(50):
        assert client.post("/v1/models/none:predict", json=ROW).status_code == 200
    slog = slog_of(app)
    slog.close(30)
    store: LocalStore = app.extensions["stackml"].store
    half = lines(store, "projects/local/serving-logs/half/")
    assert 140 <= len(half) <= 260, len(half)  # 200 +- 4 sigma of 400 draws at 0.5
    assert store.list("projects/local/serving-logs/none/") == []


def test_a_store_that_hangs_costs_requests_nothing(settings, db_url, replica, tmp_path):
    app = app_with(
        settings,
        serving_log_batch_records=2,
        serving_log_buffer_bytes=20_000,
        serving_log_batch_seconds=60,
    )
    blocking = BlockingStore(tmp_path / "slow")
    slog = slog_of(app)
    slog._store_for = lambda project: blocking
    _, ep = add_model(db_url, "m", log_sample_rate=1.0)
    add_replica(db_url, ep, replica.port, 1)
    answered: list[int] = []

    def load() -> None:
        c = app.test_client()
        body = {"instances": [[0.5] * 100]}
        for _ in range(300):
            answered.append(c.post("/v1/models/m:predict", json=body).status_code)

    t = threading.Thread(target=load)
    t.start()
    t.join(120)
    try:
        assert not t.is_alive(), "requests waited on the store"
        assert answered == [200] * 300
        stats = slog.stats()
        assert blocking.calls == 1  # the writer is stuck in its first write
        assert stats["dropped_full"] > 0
        assert stats["buffered_bytes"] <= 20_000  # bounded, whatever the load
        assert stats["sampled"] + stats["dropped_full"] == 300
    finally:
        blocking.release.set()
    slog.close(30)
    stats = slog.stats()
    assert stats["written"] == stats["sampled"] and stats["buffered_records"] == 0


def test_metrics_show_the_counters(settings, db_url, replica, tmp_path):
    app = app_with(settings, serving_log_batch_seconds=60)
    slog = slog_of(app)
    slog._store_for = lambda project: FailingStore(tmp_path / "down", "http://127.0.0.1:1", b"k")
    _, ep = add_model(db_url, "m", log_sample_rate=1.0)
    add_replica(db_url, ep, replica.port, 1)
    client = app.test_client()
    for _ in range(3):
        assert client.post("/v1/models/m:predict", json=ROW).status_code == 200
    slog.close(30)
    text = client.get("/metrics").get_data(as_text=True)
    assert "stackml_serving_log_sampled_total 3.0" in text
    assert "stackml_serving_log_dropped_store_total 3.0" in text
    assert "stackml_serving_log_store_errors_total 1.0" in text
    assert "stackml_serving_log_written_total 0.0" in text


# -- the log alone ----------------------------------------------------------------------------


def test_batches_by_time_and_by_model_and_hour(tmp_path):
    store = local(tmp_path / "s")
    slog = ServingLog(lambda p: store, batch_records=1000, batch_seconds=0.2)
    for i in range(3):
        assert slog.record(rec(i, model="a"))
    assert slog.record(rec(3, model="b", project="other"))
    deadline = time.monotonic() + 30
    while slog.stats()["written"] < 4 and time.monotonic() < deadline:
        time.sleep(0.05)  # the time trigger writes without close()
    assert slog.stats()["written"] == 4
    assert len(store.list("projects/local/serving-logs/a/")) == 1
    assert [x["request_id"] for x in lines(store, "projects/other/serving-logs/b/")] == ["req-3"]
    slog.close(5)


def test_a_failing_store_drops_and_counts(tmp_path):
    slog = ServingLog(
        lambda p: FailingStore(tmp_path / "f", "http://127.0.0.1:1", b"k"),
        batch_records=4,
        batch_seconds=60,
    )
    for i in range(10):
        assert slog.record(rec(i))
    slog.close(30)
    stats = slog.stats()
    assert stats["dropped_store"] == 10 and stats["store_errors"] == 3 and stats["written"] == 0
    assert stats["buffered_records"] == 0 and stats["buffered_bytes"] == 0


def test_the_buffer_is_bounded_in_bytes(tmp_path):
    store = BlockingStore(tmp_path / "b")
    slog = ServingLog(lambda p: store, buffer_bytes=10_000, batch_records=10_000, batch_seconds=60)
    try:
        accepted = sum(slog.record(rec(i, body=b"x" * 1000)) for i in range(100))
        stats = slog.stats()
        assert accepted == stats["sampled"] < 100
        assert stats["dropped_full"] == 100 - accepted
        assert stats["buffered_bytes"] <= 10_000
    finally:
        store.release.set()
        slog.close(30)


def test_shutdown_flush_has_a_deadline(tmp_path):
    store = BlockingStore(tmp_path / "b")
    slog = ServingLog(lambda p: store, batch_records=1, batch_seconds=60)
    try:
        for i in range(5):
            slog.record(rec(i))
        deadline = time.monotonic() + 30
        while store.calls == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        slog.close(0.2)  # the store hangs: close gives up, counting what is left
        stats = slog.stats()
        assert stats["dropped_shutdown"] == 4 and stats["buffered_records"] == 0
        assert not slog.record(rec(9))  # closed: refused and counted
    finally:
        store.release.set()


def test_bodies_past_the_limit_are_cut_and_marked(tmp_path):
    store = local(tmp_path / "s")
    slog = ServingLog(lambda p: store, max_body_bytes=16, batch_seconds=60)
    body, cut = slog.cut(b'{"instances": [[1, 2, 3, 4, 5, 6]]}')
    assert cut and body == b'{"instances": [['
    small, cut_small = slog.cut(b"{}")
    assert not cut_small and small == b"{}"
    r = rec(1)
    slog.record(
        Record(**{**r.__dict__, "request": body, "request_truncated": True, "response": b"\xff"})
    )
    slog.close(30)
    (line,) = lines(store, "projects/local/serving-logs/m/")
    assert line["request"] == '{"instances": [[' and line["request_truncated"] is True
    assert line["response"] == "\ufffd" and "response_truncated" not in line


def test_sampled_rates() -> None:
    slog = ServingLog(lambda p: local(Path("/nonexistent")))
    assert not any(slog.sampled(0.0) for _ in range(1000))
    assert all(slog.sampled(1.0) for _ in range(1000))
    n = sum(slog.sampled(0.1) for _ in range(10_000))
    assert 880 <= n <= 1120  # 1000 +- 4 sigma
