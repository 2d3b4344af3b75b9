"""Serving on the OpenStack path (issue 9's cloud tier): the platform (API, worker) with the
openstack compute backend and the swift store against the devcloud — real Keystone, real Swift,
the Nova emulator backing each server with a sandbox. Two tiny SavedModel versions stored in
Swift are registered through the API, an endpoint deploys 2 replicas (Nova servers tagged
`stackml-endpoint`, a security-group rule for the serving port), predictions through the API
match the SavedModels, a replica's Nova server deleted (and another's sandbox killed) under a
steady load costs no request and is replaced, the default label switched under load costs no
request and every answer names its version, and the deleted endpoint leaves no server, keypair
or sandbox, and nothing new in Swift. With tenancy=project the endpoint acts through a Keystone
trust made with the caller's token, as a job does: its replicas are Nova servers in the
caller's project, booted as the caller, and the trust is gone from Keystone once the endpoint
is DELETED (no trust is made in the other modes). (tests/e2e/test_serving.py is the same proof
on the local sandbox backend.)"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import requests

from devcloud.cloud import DevCloud
from service.backends.compute.sandbox import SandboxBackend, leak_report
from service.client import StackMLClient
from service.config import Settings
from service.platform import LocalPlatform
from tests.cloud.conftest import RUNTIME_ROOT, scratch_dir
from tests.e2e.conftest import assert_configured_redis
from tests.e2e.test_serving import TF_ENV, TINY, Load, assert_all_ok, until
from tests.envutil import environ, free_port
from tests.pgutil import temp_database

REDIS_URL = "redis://127.0.0.1:6379/12"
MODEL = "tiny"
SCALES = [1.0, 2.0]  # version v computes y = x·[1,2,3]·SCALES[v-1]
BODY = {"instances": [[1.0, 1.0, 1.0], [0.0, 0.5, 2.0]]}
EXPECTED = {"1": [6.0, 7.0], "2": [12.0, 14.0]}
TAG = "stackml-endpoint"


def _authtoken(cloud: DevCloud) -> dict[str, str]:
    return {
        "auth_url": cloud.auth_url,
        "username": "stackml",
        "password": cloud.password("stackml"),
        "project_name": "service",
        "region_name": "RegionOne",
        "token_cache_time": "300",
    }


@pytest.fixture(scope="module", params=["noauth", "project", "service"])
def cloud_platform(
    request: pytest.FixtureRequest, devcloud_emulator: DevCloud
) -> Iterator[tuple[LocalPlatform, DevCloud, str]]:
    """The platform on the devcloud: without auth (the local project, as
    tests/cloud/test_jobs_openstack.py), and with Keystone auth in each tenancy mode (a member
    of `demo` calls it; tenancy=project keeps the project's objects in its own Swift account)."""
    mode = request.param
    data = scratch_dir(f"cloud-serving-{mode}")
    with temp_database(f"cloudserve{mode}") as db_url:
        env = {
            "STACKML_DATA_DIR": str(data),
            "STACKML_DATABASE_URL": db_url,
            "STACKML_REDIS_URL": REDIS_URL,
            "STACKML_QUEUE": f"stackml-cloud-serve-{mode}-{os.getpid()}",
            "STACKML_PORT": str(free_port()),
            "STACKML_RUNTIME_ROOT": str(RUNTIME_ROOT),
            "STACKML_COMPUTE": "openstack",
            "STACKML_STORE": "swift",
            "OS_CLIENT_CONFIG_FILE": str(devcloud_emulator.clouds_yaml),
            "STACKML_OPENSTACK_CLOUD": "devcloud-stackml",
            "STACKML_DEFAULT_FLAVOR": "m1.small",
            "STACKML_BOOT_DEADLINE": "30",
            "STACKML_STUCK_AFTER": "10",
            "STACKML_RECONCILE_INTERVAL": "2",
        }
        if mode != "noauth":
            env["STACKML_AUTH"] = "keystone"
            env["STACKML_KEYSTONE_AUTHTOKEN"] = json.dumps(_authtoken(devcloud_emulator))
            env["STACKML_TENANCY"] = mode
        try:
            with environ(env), LocalPlatform(Settings(), concurrency=4, quiet=True) as p:
                assert_configured_redis(p, REDIS_URL, env["STACKML_QUEUE"])
                yield p, devcloud_emulator, mode
        finally:
            shutil.rmtree(data, ignore_errors=True)


@dataclass
class AuthLoad(Load):
    """tests/e2e/test_serving.py's steady predict loop, with the caller's Keystone token."""

    headers: dict[str, str] = field(default_factory=dict)

    def start(self) -> AuthLoad:
        def loop() -> None:
            with requests.Session() as http:
                http.headers.update(self.headers)
                while not self.stop.is_set():
                    try:
                        r = http.post(self.url, json=self.body, timeout=60)
                        body = r.json() if r.content else None
                        self.answers.append((r.status_code, r.headers.get("X-Model-Version"), body))
                    except (requests.RequestException, ValueError) as e:
                        self.answers.append((0, None, repr(e)))
                    time.sleep(0.02)

        self.thread = threading.Thread(target=loop, daemon=True)
        self.thread.start()
        return self


def trusts_of(cloud: DevCloud, user_id: str | None) -> set[str]:
    """The ids of the Keystone trusts `user_id` is the trustor of (none without a user)."""
    if user_id is None:
        return set()
    admin = cloud.connection("devcloud")
    return {t.id for t in admin.identity.trusts(trustor_user_id=user_id)}


def project_store(project: str | None) -> Any:
    """The store the API uses for `project`'s objects (its own Swift account with
    tenancy=project, else the platform's)."""
    from service.backends import registry

    return registry.store(project_id=project)


def swift_keys(project: str | None, prefix: str) -> set[str]:
    return {o.key for o in project_store(project).list(prefix)}


def store_tiny_versions(tmp: Path, project: str | None) -> list[str]:
    """Each version's SavedModel, saved by the runtime's TensorFlow and uploaded to the
    platform's Swift under the local project's area; their store URIs."""
    from service.runtime import ensure_runtime

    settings = Settings()
    python = ensure_runtime(settings, settings.default_runtime, echo=print)
    script = tmp / "tiny.py"
    script.write_text(TINY)
    store = project_store(project)
    uris = []
    for v, scale in enumerate(SCALES, start=1):
        out = tmp / f"v{v}"
        run = subprocess.run(
            [str(python), str(script), str(out), str(scale)],
            capture_output=True,
            text=True,
            timeout=300,
            env=TF_ENV,
        )
        assert run.returncode == 0, run.stderr
        key = f"{store.project_prefix(project or settings.local_project)}models/{MODEL}-v{v}/"
        for f in sorted(out.rglob("*")):
            if f.is_file():
                info = store.put_file(key + str(f.relative_to(out)), str(f))
                assert info.size == f.stat().st_size
        uris.append(store.uri(key))
    return uris


def test_deploy_predict_replace_switch_delete_on_nova_and_swift(
    cloud_platform: tuple[LocalPlatform, DevCloud, str], tmp_path: Path
) -> None:
    platform, cloud, mode = cloud_platform
    admin = cloud.connection("devcloud")
    svc = cloud.connection("devcloud-stackml")
    settings = Settings()
    project: str | None = None  # without auth: the platform's local project
    token: str | None = None
    demo = cloud.connection("devcloud-demo")  # a member of project demo
    if mode != "noauth":
        project, token = str(demo.current_project_id), str(demo.session.get_token())
    client = StackMLClient(platform.url, token=token, timeout=30)
    auth = {"X-Auth-Token": token} if token else {}
    api = client._json

    # two versions stored in Swift, registered through the API (the registry worker lists
    # them in Swift, records checksums and reads the signature)
    uris = store_tiny_versions(tmp_path, project)
    area = project_store(project).project_prefix(project or settings.local_project)
    stored = swift_keys(project, area)
    # with tenancy=project the versions live in demo's own Swift account, as a job's model does
    owner = cloud.connection("devcloud-demo" if mode == "project" else "devcloud-stackml")
    # compared under this test's own versions: the area also holds earlier tests' models, whose
    # SLO segments the raw account listing shows and the store's listing hides by design
    container, _, inside = area.partition("/")
    mine = f"models/{MODEL}-v"
    in_account = {
        f"{container}/{o.name}" for o in owner.object_store.objects(container, prefix=inside + mine)
    }
    versions = {k for k in stored if k.startswith(area + mine)}
    assert versions and in_account == versions, (versions, in_account)
    api("POST", "/v1/models", json={"name": MODEL, "description": "cloud serving"})
    for uri in uris:
        api("POST", f"/v1/models/{MODEL}/versions", json={"artifact_uri": uri})
    for v in (1, 2):

        def ready(v: int = v) -> bool:
            got = api("GET", f"/v1/models/{MODEL}/versions/{v}")
            assert got["state"] != "FAILED", got
            return bool(got["state"] == "READY")

        until(f"version {v} READY", ready, 120)
    sig = api("GET", f"/v1/models/{MODEL}/versions/1")["signature"]
    assert sig["inputs"]["x"]["shape"] == [-1, 3], sig
    api("PUT", f"/v1/models/{MODEL}/labels/default", json={"version": 1, "why": "cloud"})

    # deploy 2 replicas following the default label; with tenancy=project the API makes one
    # Keystone trust from the caller to stackml for the endpoint (none in the other modes)
    trustor = str(demo.current_user_id) if mode != "noauth" else None
    trusts_before = trusts_of(cloud, trustor)
    ep = api("POST", f"/v1/models/{MODEL}/endpoints", json={"replicas": 2, "label": "default"})
    path = f"/v1/models/{MODEL}/endpoints/{ep['id']}"
    made = trusts_of(cloud, trustor) - trusts_before
    assert len(made) == (1 if mode == "project" else 0), made

    def settled(version: int) -> dict[str, Any] | None:
        e = api("GET", path)
        assert e["state"] != "FAILED", e
        ready = [s for s in e["servers"] if s["replica_state"] == "ready"]
        ok = (
            e["state"] == "READY"
            and e["serving_version"] == version
            and len(e["servers"]) == 2
            and len(ready) == 2
            and all(s["version"] == version for s in ready)
        )
        return e if ok else None

    first = until("2 ready replicas of version 1", lambda: settled(1), 600)

    # the replicas are Nova servers tagged as the endpoint's (looked for in every project):
    # with tenancy=project in the caller's project, booted as the caller through the endpoint's
    # trust (as a job's servers are); otherwise in stackml's own project
    home = str(demo.current_project_id if mode == "project" else svc.current_project_id)

    def nova_servers() -> dict[str, Any]:
        return {
            s.id: s
            for s in admin.compute.servers(details=True, all_projects=True)
            if (s.metadata or {}).get(TAG) == ep["id"]
        }

    servers = nova_servers()
    assert set(servers) == {s["server_id"] for s in first["servers"]}
    for s in servers.values():
        assert s.status == "ACTIVE" and (s.metadata or {}).get(TAG) == ep["id"]
        assert s.project_id == home, (mode, s.project_id, home)
        if mode == "project":
            assert s.user_id == trustor, "booted as the caller (the trust's impersonation)"
    # the security group (the replicas' project's) admits the serving port from the workers'
    # network
    port = settings.serving_port
    groups = list(admin.network.security_groups(project_id=home))
    rules = [r for g in groups for r in (g.security_group_rules or [])]
    assert any(
        r.get("direction") == "ingress"
        and r.get("protocol") == "tcp"
        and r.get("port_range_min") == port == r.get("port_range_max")
        for r in rules
    ), rules
    assert all(s["address"].endswith(f":{port}") for s in first["servers"]), first["servers"]

    predict_url = f"{platform.url}/v1/models/{MODEL}:predict"
    r = requests.post(predict_url, json=BODY, headers=auth, timeout=60)
    assert r.status_code == 200, r.text
    assert r.headers["X-Model-Version"] == "1" and r.headers.get("X-Request-Id")
    assert r.json() == {"predictions": [[6.0], [7.0]]}

    # delete one replica's Nova server (as an operator or a failing host would) under a steady
    # load: no request fails, the replica is replaced by a new server
    victim = first["servers"][0]["server_id"]
    load = AuthLoad(predict_url, BODY, headers=auth).start()
    until("some answers before the kill", lambda: len(load.answers) >= 5, 60, 0.1)
    admin.compute.delete_server(victim)
    replaced = until(
        "the killed replica replaced",
        lambda: (e := settled(1)) and victim not in {s["server_id"] for s in e["servers"]} and e,
        600,
    )
    answers = load.finish()
    assert len(answers) >= 10
    assert_all_ok(answers, {"1": EXPECTED["1"]})
    assert len({s["server_id"] for s in replaced["servers"]}) == 2
    until("the victim gone from Nova", lambda: victim not in nova_servers(), 60)

    # kill the sandbox behind another replica's server (the "VM" dies, Nova still lists the
    # server, SHUTOFF) under a steady load: no request fails, the replica is replaced and its
    # dead server deleted from Nova
    victim = replaced["servers"][1]["server_id"]
    sandboxes = SandboxBackend(cloud.sandbox_root, [])
    (box,) = sandboxes.list_servers(("nova-server", victim))
    load = AuthLoad(predict_url, BODY, headers=auth).start()
    until("some answers before the sandbox dies", lambda: len(load.answers) >= 5, 60, 0.1)
    sandboxes.delete_server(box.id)
    replaced = until(
        "the replica whose sandbox died replaced",
        lambda: (e := settled(1)) and victim not in {s["server_id"] for s in e["servers"]} and e,
        600,
    )
    answers = load.finish()
    assert len(answers) >= 10
    assert_all_ok(answers, {"1": EXPECTED["1"]})
    until("the dead server deleted from Nova", lambda: victim not in nova_servers(), 60)

    # switch the default label to version 2 under a steady load: zero failed requests, every
    # answer names the version that produced it and matches that version's SavedModel
    load = AuthLoad(predict_url, BODY, headers=auth).start()
    until("some answers before the switch", lambda: len(load.answers) >= 5, 60, 0.1)
    api("PUT", f"/v1/models/{MODEL}/labels/default", json={"version": 2, "why": "cloud switch"})
    until("2 ready replicas of version 2", lambda: settled(2), 600)
    until("answers after the switch", lambda: load.answers[-1][1] == "2", 60, 0.1)
    answers = load.finish()
    assert_all_ok(answers, EXPECTED)
    versions = [a[1] for a in answers]
    assert versions[0] == "1" and versions[-1] == "2"
    assert "1" not in versions[versions.index("2") :]

    # delete: every replica drained and deleted: no server in Nova (by tag, or at all), no
    # keypair (stackml's, or the caller's), no sandbox behind the emulator, the endpoint's
    # trust gone from Keystone, and Swift holds only the stored versions
    api("DELETE", path)
    until("endpoint DELETED", lambda: api("GET", path)["state"] == "DELETED", 300)
    assert api("GET", path)["servers"] == []
    assert nova_servers() == {}
    owners = [svc] + ([demo] if mode != "noauth" else [])
    until(
        "no server, keypair or sandbox left",
        lambda: (
            not list(admin.compute.servers(all_projects=True))
            and not [k for o in owners for k in o.compute.keypairs()]
            and leak_report(cloud.sandbox_root) == []
        ),
        60,
    )
    until("the endpoint's trust deleted", lambda: not trusts_of(cloud, trustor) & made, 60)
    assert trusts_of(cloud, trustor) - trusts_before == set()
    assert swift_keys(project, area) == stored, (
        "serving wrote to or removed from the project's area"
    )
    dead = requests.post(predict_url, json=BODY, headers=auth, timeout=60)
    assert dead.status_code == 404 and dead.json()["error"]["code"] == "no_endpoint"
