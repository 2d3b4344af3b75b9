"""The prediction proxy (service/api/predict.py) against real HTTP servers standing in for
replicas (stdlib servers on loopback ports speaking TF Serving's REST shapes), with replica
rows inserted in a real SQLite database: routing, the sticky split, one retry on a dead
replica, the platform's refusals, headers, pass-through errors, projects, rate limits."""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from flask import Flask, Request
from flask.testing import FlaskClient

from service.api import auth, create_app
from service.api import predict as predict_mod
from service.api.auth import Caller, NotAuthenticated
from service.api.errors import RateLimited
from service.api.predict import Proxy, Tokens, split_version
from service.api.ratelimit import Limiter
from service.config import Settings
from service.db.models import Endpoint, ModelLabel, ModelVersion, Resource
from service.db.session import session_scope
from tests.unit.replicas import FakeReplica, add_model, add_replica, dead_port

REDIS_URL = "redis://127.0.0.1:6379/13"
ROW = {"instances": [[1.0, 2.0]]}


@pytest.fixture
def replicas() -> Iterator[list[FakeReplica]]:
    made: list[FakeReplica] = []
    yield made
    for r in made:
        r.kill()


def start(replicas: list[FakeReplica], name: str) -> FakeReplica:
    r = FakeReplica(name)
    replicas.append(r)
    return r


def predict(client: FlaskClient, path: str, body: Any = ROW, **headers: str) -> Any:
    return client.post(
        path, data=json.dumps(body), content_type="application/json", headers=headers
    )


def no_cache(app: Flask) -> Proxy:
    p: Proxy = app.extensions["stackml.predict"]
    p.cache_seconds = 0.0
    return p


class HeaderCaller:
    """Project, user and roles from X-Test-* headers (as keystonemiddleware would set them)."""

    def wrap(self, app: Any) -> Any:
        return app

    def caller(self, request: Request) -> Caller:
        project = request.headers.get("X-Test-Project")
        if not project:
            raise NotAuthenticated("no token", challenge=None)
        roles = frozenset(request.headers.get("X-Test-Roles", "reader").split(","))
        return Caller(project, request.headers.get("X-Test-User", "u"), roles)


# -- routing ----------------------------------------------------------------------------------


def test_default_version_label_routes_reach_the_right_replicas(app, client, db_url, replicas):
    _, ep = add_model(db_url, "iris", versions=(1, 2), labels={"canary": 2}, serving_version=1)
    assert ep
    v1, v2 = start(replicas, "v1"), start(replicas, "v2")
    add_replica(db_url, ep, v1.port, 1)
    add_replica(db_url, ep, v2.port, 2)

    r = predict(client, "/v1/models/iris:predict")
    assert r.status_code == 200, r.get_data(as_text=True)
    assert r.get_json()["served_by"] == "v1" and r.headers["X-Model-Version"] == "1"
    # forwarded to the explicit version path, whatever route the client used
    assert v1.seen[-1]["path"] == "/v1/models/iris/versions/1:predict"
    assert json.loads(v1.seen[-1]["body"]) == ROW
    assert v1.seen[-1]["request_id"] == r.headers["X-Request-Id"]

    r = predict(client, "/v1/models/iris/versions/2:classify")
    assert r.status_code == 200 and r.get_json()["served_by"] == "v2"
    assert r.get_json()["verb"] == "classify" and r.headers["X-Model-Version"] == "2"

    r = predict(client, "/v1/models/iris/labels/canary:regress")
    assert r.status_code == 200 and r.get_json()["served_by"] == "v2"
    assert v2.seen[-1]["path"] == "/v1/models/iris/versions/2:regress"

    r = client.get("/v1/models/iris/metadata")
    assert r.status_code == 200 and r.get_json()["model_spec"] == {"name": "iris", "version": "1"}
    assert r.headers["X-Model-Version"] == "1" and r.headers["X-Request-Id"]
    r = client.get("/v1/models/iris/versions/2/metadata")
    assert r.get_json()["metadata"]["served_by"] == "v2"


def test_replicas_of_a_version_share_the_load(app, client, db_url, replicas):
    _, ep = add_model(db_url, "m")
    a, b = start(replicas, "a"), start(replicas, "b")
    add_replica(db_url, ep, a.port, 1)
    add_replica(db_url, ep, b.port, 1)
    seen = Counter(
        predict(client, "/v1/models/m:predict").get_json()["served_by"] for _ in range(20)
    )
    assert seen == {"a": 10, "b": 10}


def test_only_ready_replicas_get_requests(app, client, db_url, replicas):
    _, ep = add_model(db_url, "m")
    ready, loading = start(replicas, "ready"), start(replicas, "loading")
    add_replica(db_url, ep, ready.port, 1)
    add_replica(db_url, ep, loading.port, 1, state="loading")
    for _ in range(6):
        assert predict(client, "/v1/models/m:predict").get_json()["served_by"] == "ready"
    assert loading.seen == []


# -- the sticky split -------------------------------------------------------------------------


def test_split_is_sticky_per_caller_and_keeps_its_proportions(app, client, db_url, replicas):
    _, ep = add_model(db_url, "m", versions=(1, 2), traffic={"1": 80, "2": 20})
    v1, v2 = start(replicas, "v1"), start(replicas, "v2")
    add_replica(db_url, ep, v1.port, 1)
    add_replica(db_url, ep, v2.port, 2)
    got: dict[str, set[str]] = {}
    for i in range(400):
        caller = f"app-{i}"
        for _ in range(2 if i < 50 else 1):
            r = predict(client, "/v1/models/m:predict", **{"X-Stackml-Caller": caller})
            assert r.status_code == 200
            assert r.headers["X-Model-Version"] == str(r.get_json()["version"])
            got.setdefault(caller, set()).add(r.headers["X-Model-Version"])
    assert all(len(v) == 1 for v in got.values())  # a caller sticks to its version
    share = Counter(next(iter(v)) for v in got.values())
    assert 0.72 <= share["1"] / 400 <= 0.88, share  # 80% +- 4 sigma of 400 draws


def test_split_version_is_a_pure_function_of_the_key() -> None:
    traffic = ((1, 50), (2, 50))
    picks = {split_version(traffic, f"k{i}") for i in range(50)}
    assert picks == {1, 2}
    assert all(split_version(traffic, "same") == split_version(traffic, "same") for _ in range(5))
    assert split_version(((3, 100),), "anything") == 3


def test_without_a_caller_header_the_user_id_decides(settings, db_url, replicas):
    app = create_app(settings, enqueue=lambda t, j: None)
    app.extensions[auth.EXTENSION] = HeaderCaller()
    client = app.test_client()
    _, ep = add_model(db_url, "m", versions=(1, 2), traffic={"1": 50, "2": 50})
    v1, v2 = start(replicas, "v1"), start(replicas, "v2")
    add_replica(db_url, ep, v1.port, 1)
    add_replica(db_url, ep, v2.port, 2)
    per_user: dict[str, set[str]] = {}
    for i in range(40):
        for _ in range(3):
            r = predict(
                client,
                "/v1/models/m:predict",
                **{"X-Test-Project": "local", "X-Test-User": f"user{i}"},
            )
            per_user.setdefault(f"user{i}", set()).add(r.headers["X-Model-Version"])
    assert all(len(v) == 1 for v in per_user.values())
    assert {next(iter(v)) for v in per_user.values()} == {"1", "2"}


# -- failures -----------------------------------------------------------------------------------


def test_a_dead_replica_costs_no_request(app, client, db_url, replicas):
    _, ep = add_model(db_url, "m")
    a, b = start(replicas, "a"), start(replicas, "b")
    add_replica(db_url, ep, a.port, 1)
    add_replica(db_url, ep, b.port, 1)
    add_replica(db_url, ep, dead_port(), 1)  # a replica whose row says ready, nobody listens
    failures: list[str] = []
    statuses: Counter[int] = Counter()
    half = threading.Event()

    def load() -> None:
        c = app.test_client()
        for i in range(150):
            if i == 50:
                half.set()
            r = predict(c, "/v1/models/m:predict")
            statuses[r.status_code] += 1
            if r.status_code != 200:
                failures.append(r.get_data(as_text=True))

    threads = [threading.Thread(target=load) for _ in range(3)]
    for t in threads:
        t.start()
    assert half.wait(30)
    a.kill()  # mid-run: its keep-alive connections are reset, its port refuses
    for t in threads:
        t.join(60)
    assert failures == [] and statuses == {200: 450}
    assert predict(client, "/v1/models/m:predict").get_json()["served_by"] == "b"


@pytest.mark.parametrize("mode", ["unavailable", "foreign"])  # 503; not a model server's answer
def test_a_replica_answering_503_or_not_as_a_model_server_is_retried_on_another(
    app, client, db_url, replicas, mode
):
    _, ep = add_model(db_url, "m")
    sick, well = start(replicas, "sick"), start(replicas, "well")
    sick.mode = mode
    add_replica(db_url, ep, sick.port, 1)
    add_replica(db_url, ep, well.port, 1)
    for _ in range(6):
        r = predict(client, "/v1/models/m:predict")
        assert r.status_code == 200 and r.get_json()["served_by"] == "well"
    assert len(sick.seen) == 1  # then avoided: it is suspect for a while


def test_when_no_replica_answers_as_a_model_server_the_answer_is_no_replica(
    app, client, db_url, replicas, error_of
):
    _, ep = add_model(db_url, "m")
    for name in ("stranger", "other"):
        rep = start(replicas, name)
        rep.mode = "foreign"  # never passed on as the model's answer
        add_replica(db_url, ep, rep.port, 1)
    r = predict(client, "/v1/models/m:predict")
    err = error_of(r, 503, "no_replica")
    assert err["details"]["tried"] == 2 and r.headers["Retry-After"] == "1"


def test_when_every_replica_is_down_the_answer_is_no_replica(app, client, db_url, error_of):
    _, ep = add_model(db_url, "m")
    add_replica(db_url, ep, dead_port(), 1)
    add_replica(db_url, ep, dead_port(), 1)
    r = predict(client, "/v1/models/m:predict")
    err = error_of(r, 503, "no_replica")
    assert err["details"]["tried"] == 2
    assert r.headers["Retry-After"] == "1" and r.headers["X-Model-Version"] == "1"


def test_a_replica_that_does_not_answer_in_time_is_504_not_retried(
    settings, db_url, replicas, error_of
):
    app = create_app(
        Settings(**{**settings.model_dump(), "predict_read_timeout": 0.3}),
        enqueue=lambda t, j: None,
    )
    _, ep = add_model(db_url, "m")
    slow, other = start(replicas, "slow"), start(replicas, "other")
    slow.mode = "slow"
    add_replica(db_url, ep, slow.port, 1)
    add_replica(db_url, ep, other.port, 1)
    r = predict(app.test_client(), "/v1/models/m:predict")
    err = error_of(r, 504, "replica_timeout")
    assert err["details"] == {"model": "m", "version": 1}
    assert len(slow.seen) == 1 and other.seen == []  # it may have had an effect: no retry
    slow.release.set()


def test_no_ready_replica_is_503_no_replica(app, client, db_url, replicas, error_of):
    _, ep = add_model(db_url, "m", versions=(1, 2))
    booting = start(replicas, "booting")
    add_replica(db_url, ep, booting.port, 1, state="loading")
    r = predict(client, "/v1/models/m:predict")
    error_of(r, 503, "no_replica")
    assert r.headers["Retry-After"] == "1" and r.headers["X-Model-Version"] == "1"
    # a version on record that no replica serves
    r = predict(client, "/v1/models/m/versions/2:predict")
    error_of(r, 503, "no_replica")
    assert r.headers["X-Model-Version"] == "2"
    # a model without an endpoint: nothing is deployed, retrying will not help
    add_model(db_url, "bare", endpoint=False)
    for path in ("/v1/models/bare:predict", "/v1/models/bare/versions/1:predict"):
        err = error_of(predict(client, path), 404, "no_endpoint")
        assert err["details"] == {"model": "bare"}
    error_of(client.get("/v1/models/bare/metadata"), 404, "no_endpoint")


def test_replica_errors_pass_through_unchanged(app, client, db_url, replicas):
    _, ep = add_model(db_url, "m")
    r1 = start(replicas, "r1")
    r1.mode = "error"
    add_replica(db_url, ep, r1.port, 1)
    r = predict(client, "/v1/models/m:predict")
    assert r.status_code == 400
    assert r.get_json() == {"error": "Failed to process element: 0 of 'instances' list"}
    assert r.headers["X-Model-Version"] == "1" and r.headers["X-Request-Id"]
    r1.mode = "ok"
    r = client.post("/v1/models/m:predict", data=b"{not json", content_type="application/json")
    assert r.status_code == 400 and r.get_json() == {"error": "JSON Parse error"}
    assert len(r1.seen) == 2  # a replica's 400 is an answer, not a failure: no retry


def test_unknown_model_version_label_are_404(app, client, db_url, replicas, error_of):
    _, ep = add_model(db_url, "m", labels={"stable": 1})
    add_replica(db_url, ep, start(replicas, "r").port, 1)
    for path in (
        "/v1/models/nope:predict",
        "/v1/models/m/versions/7:predict",
        "/v1/models/m/labels/beta:predict",
        "/v1/models/Bad%20Name:predict",
        "/v1/models/m/versions/7/metadata",
    ):
        r = client.get(path) if path.endswith("metadata") else predict(client, path)
        error_of(r, 404, "not_found")
        assert "X-Model-Version" in r.headers


def test_models_of_another_project_are_404(settings, db_url, replicas, error_of):
    app = create_app(settings, enqueue=lambda t, j: None)
    app.extensions[auth.EXTENSION] = HeaderCaller()
    client = app.test_client()
    _, ep = add_model(db_url, "secret", project="p1")
    theirs = start(replicas, "theirs")
    add_replica(db_url, ep, theirs.port, 1, project="p1")
    ok = predict(client, "/v1/models/secret:predict", **{"X-Test-Project": "p1"})
    assert ok.status_code == 200
    for path in ("/v1/models/secret:predict", "/v1/models/secret/versions/1:predict"):
        error_of(predict(client, path, **{"X-Test-Project": "p2"}), 404, "not_found")
    error_of(client.get("/v1/models/secret/metadata", headers={"X-Test-Project": "p2"}), 404)
    assert len(theirs.seen) == 1
    # no token: 401 before anything is looked up; a reader may predict
    error_of(predict(client, "/v1/models/secret:predict"), 401)
    r = predict(
        client, "/v1/models/secret:predict", **{"X-Test-Project": "p1", "X-Test-Roles": "reader"}
    )
    assert r.status_code == 200
    r = predict(
        client, "/v1/models/secret:predict", **{"X-Test-Project": "p1", "X-Test-Roles": "nothing"}
    )
    error_of(r, 403, "forbidden")


def test_a_too_large_body_is_413_and_never_forwarded(settings, db_url, replicas, error_of):
    app = create_app(
        Settings(**{**settings.model_dump(), "predict_max_body_bytes": 1000}),
        enqueue=lambda t, j: None,
    )
    client = app.test_client()
    _, ep = add_model(db_url, "m")
    r1 = start(replicas, "r1")
    add_replica(db_url, ep, r1.port, 1)
    error_of(predict(client, "/v1/models/m:predict", {"instances": [[0.5] * 400]}), 413)
    assert r1.seen == []
    # the predict limit is its own: bigger than the API's 64 KiB default is fine
    app2 = create_app(
        Settings(**{**settings.model_dump(), "predict_max_body_bytes": 1 << 20}),
        enqueue=lambda t, j: None,
    )
    big = {"instances": [[0.5] * 20] * 2000}
    r = predict(app2.test_client(), "/v1/models/m:predict", big)
    assert r.status_code == 200 and len(r.get_json()["predictions"]) == 2000


def test_a_changed_replica_set_is_seen_after_the_cache(app, client, db_url, replicas):
    no_cache(app)
    _, ep = add_model(db_url, "m")
    a, b = start(replicas, "a"), start(replicas, "b")
    rid = add_replica(db_url, ep, a.port, 1)
    assert predict(client, "/v1/models/m:predict").get_json()["served_by"] == "a"
    with session_scope(db_url) as s:
        row = s.get(Resource, rid)
        assert row is not None
        row.replica_state = "draining"
    add_replica(db_url, ep, b.port, 1)
    assert predict(client, "/v1/models/m:predict").get_json()["served_by"] == "b"


def test_a_miss_reads_the_database_again_a_hit_is_served_from_the_cache(
    app, client, db_url, replicas, error_of
):
    p: Proxy = app.extensions["stackml.predict"]
    p.cache_seconds = 3600.0  # the cache never expires by itself in this test
    model_id, _ = add_model(db_url, "m", endpoint=False)
    error_of(predict(client, "/v1/models/m:predict"), 404, "no_endpoint")
    # deployed now: the cached "no endpoint" is not believed, the very next call is served
    a = start(replicas, "a")
    with session_scope(db_url) as s:
        s.add(
            Endpoint(
                id="ep-aaaaaaaaaaaa", project_id="local", model_id=model_id, state="READY",
                target_label="default", serving_version=1, replicas=1, flavor="local.small",
                created_by="test",
            )
        )  # fmt: skip
    rid = add_replica(db_url, "ep-aaaaaaaaaaaa", a.port, 1, state="loading")
    error_of(predict(client, "/v1/models/m:predict"), 503, "no_replica")
    with session_scope(db_url) as s:
        row = s.get(Resource, rid)
        assert row is not None
        row.replica_state = "ready"  # the replica became ready: used at once
    assert predict(client, "/v1/models/m:predict").get_json()["served_by"] == "a"
    # a version and a label that appear after the route was cached
    b = start(replicas, "b")
    with session_scope(db_url) as s:
        s.add(
            ModelVersion(
                model_id=model_id, version=2, state="READY", artifact_uri="file:///m/2",
                created_by="test",
            )
        )  # fmt: skip
        s.flush()
        s.add(ModelLabel(model_id=model_id, name="next", version=2))
    add_replica(db_url, "ep-aaaaaaaaaaaa", b.port, 2)
    assert predict(client, "/v1/models/m/labels/next:predict").get_json()["served_by"] == "b"
    assert predict(client, "/v1/models/m/versions/2:predict").get_json()["served_by"] == "b"
    # a hit is not re-read: a replica drained a moment ago still gets the cached route's calls
    with session_scope(db_url) as s:
        row = s.get(Resource, rid)
        assert row is not None
        row.replica_state = "draining"
    assert predict(client, "/v1/models/m:predict").get_json()["served_by"] == "a"


# -- rate limit ---------------------------------------------------------------------------------


@pytest.fixture
def shared_redis() -> Iterator[tuple[str, str]]:
    queue = f"predict-{uuid.uuid4().hex[:12]}"
    r = redis.Redis.from_url(REDIS_URL, socket_timeout=5)
    r.ping()
    yield REDIS_URL, queue
    for key in r.scan_iter(f"stackml:{queue}:*"):
        r.delete(key)
    r.close()


def test_predictions_are_rate_limited_per_project(
    settings, db_url, replicas, shared_redis, error_of
):
    redis_url, queue = shared_redis
    changed = {"redis_url": redis_url, "queue": queue, "rate_limit_predict_per_minute": 3}
    app = create_app(Settings(**{**settings.model_dump(), **changed}), enqueue=lambda t, j: None)
    app.extensions[auth.EXTENSION] = HeaderCaller()
    client = app.test_client()
    for p in ("p1", "p2"):
        _, ep = add_model(db_url, "m", project=p)
        add_replica(db_url, ep, start(replicas, p).port, 1, project=p)
    for _ in range(3):
        assert (
            predict(client, "/v1/models/m:predict", **{"X-Test-Project": "p1"}).status_code == 200
        )
    r = predict(client, "/v1/models/m/versions/1:predict", **{"X-Test-Project": "p1"})
    err = error_of(r, 429, "too_many_requests")
    assert err["details"]["kind"] == "predict" and int(r.headers["Retry-After"]) >= 1
    assert "X-Model-Version" in r.headers
    assert predict(client, "/v1/models/m:predict", **{"X-Test-Project": "p2"}).status_code == 200


def test_the_limit_holds_when_tokens_are_taken_in_chunks(settings, shared_redis):
    """1000 a minute: each process takes 10 at a time from the shared Redis bucket; two
    processes together get the minute's 1000 (plus what refilled meanwhile), then 429."""
    redis_url, queue = shared_redis
    changed = {"redis_url": redis_url, "queue": queue, "rate_limit_predict_per_minute": 1000}
    limited = Settings(**{**settings.model_dump(), **changed})
    procs = [Tokens(Limiter.from_settings(limited), 1000) for _ in range(2)]  # two processes
    assert procs[0].chunk == 10
    started = time.monotonic()
    granted = 0
    for i in range(1200):
        try:
            procs[i % 2].take("p1")
            granted += 1
        except RateLimited:
            pass
    refill = (time.monotonic() - started) * 1000 / 60
    assert 1000 - 2 * procs[0].chunk <= granted <= 1000 + refill + 1
    with pytest.raises(RateLimited):
        procs[0].take("p1")
    procs[1].take("p2")  # another project has its own bucket


def test_pools_of_replicas_gone_are_closed(app, client, db_url, replicas, monkeypatch):
    monkeypatch.setattr(predict_mod, "PRUNE_EVERY", 0.0)
    p = no_cache(app)
    _, ep = add_model(db_url, "m")
    a, b = start(replicas, "a"), start(replicas, "b")
    rid = add_replica(db_url, ep, a.port, 1)
    assert predict(client, "/v1/models/m:predict").get_json()["served_by"] == "a"
    pool_a = p._pools[("127.0.0.1", a.port)]
    assert len(pool_a._idle) == 1  # kept alive
    with session_scope(db_url) as s:
        row = s.get(Resource, rid)
        assert row is not None
        row.replica_state = "failed"  # replaced by b
    add_replica(db_url, ep, b.port, 1)
    assert predict(client, "/v1/models/m:predict").get_json()["served_by"] == "b"
    assert set(p._pools) == {("127.0.0.1", b.port)}
    assert pool_a._idle == []  # its kept-alive connection was closed
