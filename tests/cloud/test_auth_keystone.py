"""auth=keystone against the devcloud's REAL Keystone: the API served over HTTP in this process
with keystonemiddleware validating real tokens. A table: every endpoint x role (reader,
member, admin, no token, bad token) x project (the caller's own, another) with the expected
status of each cell; expired, revoked and unscoped tokens; spoofed identity headers; and the
CLI authenticating the OpenStack way (clouds.yaml), re-authenticating once on a 401."""

from __future__ import annotations

import datetime as dt
import io
import json
import tarfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests
from click.testing import CliRunner
from werkzeug.serving import make_server

from devcloud.cloud import DevCloud
from service.api import create_app
from service.backends.storage.local import LocalStore
from service.config import Settings
from service.db import jobs as repo
from service.db.models import Base
from service.db.session import dispose_all, engine_for, session_scope
from service.domain.spec import JobSpec
from service.domain.states import JobState

TIMEOUT = 30
ROLES = ("reader", "member", "admin", "none", "bad")
PROJECTS = ("own", "other")
CLOUD_OF = {"reader": "devcloud-reader", "member": "devcloud-demo", "admin": "devcloud"}
# (own project, other project) by role; no-token and bad-token callers aim at demo / alt-demo
PROJECT_OF = {
    "reader": ("demo", "alt-demo"),
    "member": ("demo", "alt-demo"),
    "admin": ("admin", "demo"),
    "none": ("demo", "alt-demo"),
    "bad": ("demo", "alt-demo"),
}


def tarball() -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for name, data in {"trainer/__init__.py": b"", "trainer/task.py": b"print(1)\n"}.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


@dataclass
class Api:
    url: str
    settings: Settings
    store: LocalStore
    projects: dict[str, str]  # name -> id

    def package_uri(self, project_name: str) -> str:
        return self.store.uri(f"projects/{self.projects[project_name]}/staging/t/trainer.tar.gz")

    def job(self, project_name: str, state: JobState = JobState.QUEUED) -> str:
        spec = JobSpec.model_validate(
            {
                "name": "cell",
                "trainer": {
                    "package_uri": self.package_uri(project_name),
                    "module": "trainer.task",
                },
            }
        )
        with session_scope(self.settings.db_url) as s:
            job_id = repo.create_job(s, self.projects[project_name], spec).id
            repo.append_log(s, job_id, 0, b'hello\n{"stackml_metric": 1, "epoch": 1, "loss": 1}\n')
            if state is JobState.CANCELLED:
                repo.transition(s, job_id, JobState.QUEUED, JobState.CANCELLING)
                repo.transition(s, job_id, JobState.CANCELLING, JobState.CANCELLED)
        return job_id

    def state(self, job_id: str) -> str:
        with session_scope(self.settings.db_url) as s:
            return repo.get_job(s, job_id).state

    def count(self) -> int:
        with session_scope(self.settings.db_url) as s:
            return len(repo.list_jobs(s, None, limit=200)[0])


@pytest.fixture(scope="module")
def api(devcloud: DevCloud, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    tmp = tmp_path_factory.mktemp("ksapi")
    settings = Settings(
        data_dir=tmp / "data",
        database_url=f"sqlite:///{tmp / 'stackml.db'}",
        redis_url="memory://",
        secret_key="cloud-test-key",
        auth="keystone",
        compute="sandbox",
        store="local",
        host="127.0.0.1",
        keystone_authtoken={
            "auth_url": devcloud.auth_url,
            "username": "stackml",
            "password": devcloud.password("stackml"),
            "project_name": "service",
            "region_name": "RegionOne",
            "token_cache_time": "-1",  # every request asks Keystone: revocations show at once
        },
    )
    Base.metadata.create_all(engine_for(settings.db_url))
    app = create_app(settings, enqueue=lambda task, job_id: None)
    store = app.extensions["stackml"].store
    for pid in devcloud.projects.values():
        store.put(f"projects/{pid}/staging/t/trainer.tar.gz", tarball())
    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield Api(
            f"http://127.0.0.1:{server.server_port}", settings, store, dict(devcloud.projects)
        )
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
        dispose_all()


@pytest.fixture(scope="module")
def tokens(devcloud: DevCloud) -> dict[str, str | None]:
    out: dict[str, str | None] = {
        role: devcloud.connection(cloud).session.get_token() for role, cloud in CLOUD_OF.items()
    }
    out["none"] = None
    out["bad"] = "gAAAAABnot-a-real-token-" + "x" * 100
    return out


def call(api: Api, method: str, path: str, token: str | None, **kw: Any) -> requests.Response:
    headers = dict(kw.pop("headers", {}))
    if token is not None:
        headers["X-Auth-Token"] = token
    return requests.request(method, api.url + path, headers=headers, timeout=TIMEOUT, **kw)


# -- the table ------------------------------------------------------------------------------

Cell = Callable[[Api, str | None, str, str], requests.Response]


def _create(api: Api, token: str | None, own: str, target: str) -> requests.Response:
    # "other": a spec naming another project's package: refused, whoever asks
    spec = {"name": "cell", "trainer": {"package_uri": api.package_uri(target), "module": "m"}}
    return call(api, "POST", "/v1/jobs", token, json=spec)


def _list(api: Api, token: str | None, own: str, target: str) -> requests.Response:
    api.job(own)
    api.job(target)
    query = "" if target == own else "?all_projects=true"
    resp = call(api, "GET", f"/v1/jobs{query}", token)
    if resp.status_code == 200:  # what a listing shows: the own project, or (admin) all
        seen = {j["project_id"] for j in resp.json()["jobs"]}
        allowed = {api.projects[own]} if target == own else set(api.projects.values())
        assert seen <= allowed and api.projects[own] in seen, seen
        if target != own:
            assert api.projects[target] in seen
    return resp


def _by_id(method: str, suffix: str = "", state: JobState = JobState.QUEUED) -> Cell:
    def cell(api: Api, token: str | None, own: str, target: str) -> requests.Response:
        job_id = api.job(target, state)
        before = api.state(job_id)
        resp = call(api, method, f"/v1/jobs/{job_id}{suffix}", token)
        if resp.status_code >= 400 and method != "GET":
            assert api.state(job_id) == before  # a refused write changed nothing
        return resp

    return cell


def _package(api: Api, token: str | None, own: str, target: str) -> requests.Response:
    # "other": a filename that tries to climb into another project's area
    name = "t.tar.gz" if target == own else f"../../{api.projects[target]}/staging/x/t.tar.gz"
    resp = call(
        api,
        "POST",
        "/v1/packages",
        token,
        params={"filename": name},
        data=tarball(),
        headers={"Content-Type": "application/gzip"},
    )
    if resp.status_code == 201:
        key = api.store.key_of(resp.json()["package_uri"])
        assert key.startswith(f"projects/{api.projects[own]}/staging/"), key
    return resp


def _get(path: str) -> Cell:
    def cell(api: Api, token: str | None, own: str, target: str) -> requests.Response:
        return call(api, "GET", path, token)

    return cell


ENDPOINTS: dict[str, Cell] = {
    "jobs.create": _create,
    "jobs.list": _list,
    "jobs.get": _by_id("GET"),
    "jobs.cancel": _by_id("POST", "/cancel"),
    "jobs.delete": _by_id("DELETE", "", JobState.CANCELLED),
    "jobs.logs": _by_id("GET", "/logs"),
    "jobs.events": _by_id("GET", "/events"),
    "jobs.metrics": _by_id("GET", "/metrics"),
    "packages.upload": _package,
    "flavors": _get("/v1/flavors"),
    "openapi": _get("/v1/openapi.json"),
    "healthz": _get("/healthz"),
    "readyz": _get("/readyz"),
}
READS = {"jobs.get": 200, "jobs.logs": 200, "jobs.events": 200, "jobs.metrics": 200}
PUBLIC = {"openapi", "healthz", "readyz"}


def expected(endpoint: str, role: str, project: str) -> int:
    if endpoint in PUBLIC:
        return 200
    if role in ("none", "bad"):
        return 401
    own = project == "own"
    admin = role == "admin"
    if endpoint in READS:
        return 200 if own or admin else 404
    if endpoint == "jobs.list":
        return 200 if own or admin else 403
    if endpoint == "flavors":
        return 200
    if role == "reader":
        return 403  # any write, before the id is even looked at
    if endpoint == "jobs.create":
        return 202 if own else 422
    if endpoint == "jobs.cancel":
        return 202 if own or admin else 404
    if endpoint == "jobs.delete":
        return 204 if own or admin else 404
    if endpoint == "packages.upload":
        return 201
    raise AssertionError(endpoint)


def test_every_endpoint_by_role_and_project(
    api: Api, tokens: dict[str, str | None], devcloud: DevCloud, capsys: Any
) -> None:
    tried = 0
    wrong: list[str] = []
    for endpoint, cell in ENDPOINTS.items():
        for role in ROLES:
            for project in PROJECTS:
                own, other = PROJECT_OF[role]
                target = own if project == "own" else other
                resp = cell(api, tokens[role], own, target)
                tried += 1
                want = expected(endpoint, role, project)
                if resp.status_code != want:
                    wrong.append(f"{endpoint} {role} {project}: {resp.status_code} != {want}")
                    continue
                if resp.status_code >= 400:
                    err = resp.json()["error"]
                    assert set(err) == {"code", "message", "details", "request_id"}
                    assert err["request_id"] == resp.headers["X-Request-Id"]
                if resp.status_code == 401:
                    assert resp.json()["error"]["code"] == "unauthorized"
                    assert resp.headers["WWW-Authenticate"] == f'Keystone uri="{devcloud.auth_url}"'
                if resp.status_code == 403:
                    assert resp.json()["error"]["code"] == "forbidden"
                if resp.status_code == 404:
                    assert resp.json()["error"]["code"] == "not_found"
                for t in tokens.values():
                    assert t is None or t not in resp.text  # no token echoed back
    with capsys.disabled():
        print(f"\nendpoint x role x project cells tried: {tried}; wrong: {len(wrong)}")
    assert not wrong, "\n".join(wrong)
    assert tried == len(ENDPOINTS) * len(ROLES) * len(PROJECTS)


def test_jobs_submitted_with_a_token_belong_to_its_project(
    api: Api, tokens: dict[str, str | None], devcloud: DevCloud
) -> None:
    resp = call(api, "POST", "/v1/jobs", tokens["member"], json=_spec(api, "demo"))
    assert resp.status_code == 202, resp.text
    job = resp.json()
    assert job["project_id"] == api.projects["demo"]
    # alt's member does not see it, in any way
    alt = _token(devcloud, "devcloud-alt")
    assert call(api, "GET", f"/v1/jobs/{job['id']}", alt).status_code == 404
    assert job["id"] not in {j["id"] for j in call(api, "GET", "/v1/jobs", alt).json()["jobs"]}


def _spec(api: Api, project: str) -> dict[str, Any]:
    return {"name": "mine", "trainer": {"package_uri": api.package_uri(project), "module": "m"}}


def _token(devcloud: DevCloud, cloud: str) -> str:
    return str(devcloud.connection(cloud).session.get_token())


# -- tokens that are no longer good ------------------------------------------------------------


def _keystone(devcloud: DevCloud, method: str, path: str, token: str, **kw: Any) -> Any:
    headers = {"X-Auth-Token": token, **kw.pop("headers", {})}
    resp = requests.request(
        method, devcloud.auth_url + path, headers=headers, timeout=TIMEOUT, **kw
    )
    resp.raise_for_status()
    return resp


def test_revoked_token_is_401(api: Api, devcloud: DevCloud) -> None:
    token = _token(devcloud, "devcloud-demo")
    assert call(api, "GET", "/v1/jobs", token).status_code == 200
    _keystone(devcloud, "DELETE", "/auth/tokens", token, headers={"X-Subject-Token": token})
    resp = call(api, "GET", "/v1/jobs", token)
    assert resp.status_code == 401 and resp.json()["error"]["code"] == "unauthorized"
    assert "expired, revoked" in resp.json()["error"]["message"]
    assert resp.headers["WWW-Authenticate"].startswith("Keystone uri=")


def test_expired_token_is_401(api: Api, devcloud: DevCloud) -> None:
    """Keystone caps a token at its application credential's expiry: a credential that lives
    for a few seconds gives a token that expires with it."""
    demo = devcloud.connection("devcloud-demo")
    user_token = demo.session.get_token()
    user_id = demo.current_user_id
    expires = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=12)
    body = {
        "application_credential": {
            "name": f"short-lived-{time.time_ns()}",
            "expires_at": expires.strftime("%Y-%m-%dT%H:%M:%S.%f"),
        }
    }
    cred = _keystone(
        devcloud, "POST", f"/users/{user_id}/application_credentials", user_token, json=body
    ).json()["application_credential"]
    auth = {
        "auth": {
            "identity": {
                "methods": ["application_credential"],
                "application_credential": {"id": cred["id"], "secret": cred["secret"]},
            }
        }
    }
    resp = requests.post(f"{devcloud.auth_url}/auth/tokens", json=auth, timeout=TIMEOUT)
    resp.raise_for_status()
    token = resp.headers["X-Subject-Token"]
    token_expiry = dt.datetime.fromisoformat(resp.json()["token"]["expires_at"])
    assert token_expiry <= expires + dt.timedelta(seconds=1)
    assert call(api, "GET", "/v1/jobs", token).status_code == 200
    while dt.datetime.now(dt.UTC) <= token_expiry + dt.timedelta(seconds=1):
        time.sleep(0.25)
    resp = call(api, "GET", "/v1/jobs", token)
    assert resp.status_code == 401, resp.text
    assert resp.json()["error"]["code"] == "unauthorized"


def test_a_token_without_a_project_is_403(api: Api, devcloud: DevCloud) -> None:
    """A system-scoped admin token (Keystone scopes a bare login to the user's default
    project, so this is the token without a project that a user can really get)."""
    creds = devcloud.credentials("devcloud")
    auth = {
        "auth": {
            "identity": {
                "methods": ["password"],
                "password": {
                    "user": {
                        "name": creds["username"],
                        "domain": {"name": "Default"},
                        "password": creds["password"],
                    }
                },
            },
            "scope": {"system": {"all": True}},
        }
    }
    resp = requests.post(f"{devcloud.auth_url}/auth/tokens", json=auth, timeout=TIMEOUT)
    resp.raise_for_status()
    assert "project" not in resp.json()["token"]
    token = resp.headers["X-Subject-Token"]
    resp = call(api, "GET", "/v1/jobs", token)
    assert resp.status_code == 403 and "project-scoped" in resp.json()["error"]["message"]


def test_identity_headers_cannot_be_spoofed(api: Api, tokens) -> None:
    theirs = api.job("alt-demo")
    spoof = {
        "X-Project-Id": api.projects["alt-demo"],
        "X-Tenant-Id": api.projects["alt-demo"],
        "X-Roles": "admin,member,reader",
        "X-Identity-Status": "Confirmed",
        "X-User-Id": "someone-else",
    }
    assert (
        call(api, "GET", f"/v1/jobs/{theirs}", tokens["member"], headers=spoof).status_code == 404
    )
    resp = call(api, "GET", "/v1/jobs?all_projects=true", tokens["reader"], headers=spoof)
    assert resp.status_code == 403
    assert call(api, "GET", "/v1/jobs", None, headers=spoof).status_code == 401


# -- the CLI, the OpenStack way ---------------------------------------------------------------


def test_cli_authenticates_with_clouds_yaml(
    api: Api, devcloud: DevCloud, monkeypatch: pytest.MonkeyPatch
) -> None:
    from service.cli import cli

    mine = api.job("demo")
    theirs = api.job("alt-demo")
    monkeypatch.setenv("OS_CLIENT_CONFIG_FILE", str(devcloud.clouds_yaml))
    monkeypatch.delenv("OS_CLOUD", raising=False)
    monkeypatch.delenv("OS_AUTH_URL", raising=False)
    monkeypatch.delenv("STACKML_TOKEN", raising=False)
    runner = CliRunner()
    args = ["--url", api.url, "--os-cloud", "devcloud-demo", "jobs", "list", "-o", "json"]
    result = runner.invoke(cli, args)
    assert result.exit_code == 0, result.output
    ids = {j["id"] for j in json.loads(result.output)["jobs"]}
    assert mine in ids and theirs not in ids
    assert devcloud.password("demo") not in result.output
    # OS_CLOUD works the same; a reader cannot cancel, and says so in one sentence
    monkeypatch.setenv("OS_CLOUD", "devcloud-reader")
    result = runner.invoke(cli, ["--url", api.url, "jobs", "cancel", mine])
    assert result.exit_code == 1
    assert "member role" in result.output and "HTTP 403" in result.output
    # without any OpenStack configuration the CLI sends no token: 401, said plainly
    monkeypatch.delenv("OS_CLOUD")
    result = runner.invoke(cli, ["--url", api.url, "jobs", "list"])
    assert result.exit_code == 1 and "HTTP 401" in result.output


def test_client_reauthenticates_once_when_its_token_is_revoked(
    api: Api, devcloud: DevCloud, monkeypatch: pytest.MonkeyPatch
) -> None:
    from service.client import StackMLClient, keystone_tokens

    monkeypatch.setenv("OS_CLIENT_CONFIG_FILE", str(devcloud.clouds_yaml))
    source = keystone_tokens("devcloud-demo")
    client = StackMLClient(api.url, auth=source)
    client.list_jobs()
    first = source.token()
    _keystone(devcloud, "DELETE", "/auth/tokens", first, headers={"X-Subject-Token": first})
    assert call(api, "GET", "/v1/jobs", first).status_code == 401
    assert client.list_jobs()["jobs"] is not None  # 401, a new login, then 200
    assert source.token() != first
    assert first not in repr(client) and first not in repr(source)


def test_cli_with_a_wrong_password_says_so(
    devcloud: DevCloud, api: Api, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from service.cli import cli

    monkeypatch.delenv("OS_CLOUD", raising=False)
    monkeypatch.delenv("OS_CLIENT_CONFIG_FILE", raising=False)
    monkeypatch.setenv("OS_AUTH_URL", devcloud.auth_url)
    monkeypatch.setenv("OS_USERNAME", "demo")
    monkeypatch.setenv("OS_PASSWORD", "definitely-wrong-password")
    monkeypatch.setenv("OS_PROJECT_NAME", "demo")
    monkeypatch.setenv("OS_USER_DOMAIN_NAME", "Default")
    monkeypatch.setenv("OS_PROJECT_DOMAIN_NAME", "Default")
    monkeypatch.setenv("OS_INTERFACE", "public")
    result = CliRunner().invoke(cli, ["--url", api.url, "jobs", "list"])
    assert result.exit_code == 1
    assert "cannot get a Keystone token" in result.output
    assert "definitely-wrong-password" not in result.output
