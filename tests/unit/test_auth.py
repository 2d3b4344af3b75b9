"""Auth modes and the role rule: noauth's loopback guard, keystone mode with keystonemiddleware in
front of the app (a Keystone that does not answer: no token, spoofed headers, Keystone down),
the reader/member/admin rule and project isolation (a test double supplies the identity the
middleware would), and the client's Keystone tokens (re-authenticating once on a 401).
The same table against a real Keystone is tests/cloud/test_auth_keystone.py."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from flask import Flask, Request
from flask.testing import FlaskClient
from sqlalchemy import func, select
from werkzeug.serving import make_server

from service.api import auth, create_app
from service.api.auth import Caller, ConfigurationError, NotAuthenticated
from service.config import Settings
from service.db import jobs as repo
from service.db.models import Job
from service.db.session import session_scope
from service.domain.spec import JobSpec

CHALLENGE = 'Keystone uri="http://keystone.invalid/v3"'


class HeaderAuth:
    """Stands in for keystonemiddleware + KeystoneAuth: the identity comes from X-Test-*
    headers, as the middleware's X-Project-Id / X-Roles would after validating a token."""

    def wrap(self, app: Any) -> Any:
        return app

    def caller(self, request: Request) -> Caller:
        project = request.headers.get("X-Test-Project")
        if not project:
            raise NotAuthenticated("no token", challenge=CHALLENGE)
        roles = {r for r in request.headers.get("X-Test-Roles", "").split(",") if r}
        return Caller(project, f"user-{project}", frozenset(roles), "tok", cross_project=True)


def who(project: str, *roles: str) -> dict[str, str]:
    return {"X-Test-Project": project, "X-Test-Roles": ",".join(roles)}


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def count_jobs(url: str) -> int:
    with session_scope(url) as s:
        return int(s.scalar(select(func.count()).select_from(Job)) or 0)


def make_job(url: str, project: str, package_uri: str, name: str = "theirs") -> str:
    spec = JobSpec.model_validate(
        {"name": name, "trainer": {"package_uri": package_uri, "module": "m"}}
    )
    with session_scope(url) as s:
        return repo.create_job(s, project, spec).id


@pytest.fixture
def roles_app(app: Flask) -> Flask:
    app.extensions[auth.EXTENSION] = HeaderAuth()
    return app


@pytest.fixture
def rc(roles_app: Flask) -> FlaskClient:
    return roles_app.test_client()


# -- noauth ---------------------------------------------------------------------------------


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "10.1.2.3", "192.168.0.7", "example.com"])
def test_noauth_refuses_a_non_loopback_bind_and_says_why(settings: Settings, host: str) -> None:
    with pytest.raises(ConfigurationError) as exc:
        create_app(settings.model_copy(update={"host": host}), enqueue=lambda t, j: None)
    text = str(exc.value)
    assert "non-loopback" in text and repr(host) in text
    assert "127.0.0.1" in text and "auth=keystone" in text


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.5", "::1", "localhost"])
def test_noauth_serves_on_loopback(settings: Settings, db_url: str, host: str) -> None:
    app = create_app(settings.model_copy(update={"host": host}), enqueue=lambda t, j: None)
    assert app.test_client().get("/v1/jobs").status_code == 200


def test_noauth_caller_is_the_local_project_with_every_role(app: Flask) -> None:
    with app.test_request_context("/v1/jobs"):
        caller = auth.current()
    assert caller.project_id == "local"
    assert caller.has("reader") and caller.has("member") and caller.is_admin
    assert not caller.reaches_all_projects  # one project is all there is


def test_noauth_ignores_identity_headers(client: FlaskClient, db_url: str, package_uri) -> None:
    make_job(db_url, "other", package_uri)
    resp = client.get("/v1/jobs", headers={"X-Project-Id": "other", "X-Roles": "admin"})
    assert resp.get_json()["jobs"] == []
    resp = client.get("/v1/jobs?all_projects=true")
    assert resp.status_code == 200 and resp.get_json()["jobs"] == []


def test_cli_up_reports_the_refusal(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from service.cli import cli
    from service.config import reset_settings

    monkeypatch.setenv("STACKML_DATA_DIR", str(tmp_path))
    reset_settings()

    class Refusing:
        def __init__(self, settings: Settings, **kw: Any) -> None:
            self.settings = settings

        def start(self) -> None:
            from service.api.auth import make_authenticator

            make_authenticator(self.settings)

    monkeypatch.setattr("service.platform.LocalPlatform", Refusing)
    try:
        result = CliRunner().invoke(cli, ["up", "--host", "0.0.0.0"])
    finally:
        reset_settings()
    assert result.exit_code == 1
    assert "refuses to serve on the non-loopback address '0.0.0.0'" in result.output


# -- the caller -----------------------------------------------------------------------------


def test_caller_never_shows_its_token() -> None:
    c = Caller("p", "u", frozenset({"member"}), token="gAAAAAsecret-token")
    assert "secret-token" not in repr(c) and "secret-token" not in str(c)
    assert c == Caller("p", "u", frozenset({"member"}), token="another")


@pytest.mark.parametrize(
    ("roles", "reader", "member", "admin"),
    [
        ({"reader"}, True, False, False),
        ({"member"}, True, True, False),
        ({"admin"}, True, True, True),
        ({"heat_stack_owner"}, False, False, False),
        (set(), False, False, False),
    ],
)
def test_roles_imply_the_ones_below(roles, reader, member, admin) -> None:
    c = Caller("p", "u", frozenset(roles))
    assert (c.has("reader"), c.has("member"), c.has("admin")) == (reader, member, admin)


def test_requires_rejects_an_unknown_role() -> None:
    with pytest.raises(ValueError):
        auth.requires("superuser")


# -- the role rule and isolation (identity from the test double) -----------------------------


def test_no_identity_is_401_with_the_challenge(rc: FlaskClient, error_of) -> None:
    for method, path in [("GET", "/v1/jobs"), ("POST", "/v1/jobs"), ("GET", "/v1/flavors")]:
        resp = rc.open(path, method=method)
        err = error_of(resp, 401, "unauthorized")
        assert resp.headers["WWW-Authenticate"] == CHALLENGE
        assert "token" in err["message"]


def test_public_routes_need_no_identity(rc: FlaskClient) -> None:
    assert rc.get("/healthz").status_code == 200
    assert rc.get("/v1/openapi.json").status_code == 200
    assert rc.get("/readyz").status_code in (200, 503)  # the broker is absent in unit tests
    # the store's own authorisation is the signature: a bad one is its own 401
    resp = rc.get("/v1/store/projects/local/x?temp_url_sig=00&temp_url_expires=1&temp_url_prefix=")
    assert resp.status_code == 401 and resp.get_json()["error"]["code"] == "grant_denied"
    assert "WWW-Authenticate" not in resp.headers
    # an unknown route is a 404 for anyone: it reveals nothing
    assert rc.get("/v1/nothing-here").status_code == 404


def test_reader_reads_but_cannot_write(rc: FlaskClient, db_url, package_uri, spec, error_of):
    job_id = make_job(db_url, "local", package_uri, "mine")
    r = who("local", "reader")
    for path in ("/v1/jobs", f"/v1/jobs/{job_id}", f"/v1/jobs/{job_id}/events", "/v1/flavors"):
        assert rc.get(path, headers=r).status_code == 200, path
    assert rc.get(f"/v1/jobs/{job_id}/logs", headers=r).status_code == 200
    before = count_jobs(db_url)
    writes = [
        ("POST", "/v1/jobs", {"json": spec(package_uri)}),
        ("POST", f"/v1/jobs/{job_id}/cancel", {}),
        ("DELETE", f"/v1/jobs/{job_id}", {}),
        ("POST", "/v1/packages", {"data": b"x", "content_type": "application/gzip"}),
    ]
    for method, path, kw in writes:
        err = error_of(rc.open(path, method=method, headers=r, **kw), 403, "forbidden")
        assert err["details"] == {"required_role": "member"}
    assert count_jobs(db_url) == before
    with session_scope(db_url) as s:
        assert repo.get_job(s, job_id).state == "QUEUED"  # not cancelled


def test_a_token_without_a_stackml_role_is_403(rc: FlaskClient, error_of) -> None:
    resp = rc.get("/v1/jobs", headers=who("local", "heat_stack_owner"))
    assert error_of(resp, 403, "forbidden")["details"] == {"required_role": "reader"}


def test_member_works_in_its_project(rc: FlaskClient, package_uri, spec, enqueued) -> None:
    m = who("local", "member")
    resp = rc.post("/v1/jobs", json=spec(package_uri), headers=m)
    assert resp.status_code == 202, resp.get_json()
    job = resp.get_json()
    assert job["project_id"] == "local"
    assert rc.post(f"/v1/jobs/{job['id']}/cancel", headers=m).status_code == 202
    assert rc.delete(f"/v1/jobs/{job['id']}", headers=m).status_code == 204


@pytest.mark.parametrize("roles", [("reader",), ("member",)])
def test_another_projects_job_is_404_everywhere(rc, db_url, package_uri, error_of, roles):
    theirs = make_job(db_url, "other", package_uri)
    h = who("local", *roles)
    for method, suffix in [
        ("GET", ""),
        ("GET", "/logs"),
        ("GET", "/logs?follow=true&timeout=0.1"),
        ("GET", "/events"),
        ("GET", "/metrics"),
        ("POST", "/cancel"),
        ("DELETE", ""),
    ]:
        resp = rc.open(f"/v1/jobs/{theirs}{suffix}", method=method, headers=h)
        if method != "GET" and roles == ("reader",):
            error_of(resp, 403, "forbidden")  # the role decides first, whatever the id
        else:
            error_of(resp, 404, "not_found")
    # and the listing never shows it, nor takes it as a marker
    assert rc.get("/v1/jobs", headers=h).get_json()["jobs"] == []
    error_of(rc.get(f"/v1/jobs?marker={theirs}", headers=h), 400, "invalid_request")
    with session_scope(db_url) as s:
        assert repo.get_job(s, theirs).state == "QUEUED"


def test_404_of_another_projects_job_is_the_404_of_no_job(rc, db_url, package_uri) -> None:
    theirs = make_job(db_url, "other", package_uri)
    h = who("local", "member")
    a = rc.get(f"/v1/jobs/{theirs}", headers=h).get_json()["error"]
    b = rc.get("/v1/jobs/job-0000000000000000", headers=h).get_json()["error"]
    assert a["code"] == b["code"] and a["details"].keys() == b["details"].keys()


def test_all_projects_is_for_admins(rc, db_url, package_uri, error_of) -> None:
    mine = make_job(db_url, "local", package_uri, "mine")
    theirs = make_job(db_url, "other", package_uri)
    err = error_of(rc.get("/v1/jobs?all_projects=true", headers=who("local", "member")), 403)
    assert err["details"] == {"parameter": "all_projects"}
    admin = who("local", "admin")
    own = {j["id"] for j in rc.get("/v1/jobs", headers=admin).get_json()["jobs"]}
    assert own == {mine}
    every = rc.get("/v1/jobs?all_projects=true", headers=admin).get_json()["jobs"]
    assert {j["id"] for j in every} == {mine, theirs}
    error_of(rc.get("/v1/jobs?all_projects=maybe", headers=admin), 400, "invalid_request")
    # an admin reaches any project's job by id, and may cancel it
    assert rc.get(f"/v1/jobs/{theirs}", headers=admin).get_json()["project_id"] == "other"
    assert rc.post(f"/v1/jobs/{theirs}/cancel", headers=admin).status_code == 202


def test_requires_marks_a_view(app: Flask, error_of) -> None:
    @auth.requires("admin")
    def only_admins() -> str:
        return "ok"

    app.add_url_rule("/test-admin", view_func=only_admins, methods=["GET"])
    app.extensions[auth.EXTENSION] = HeaderAuth()
    c = app.test_client()
    err = error_of(c.get("/test-admin", headers=who("p", "member")), 403, "forbidden")
    assert err["details"] == {"required_role": "admin"}
    assert c.get("/test-admin", headers=who("p", "admin")).status_code == 200


# -- keystone mode with keystonemiddleware (a Keystone that does not answer) -----------------


@pytest.fixture
def dead_keystone() -> str:
    return f"http://127.0.0.1:{closed_port()}/v3"


def keystone_conf(auth_url: str, **extra: str) -> dict[str, str]:
    return {
        "auth_url": auth_url,
        "username": "stackml",
        "password": "service-password",
        "project_name": "service",
        "token_cache_time": "-1",
        "http_request_max_retries": "0",
        "http_connect_timeout": "2",
        **extra,
    }


@pytest.fixture
def ks_client(settings: Settings, db_url: str, dead_keystone: str) -> FlaskClient:
    ks = Settings(
        **{
            **settings.model_dump(),
            "auth": "keystone",
            "host": "0.0.0.0",
            "keystone_authtoken": keystone_conf(dead_keystone),
        }
    )
    return create_app(ks, enqueue=lambda t, j: None).test_client()


def test_keystone_without_a_token_is_401_in_the_one_shape(ks_client, dead_keystone, error_of):
    resp = ks_client.get("/v1/jobs")
    err = error_of(resp, 401, "unauthorized")
    assert resp.headers["WWW-Authenticate"] == f'Keystone uri="{dead_keystone}"'
    assert "X-Auth-Token" in err["message"]


def test_keystone_strips_spoofed_identity_headers(ks_client: FlaskClient, error_of) -> None:
    spoofed = {
        "X-Identity-Status": "Confirmed",
        "X-Project-Id": "local",
        "X-User-Id": "someone",
        "X-Roles": "admin,member,reader",
        "X-Service-Identity-Status": "Confirmed",
    }
    error_of(ks_client.get("/v1/jobs", headers=spoofed), 401, "unauthorized")
    error_of(ks_client.post("/v1/jobs", json={}, headers=spoofed), 401, "unauthorized")


def test_keystone_public_routes_stay_open(ks_client: FlaskClient) -> None:
    assert ks_client.get("/healthz").status_code == 200
    assert ks_client.get("/v1/openapi.json").status_code == 200
    assert ks_client.get("/readyz").status_code != 401
    resp = ks_client.get("/v1/store/projects/p/x?temp_url_sig=0&temp_url_expires=1")
    assert resp.get_json()["error"]["code"] == "grant_denied"
    assert "WWW-Authenticate" not in resp.headers  # not Keystone's challenge: a signature


def test_keystone_down_is_503_not_401(ks_client: FlaskClient, error_of) -> None:
    resp = ks_client.get("/v1/jobs", headers={"X-Auth-Token": "gAAAAAB-some-token"})
    error_of(resp, 503, "service_unavailable")
    assert resp.headers["Retry-After"]
    assert "gAAAAAB-some-token" not in resp.get_data(as_text=True)
    assert ks_client.get("/healthz").status_code == 200


def test_keystone_mode_refuses_an_incomplete_configuration(settings: Settings) -> None:
    base = {**settings.model_dump(), "auth": "keystone"}
    with pytest.raises(ConfigurationError, match="missing auth_url, username, password"):
        create_app(Settings(**base), enqueue=lambda t, j: None)
    bad = keystone_conf("http://127.0.0.1:1/v3", pasword="typo")
    with pytest.raises(ConfigurationError, match="unknown option.*pasword"):
        create_app(Settings(**{**base, "keystone_authtoken": bad}), enqueue=lambda t, j: None)
    bad = keystone_conf("http://127.0.0.1:1/v3", auth_type="no-such-plugin")
    with pytest.raises(ConfigurationError, match="no-such-plugin"):
        create_app(Settings(**{**base, "keystone_authtoken": bad}), enqueue=lambda t, j: None)


def test_keystone_conf_takes_yaml_values() -> None:
    conf = auth.authtoken_conf(
        {
            **keystone_conf("http://k/v3"),
            "token_cache_time": 300,
            "insecure": True,
            "memcached_servers": ["a:11211", "b:11211"],
        }
    )
    assert conf["token_cache_time"] == "300" and conf["insecure"] == "true"
    assert conf["memcached_servers"] == "a:11211,b:11211"


def test_keystone_conf_defaults_and_forced_options() -> None:
    conf = auth.authtoken_conf(keystone_conf("http://k/v3", delay_auth_decision="false"))
    assert conf["delay_auth_decision"] == "true"  # the app decides, always
    assert conf["interface"] == "public"
    assert conf["www_authenticate_uri"] == "http://k/v3"
    conf = auth.authtoken_conf(keystone_conf("http://k/v3", interface="internal"))
    assert conf["interface"] == "internal"


# -- the client: Keystone tokens, one re-authentication on 401 --------------------------------


class FakeTokens:
    """A TokenSource: hands out tok-1, tok-2, ... (a new one after each invalidate)."""

    def __init__(self) -> None:
        self.n = 1
        self.asked = 0
        self.invalidated = 0

    def token(self) -> str:
        self.asked += 1
        return f"tok-{self.n}"

    def invalidate(self) -> None:
        self.invalidated += 1
        self.n += 1


class TokenAuth:
    """Accepts only the tokens in `valid` (as keystonemiddleware would after a revocation)."""

    def __init__(self, valid: set[str]) -> None:
        self.valid = valid
        self.seen: list[str | None] = []

    def wrap(self, app: Any) -> Any:
        return app

    def caller(self, request: Request) -> Caller:
        token = request.headers.get("X-Auth-Token")
        self.seen.append(token)
        if token not in self.valid:
            raise NotAuthenticated("the token is not valid", challenge=CHALLENGE)
        return Caller("local", "u", frozenset({"member"}), token)


@pytest.fixture
def token_api(app: Flask) -> Iterator[tuple[str, TokenAuth]]:
    tauth = TokenAuth({"tok-2"})
    app.extensions[auth.EXTENSION] = tauth
    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}", tauth
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)


def test_client_reauthenticates_once_on_401(token_api, tmp_path, tarball) -> None:
    from service.client import APIError, StackMLClient

    url, tauth = token_api
    tokens = FakeTokens()
    client = StackMLClient(url, auth=tokens, timeout=10)
    assert client.list_jobs()["jobs"] == []
    assert tauth.seen == ["tok-1", "tok-2"] and tokens.invalidated == 1
    # a streamed upload is rewound and sent again with the new token
    tauth.valid = {"tok-3"}
    path = tmp_path / "p.tar.gz"
    path.write_bytes(tarball({"trainer/__init__.py": b""}))
    assert client.upload_package(path)["size"] == path.stat().st_size
    assert tauth.seen[-2:] == ["tok-2", "tok-3"]
    # a token refused twice is the API's 401, not a loop
    tauth.valid = set()
    with pytest.raises(APIError) as exc:
        client.get_job("job-0000000000000000")
    assert exc.value.status == 401 and tokens.invalidated == 3
    assert "tok-" not in str(exc.value) and "tok-" not in repr(client)


def test_clone_shares_the_token_source(token_api) -> None:
    from service.client import StackMLClient

    url, _ = token_api
    tokens = FakeTokens()
    clone = StackMLClient(url, auth=tokens).clone()
    assert clone.auth is tokens


def test_cli_uses_keystone_tokens_when_os_cloud_is_set(token_api, monkeypatch) -> None:
    from service import cli as cli_mod

    url, tauth = token_api
    tokens = FakeTokens()
    asked: list[str | None] = []

    def fake_keystone_tokens(cloud: str | None = None) -> FakeTokens:
        asked.append(cloud)
        return tokens

    monkeypatch.setattr("service.cli.common.keystone_tokens", fake_keystone_tokens)
    monkeypatch.delenv("OS_AUTH_URL", raising=False)
    monkeypatch.delenv("STACKML_TOKEN", raising=False)
    monkeypatch.setenv("OS_CLOUD", "devcloud-demo")
    result = CliRunner().invoke(cli_mod.cli, ["--url", url, "jobs", "list", "-o", "json"])
    assert result.exit_code == 0, result.output
    assert asked == ["devcloud-demo"] and tauth.seen[-1] == "tok-2"
    assert "tok-" not in result.output
    # --os-cloud wins over OS_CLOUD; without either (and no OS_AUTH_URL) no token is sent
    result = CliRunner().invoke(cli_mod.cli, ["--url", url, "--os-cloud", "x", "jobs", "list"])
    assert asked[-1] == "x"
    monkeypatch.delenv("OS_CLOUD")
    tauth.valid = {None}  # type: ignore[arg-type]
    result = CliRunner().invoke(cli_mod.cli, ["--url", url, "jobs", "list"])
    assert result.exit_code == 0, result.output
    assert tauth.seen[-1] is None and asked[-1] == "x"


def test_keystone_tokens_failure_is_one_clear_error(monkeypatch, tmp_path) -> None:
    from service.client import AuthenticationFailed, keystone_tokens

    clouds = tmp_path / "clouds.yaml"
    port = closed_port()
    clouds.write_text(
        "clouds:\n  nowhere:\n    auth:\n"
        f"      auth_url: http://127.0.0.1:{port}/v3\n"
        "      username: u\n      password: very-secret-password\n      project_name: p\n"
        "      user_domain_name: Default\n      project_domain_name: Default\n"
    )
    monkeypatch.setenv("OS_CLIENT_CONFIG_FILE", str(clouds))
    tokens = keystone_tokens("nowhere")
    with pytest.raises(AuthenticationFailed) as exc:
        tokens.token()
    assert "cloud 'nowhere'" in str(exc.value)
    assert "very-secret-password" not in str(exc.value) + repr(tokens)
    with pytest.raises(AuthenticationFailed):
        keystone_tokens("no-such-cloud")
