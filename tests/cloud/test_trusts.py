"""Acting for the project through Keystone trusts, against the devcloud's REAL Keystone and the
Nova emulator (which validates tokens with its own service login, as Nova does).

The platform runs with auth=keystone and the openstack backend. A member of project `demo`
submits a job; its token is then revoked (Keystone answers for it as for an expired one) before
any server exists. The job still boots its server in `demo` as that user, completes, and
leaves no trust behind. With `tenancy: service` the same job runs in stackml's own project
and no trust is made. A token that Keystone stops accepting between the API's check and the
trust gets 401 and leaves no job behind."""

from __future__ import annotations

import json
import shutil
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import requests
from werkzeug.serving import make_server

from devcloud.cloud import DevCloud
from service.api import create_app
from service.client import APIError, StackMLClient
from service.config import Settings
from service.db.models import Base
from service.db.session import dispose_all, engine_for, session_scope
from service.platform import LocalPlatform
from tests.cloud.conftest import RUNTIME_ROOT, scratch_dir, wait_job
from tests.envutil import environ, free_port
from tests.pgutil import temp_database

REDIS_URL = "redis://127.0.0.1:6379/12"
TRAINER = """
    import json, os, time
    print("hello from", os.environ["STACKML_JOB_ID"], flush=True)
    time.sleep(10)  # long enough for the test to look at the server while it runs
    open(os.path.join(os.environ["STACKML_MODEL_DIR"], "model.txt"), "w").write("42\\n")
"""


def _authtoken(cloud: DevCloud, cache: bool) -> dict[str, str]:
    return {
        "auth_url": cloud.auth_url,
        "username": "stackml",
        "password": cloud.password("stackml"),
        "project_name": "service",
        "region_name": "RegionOne",
        # -1: every request asks Keystone (revocations show at once)
        "token_cache_time": "300" if cache else "-1",
    }


def _platform_env(cloud: DevCloud, data: Path, db_url: str, tenancy: str) -> dict[str, str]:
    return {
        "STACKML_DATA_DIR": str(data),
        "STACKML_DATABASE_URL": db_url,
        "STACKML_REDIS_URL": REDIS_URL,
        "STACKML_QUEUE": f"stackml-trust-{tenancy}-{id(data)}",
        "STACKML_PORT": str(free_port()),
        "STACKML_RUNTIME_ROOT": str(RUNTIME_ROOT),
        "STACKML_AUTH": "keystone",
        "STACKML_KEYSTONE_AUTHTOKEN": json.dumps(_authtoken(cloud, cache=False)),
        "STACKML_TENANCY": tenancy,
        "STACKML_COMPUTE": "openstack",
        "STACKML_STORE": "swift",
        "OS_CLIENT_CONFIG_FILE": str(cloud.clouds_yaml),
        "STACKML_OPENSTACK_CLOUD": "devcloud-stackml",
        "STACKML_DEFAULT_FLAVOR": "m1.small",
        "STACKML_BOOT_DEADLINE": "20",
        "STACKML_STUCK_AFTER": "10",
        "STACKML_RECONCILE_INTERVAL": "2",
        # the first allocate step waits: the user's token is revoked before any server exists
        "STACKML_CHAOS_PAUSE": "allocate:1.5",
    }


@pytest.fixture(scope="module", params=["project", "service"])
def platform(
    request: pytest.FixtureRequest, devcloud_emulator: DevCloud
) -> Iterator[tuple[LocalPlatform, DevCloud, str]]:
    tenancy = request.param
    data = scratch_dir(f"trust-{tenancy}")
    with temp_database(f"trust{tenancy}") as db_url:
        env = _platform_env(devcloud_emulator, data, db_url, tenancy)
        try:
            with environ(env), LocalPlatform(Settings(), concurrency=2, quiet=True) as p:
                yield p, devcloud_emulator, tenancy
        finally:
            shutil.rmtree(data, ignore_errors=True)


def _revoke(cloud: DevCloud, token: str) -> None:
    admin = cloud.connection("devcloud").session.get_token()
    r = requests.delete(
        f"{cloud.auth_url}/auth/tokens",
        headers={"X-Auth-Token": admin, "X-Subject-Token": token},
        timeout=10,
    )
    assert r.status_code == 204, r.text


def _trusts_of(cloud: DevCloud, user_id: str) -> list[str]:
    admin = cloud.connection("devcloud")
    return [t.id for t in admin.identity.trusts(trustor_user_id=user_id)]


def _demo_trust(s: Settings, demo: Any, roles: frozenset[str] = frozenset({"member"})) -> str:
    """A trust from the devcloud's demo user to stackml's service user, as the API makes one."""
    from service import trusts

    return trusts.create(
        s,
        token=str(demo.session.get_token()),
        user_id=str(demo.current_user_id),
        project_id=str(demo.current_project_id),
        roles=roles,
    )


def test_job_acts_in_the_submitting_project_after_the_token_is_gone(
    platform: tuple[LocalPlatform, DevCloud, str], tmp_path: Path
) -> None:
    p, cloud, tenancy = platform
    demo = cloud.connection("devcloud-demo")
    token = demo.session.get_token()
    user_id, project_id = demo.current_user_id, demo.current_project_id
    service_project = cloud.connection("devcloud-stackml").current_project_id
    admin = cloud.connection("devcloud")
    before = set(_trusts_of(cloud, user_id))

    client = StackMLClient(p.url, token=token, timeout=30)
    pkg = tmp_path / "pkg"
    (pkg / "trainer").mkdir(parents=True)
    (pkg / "trainer" / "__init__.py").write_text("")
    (pkg / "trainer" / "task.py").write_text(textwrap.dedent(TRAINER))
    uri = client.stage_package(pkg)["package_uri"]
    job = client.create_job(
        {"name": "trusted", "trainer": {"package_uri": uri, "module": "trainer.task"}}
    )
    made = set(_trusts_of(cloud, user_id)) - before
    _revoke(cloud, token)
    with pytest.raises(APIError) as e:
        client.get_job(job["id"])
    assert e.value.status == 401  # the user's token is no longer good for anything

    reader = StackMLClient(p.url, token=admin.session.get_token(), timeout=30)
    running = wait_job(
        reader, job["id"], lambda j: j["state"] in ("RUNNING", "FAILED", "SUCCEEDED")
    )
    assert running["state"] == "RUNNING", running.get("failure")
    server_id = running["resources"][0]["server_id"]
    server = admin.compute.get_server(server_id)
    if tenancy == "project":
        assert len(made) == 1, "one trust per job, made at submission"
        assert server.project_id == project_id, "booted in the submitter's project"
        assert server.user_id == user_id, "as the submitter (impersonation)"
    else:
        assert made == set(), "tenancy: service makes no trust"
        assert server.project_id == service_project

    done = wait_job(
        reader,
        job["id"],
        lambda j: (
            j["state"] in ("SUCCEEDED", "FAILED")
            and all(r["state"] == "deleted" for r in j["resources"])
        ),
    )
    assert done["state"] == "SUCCEEDED", done["failure"]
    # the trust goes once the servers are gone; the event is written right after
    want = "Keystone trust deleted" if tenancy == "project" else None
    deadline = time.monotonic() + 30
    while True:
        left = set(_trusts_of(cloud, user_id)) - before
        events = [e["message"] for e in reader.events(job["id"])["events"]]
        if not left and (want is None or want in events):
            break
        assert time.monotonic() < deadline, f"trust left: {left}; events: {events}"
        time.sleep(0.3)
    assert all("trust" not in m for m in events) or tenancy == "project"
    assert not [s.name for s in admin.compute.servers(all_projects=True)]
    # the package and the model are in the project's own Swift account (or stackml's)
    owner = demo if tenancy == "project" else cloud.connection("devcloud-stackml")
    for where in (uri, done["output"]["model_uri"]):
        parsed = urlsplit(where)
        names = [
            o.name
            for o in owner.object_store.objects(parsed.netloc, prefix=parsed.path.lstrip("/"))
        ]
        assert names, f"{where} is not in the {tenancy} project's account"
    assert [o["key"] for o in done["output"]["objects"]] == ["model.txt"]


@pytest.fixture(scope="module")
def api(
    devcloud_emulator: DevCloud, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, Settings]]:
    """The API in this process, keystonemiddleware caching tokens (as deployed): a token
    revoked after its first use still passes the middleware for a while."""
    tmp = tmp_path_factory.mktemp("trustapi")
    with environ({"OS_CLIENT_CONFIG_FILE": str(devcloud_emulator.clouds_yaml)}):
        settings = Settings(
            data_dir=tmp / "data",
            database_url=f"sqlite:///{tmp / 'stackml.db'}",
            redis_url="memory://",
            secret_key="trust-test-key",
            auth="keystone",
            compute="openstack",
            tenancy="project",  # (a platform fixture of this module may have set it otherwise)
            store="local",
            openstack_cloud="devcloud-stackml",
            default_flavor="m1.small",
            keystone_authtoken=_authtoken(devcloud_emulator, cache=True),
        )
        Base.metadata.create_all(engine_for(settings.db_url))
        app = create_app(settings, enqueue=lambda task, job_id: None)
        server = make_server("127.0.0.1", 0, app, threaded=True)
        thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
        thread.start()
        try:
            yield f"http://127.0.0.1:{server.server_port}", settings
        finally:
            server.shutdown()
            server.server_close()
            thread.join(timeout=10)
            dispose_all()


def test_token_refused_when_making_the_trust_gets_401_and_leaves_no_job(
    api: tuple[str, Settings], devcloud_emulator: DevCloud, tmp_path: Path
) -> None:
    url, settings = api
    cloud = devcloud_emulator
    demo = cloud.connection("devcloud-demo")
    token = demo.session.get_token()
    client = StackMLClient(url, token=token, timeout=30)
    pkg = tmp_path / "pkg"
    (pkg / "trainer").mkdir(parents=True)
    (pkg / "trainer" / "__init__.py").write_text("")
    (pkg / "trainer" / "task.py").write_text("print(1)\n")
    uri = client.stage_package(pkg)["package_uri"]  # the middleware now caches the token
    _revoke(cloud, token)
    before = set(_trusts_of(cloud, demo.current_user_id))
    with pytest.raises(APIError) as e:
        client.create_job(
            {"name": "late", "trainer": {"package_uri": uri, "module": "trainer.task"}}
        )
    assert e.value.status == 401
    assert "Keystone" in str(e.value)
    with session_scope(settings.db_url) as s:
        from service.db import jobs as repo

        assert repo.list_jobs(s, None, limit=10)[0] == []
    assert set(_trusts_of(cloud, demo.current_user_id)) == before


def test_job_cancelled_before_it_booted_leaves_no_trust(
    platform: tuple[LocalPlatform, DevCloud, str], tmp_path: Path
) -> None:
    p, cloud, tenancy = platform
    demo = cloud.connection("devcloud-demo")
    client = StackMLClient(p.url, token=demo.session.get_token(), timeout=30)
    user_id = demo.current_user_id
    before = set(_trusts_of(cloud, user_id))
    pkg = tmp_path / "pkg"
    (pkg / "trainer").mkdir(parents=True)
    (pkg / "trainer" / "__init__.py").write_text("")
    (pkg / "trainer" / "task.py").write_text("print(1)\n")
    uri = client.stage_package(pkg)["package_uri"]
    job = client.create_job(
        {"name": "gone", "trainer": {"package_uri": uri, "module": "trainer.task"}}
    )
    assert len(set(_trusts_of(cloud, user_id)) - before) == (1 if tenancy == "project" else 0)
    client.cancel_job(job["id"])  # QUEUED or waiting in allocate: no server yet
    done = wait_job(client, job["id"], lambda j: j["state"] == "CANCELLED")
    assert all(r["state"] == "deleted" for r in done["resources"])
    deadline = time.monotonic() + 30
    while set(_trusts_of(cloud, user_id)) - before:
        assert time.monotonic() < deadline, "a cancelled job's trust was left behind"
        time.sleep(0.3)
    client.delete_job(job["id"])  # and the row goes too once nothing is owed


def test_trust_deletion_tells_deleted_from_gone_from_unknown(
    devcloud_emulator: DevCloud, tmp_path: Path
) -> None:
    """`trusts.delete`: "deleted", then "gone" for a trust that no longer exists; and when the
    service user's own login fails it says nothing is known (TrustUnavailable: retry), rather
    than calling a live trust gone."""
    import yaml

    from service import trusts

    cloud = devcloud_emulator
    clouds = yaml.safe_load(cloud.clouds_yaml.read_text())
    broken = json.loads(json.dumps(clouds["clouds"]["devcloud-stackml"]))
    broken["auth"]["password"] = "not-the-password"
    clouds["clouds"]["devcloud-broken"] = broken
    (tmp_path / "clouds.yaml").write_text(yaml.safe_dump(clouds))
    demo = cloud.connection("devcloud-demo")
    with environ({"OS_CLIENT_CONFIG_FILE": str(tmp_path / "clouds.yaml")}):
        ok = Settings(auth="keystone", compute="openstack", openstack_cloud="devcloud-stackml")
        bad = ok.model_copy(update={"openstack_cloud": "devcloud-broken"})
        trust_id = _demo_trust(ok, demo)
        with pytest.raises(trusts.TrustUnavailable):
            trusts.delete(bad, trust_id)
        assert trust_id in _trusts_of(cloud, str(demo.current_user_id))  # still there
        assert trusts.delete(ok, trust_id) == "deleted"
        assert trust_id not in _trusts_of(cloud, str(demo.current_user_id))
        assert trusts.delete(ok, trust_id) == "gone"


def test_backends_of_one_projects_trusts_share_its_lookups(devcloud_emulator: DevCloud) -> None:
    """A job's first call through its new trust does not list the project's flavors, networks
    or images again: the backends of one project's trusts share those lookups."""
    from service import trusts
    from service.backends import registry
    from service.backends.compute.openstack import OpenStackBackend

    cloud = devcloud_emulator
    demo = cloud.connection("devcloud-demo")
    with environ({"OS_CLIENT_CONFIG_FILE": str(cloud.clouds_yaml)}):
        s = Settings(auth="keystone", compute="openstack", openstack_cloud="devcloud-stackml")
        made = [_demo_trust(s, demo) for _ in range(2)]
        try:
            first, second = (registry.compute(s, trust_id=t) for t in made)
            assert isinstance(first, OpenStackBackend) and isinstance(second, OpenStackBackend)
            assert first is not second  # one connection per trust
            assert [f.name for f in first.flavors()]
            second.calls.reset()
            assert [f.name for f in second.flavors()] == [f.name for f in first.flavors()]
            assert not [k for k in second.calls.snapshot() if "flavors" in k]
        finally:
            for t in made:
                assert trusts.delete(s, t) == "deleted"
                registry.forget_trust(t)


def test_trust_connections_share_version_discovery(devcloud_emulator: DevCloud) -> None:
    """A new trust's connection does not ask Nova for its API versions again: the version
    documents of a cloud are shared by its trust connections (keyed by URL)."""
    from service import trusts
    from service.backends import registry
    from service.backends.compute.openstack import OpenStackBackend

    cloud = devcloud_emulator
    demo = cloud.connection("devcloud-demo")
    with environ({"OS_CLIENT_CONFIG_FILE": str(cloud.clouds_yaml)}):
        s = Settings(auth="keystone", compute="openstack", openstack_cloud="devcloud-stackml")
        made = [_demo_trust(s, demo) for _ in range(2)]
        try:
            first, second = (registry.compute(s, trust_id=t) for t in made)
            assert isinstance(first, OpenStackBackend) and isinstance(second, OpenStackBackend)
            first.list_servers()
            second.calls.reset()
            second.list_servers()
            calls = second.calls.snapshot()
            # its own login through the trust, and the list itself: nothing else
            assert calls == {
                "GET /compute/v2.1/servers/detail?tags": 1,
                "POST /v3/auth/tokens": 1,
            }
        finally:
            for t in made:
                assert trusts.delete(s, t) == "deleted"
                registry.forget_trust(t)


def test_deleting_a_trust_through_the_jobs_backend_costs_no_second_login(
    devcloud_emulator: DevCloud,
) -> None:
    """Teardown deletes the trust with the connection the job's backend logged in with; the
    only call is the DELETE, and a second delete through it says "gone"."""
    from service import trusts
    from service.backends import registry
    from service.backends.compute.openstack import OpenStackBackend

    cloud = devcloud_emulator
    demo = cloud.connection("devcloud-demo")
    with environ({"OS_CLIENT_CONFIG_FILE": str(cloud.clouds_yaml)}):
        s = Settings(auth="keystone", compute="openstack", openstack_cloud="devcloud-stackml")
        trust_id = _demo_trust(s, demo)
        backend = registry.compute(s, trust_id=trust_id)
        assert isinstance(backend, OpenStackBackend)
        try:
            backend.list_servers()  # the job's work: logged in through the trust
            backend.calls.reset()
            assert trusts.delete(s, trust_id, backend.connection()) == "deleted"
            calls = backend.calls.snapshot()
            # (Keystone's version document may be asked for once, if no trust asked before)
            assert "POST /v3/auth/tokens" not in calls, calls
            assert calls.get("DELETE /v3/OS-TRUST/trusts/{id}") == 1, calls
            assert trust_id not in _trusts_of(cloud, str(demo.current_user_id))
            assert trusts.delete(s, trust_id, backend.connection()) == "gone"
        finally:
            registry.forget_trust(trust_id)


def test_trust_roles_limit_the_roles_keystone_records_on_the_trust(
    devcloud_emulator: DevCloud,
) -> None:
    from service import trusts

    cloud = devcloud_emulator
    demo = cloud.connection("devcloud-demo")
    with environ({"OS_CLIENT_CONFIG_FILE": str(cloud.clouds_yaml)}):
        s = Settings(
            auth="keystone",
            compute="openstack",
            openstack_cloud="devcloud-stackml",
            trust_roles=["member"],
        )
        trust_id = _demo_trust(s, demo, frozenset({"member", "reader"}))  # as its token says
        try:
            trust = demo.identity.get_trust(trust_id)
            assert sorted(r["name"] for r in trust.roles) == ["member"]
        finally:
            assert trusts.delete(s, trust_id) == "deleted"
