"""Jobs on the OpenStack path, end to end: the platform (API, worker) with the openstack compute
backend and the swift store against the devcloud — real Keystone, real Swift, the Nova emulator
backing each server with a sandbox. Every Nova fault ends as the issue says, and nothing leaks:
no server, keypair, floating IP or sandbox."""

from __future__ import annotations

import json
import os
import shutil
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from devcloud.cloud import DevCloud
from service.client import StackMLClient
from service.config import REPO_ROOT, Settings
from service.platform import LocalPlatform
from tests.cloud.conftest import RUNTIME_ROOT, scratch_dir, wait_job
from tests.e2e.conftest import assert_configured_redis
from tests.e2e.test_tensorflow import (
    assert_learned_the_known_function,
    assert_loss_went_down,
    evaluate_model,
)
from tests.envutil import environ, free_port
from tests.pgutil import temp_database

REDIS_URL = "redis://127.0.0.1:6379/12"
TERMINAL = {"SUCCEEDED", "FAILED", "CANCELLED"}
TRAINERS = {
    "ok": """
        import json, os
        print("hello from", os.environ["STACKML_JOB_ID"], flush=True)
        print(json.dumps({"stackml_metric": 1, "epoch": 1, "loss": 0.5}), flush=True)
        model = os.environ["STACKML_MODEL_DIR"]
        open(os.path.join(model, "small.txt"), "w").write("42\\n")
        with open(os.path.join(model, "big.bin"), "wb") as fh:  # over the segment size: an SLO
            fh.write(os.urandom(3 * 1024 * 1024 + 17))
    """,
    "sleep": """
        import time
        for i in range(600):
            print("tick", i, flush=True)
            time.sleep(0.1)
    """,
    # first run: marks its checkpoint directory, says "synced" once the runner has put the
    # mark in Swift (the runner's own record, checkpoints.synced), and trains "forever"; a run
    # that finds the mark (restored on a new server) finishes
    "resumable": """
        import os, time
        ckpt = os.environ["STACKML_CHECKPOINT_DIR"]
        mark = os.path.join(ckpt, "first-run")
        if os.path.exists(mark):
            print("resumed", open(mark).read(), flush=True)
            open(os.path.join(os.environ["STACKML_MODEL_DIR"], "m"), "w").write("1")
        else:
            open(mark, "w").write(os.environ["STACKML_JOB_ID"])
            synced = os.path.join(os.path.dirname(ckpt), "checkpoints.synced")
            while not (os.path.exists(synced) and "first-run" in open(synced).read()):
                time.sleep(0.1)
            print("synced", flush=True)
            time.sleep(600)
    """,
}


@pytest.fixture(scope="module")
def cloud_platform(devcloud_emulator: DevCloud) -> Iterator[tuple[LocalPlatform, DevCloud]]:
    data = scratch_dir("cloud-platform")
    with temp_database("cloud") as db_url:
        env = {
            "STACKML_DATA_DIR": str(data),
            "STACKML_DATABASE_URL": db_url,
            "STACKML_REDIS_URL": REDIS_URL,
            "STACKML_QUEUE": f"stackml-cloud-{os.getpid()}",
            "STACKML_PORT": str(free_port()),
            "STACKML_RUNTIME_ROOT": str(RUNTIME_ROOT),
            "STACKML_COMPUTE": "openstack",
            "STACKML_STORE": "swift",
            "OS_CLIENT_CONFIG_FILE": str(devcloud_emulator.clouds_yaml),
            "STACKML_OPENSTACK_CLOUD": "devcloud-stackml",
            "STACKML_DEFAULT_FLAVOR": "m1.small",
            "STACKML_FLAVOR_FALLBACKS": json.dumps({"m1.small": ["m1.medium"]}),
            "STACKML_BOOT_DEADLINE": "15",
            "STACKML_QUOTA_BACKOFF_MIN": "1",
            "STACKML_HEARTBEAT_TIMEOUT": "6",
            "STACKML_STUCK_AFTER": "10",
            "STACKML_RECONCILE_INTERVAL": "2",
            "STACKML_SWIFT_SEGMENT_BYTES": str(1024 * 1024),
            "STACKML_CHECKPOINT_SYNC_SECONDS": "1",
        }
        try:
            with environ(env), LocalPlatform(Settings(), concurrency=4, quiet=True) as p:
                assert_configured_redis(p, REDIS_URL, env["STACKML_QUEUE"])
                yield p, devcloud_emulator
        finally:
            shutil.rmtree(data, ignore_errors=True)


@pytest.fixture(scope="module")
def client(cloud_platform: tuple[LocalPlatform, DevCloud]) -> StackMLClient:
    return StackMLClient(cloud_platform[0].url, timeout=30)


@pytest.fixture(scope="module")
def package(client: StackMLClient, tmp_path_factory: pytest.TempPathFactory) -> str:
    root = tmp_path_factory.mktemp("cloud-pkg")
    (root / "trainer").mkdir()
    (root / "trainer" / "__init__.py").write_text("")
    for name, src in TRAINERS.items():
        (root / "trainer" / f"{name}.py").write_text(textwrap.dedent(src))
    uri = str(client.stage_package(root)["package_uri"])
    assert uri.startswith("swift://stackml-")
    return uri


class Faults:
    def __init__(self, cloud: DevCloud) -> None:
        self.cloud = cloud
        self.conn = cloud.connection("devcloud")

    def _call(self, method: str, body: dict[str, Any] | None = None) -> requests.Response:
        return requests.request(
            method,
            f"{self.cloud.emulator_url}/compute/_stackml/faults",
            json=body,
            headers={"X-Auth-Token": self.conn.session.get_token()},
            timeout=10,
        )

    def inject(self, kind: str, **fault: Any) -> None:
        r = self._call("POST", {"kind": kind, **fault})
        assert r.status_code in (200, 201), r.text

    def clear(self) -> None:
        assert self._call("DELETE").status_code == 204


@pytest.fixture
def faults(cloud_platform: tuple[LocalPlatform, DevCloud]) -> Iterator[Faults]:
    f = Faults(cloud_platform[1])
    f.clear()
    yield f
    f.clear()


def _done(client: StackMLClient, job_id: str, timeout: float = 120) -> dict[str, Any]:
    return wait_job(
        client,
        job_id,
        lambda j: j["state"] in TERMINAL and all(r["state"] == "deleted" for r in j["resources"]),
        timeout,
    )


@pytest.fixture(autouse=True)
def no_leaks(cloud_platform: tuple[LocalPlatform, DevCloud]) -> Iterator[None]:
    yield
    from service.backends.compute.sandbox import leak_report

    cloud = cloud_platform[1]
    admin = cloud.connection("devcloud")
    svc = cloud.connection("devcloud-stackml")
    deadline = time.monotonic() + 30
    while True:
        servers = [s.name for s in admin.compute.servers(all_projects=True)]
        keypairs = [k.name for k in svc.compute.keypairs()]
        ips = [ip.floating_ip_address for ip in admin.network.ips()]
        groups = [
            g.name for g in admin.network.security_groups() if g.name.startswith("stackml-peers-")
        ]
        if not (servers or keypairs or ips or groups) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert (servers, keypairs, ips, groups) == ([], [], [], [])
    assert leak_report(cloud.sandbox_root) == []


def test_job_runs_on_the_openstack_path_and_its_model_lands_in_swift(
    client: StackMLClient, package: str, cloud_platform: tuple[LocalPlatform, DevCloud]
) -> None:
    job = client.create_job(
        {"name": "cloud-ok", "trainer": {"package_uri": package, "module": "trainer.ok"}}
    )
    done = _done(client, job["id"])
    assert done["state"] == "SUCCEEDED", done["failure"]
    uri = done["output"]["model_uri"]
    assert uri.startswith("swift://stackml-") and uri.endswith(f"/models/{job['id']}/")
    objects = {o["key"]: o for o in done["output"]["objects"]}
    assert set(objects) == {"small.txt", "big.bin"}
    assert objects["big.bin"]["size"] == 3 * 1024 * 1024 + 17
    # the model really is in Swift, readable whole through the store
    from service.backends import registry

    store = registry.store()
    key = store.key_of(uri)
    assert store.get(key + "small.txt") == b"42\n"
    assert len(store.get(key + "big.bin")) == 3 * 1024 * 1024 + 17
    assert client.metrics(job["id"])["metrics"]["loss"][0]["value"] == 0.5
    assert [r["backend"] for r in done["resources"]] == ["openstack"]


def test_example_trains_distributed_on_two_nova_servers_and_its_model_lands_in_swift(
    client: StackMLClient, cloud_platform: tuple[LocalPlatform, DevCloud], tmp_path: Path
) -> None:
    """The example under MultiWorkerMirroredStrategy on two Nova servers (`resources.workers`
    2): the replicas reach each other on their fixed addresses through the job's own security
    group (each peer port admitted from the group's members alone), the chief's loss goes down,
    its SavedModel fetched back from Swift predicts the example's known function on fresh
    points, and the group is deleted with the servers (no_leaks)."""
    from service.backends import registry
    from service.runtime import ensure_runtime

    pkg = client.stage_package(REPO_ROOT / "examples" / "keras_regression")
    job = client.create_job(
        {
            "name": "cloud-keras-distributed",
            "hyperparameters": {"epochs": 2},
            "trainer": {"package_uri": pkg["package_uri"], "module": "trainer.task"},
            "resources": {"workers": 2},
            "env": {"TF_ENABLE_ONEDNN_OPTS": "0", "TF_CPP_MIN_LOG_LEVEL": "2"},
        }
    )
    admin = cloud_platform[1].connection("devcloud")
    group = f"stackml-peers-{job['id']}"
    running = wait_job(client, job["id"], lambda j: j["state"] in TERMINAL | {"RUNNING"}, 300)
    assert running["state"] == "RUNNING", running["failure"]
    [sg] = admin.network.security_groups(name=group)
    rules = sorted(
        (r["port_range_min"], r["remote_group_id"], r["remote_ip_prefix"])
        for r in sg.security_group_rules
        if r["direction"] == "ingress"
    )
    assert rules == [(2222, sg.id, None), (2223, sg.id, None)]
    servers = {s.name: s for s in admin.compute.servers(all_projects=True)}
    assert len(servers) == 2 and all(
        {x["name"] for x in s.security_groups} == {"stackml-ssh", group} for s in servers.values()
    ), servers

    done = _done(client, job["id"], timeout=600)
    assert done["state"] == "SUCCEEDED", (done["failure"], client.logs(job["id"])[0][-3000:])
    assert [(r["backend"], r["role"]) for r in done["resources"]] == [
        ("openstack", "chief"),
        ("openstack", "worker"),
    ]
    chief_line = "trainer: replica chief:0 of 2 (MultiWorkerMirroredStrategy, 2 replicas in sync)"
    assert chief_line in client.logs(job["id"])[0].decode()
    worker_log = client.logs(job["id"], replica="worker-1")[0].decode()
    assert "trainer: replica worker:0 of 2" in worker_log, worker_log[-3000:]
    listed = {o["key"]: o["size"] for o in done["output"]["objects"]}
    assert "saved_model.pb" in listed
    assert_loss_went_down(client.metrics(job["id"])["metrics"], epochs=2)
    # every object of the model, read back from Swift (not from the server, which is gone)
    store = registry.store()
    prefix = store.key_of(done["output"]["model_uri"])
    in_swift = {o.key[len(prefix) :]: o.size for o in store.list(prefix)}
    assert in_swift == listed
    model_dir = tmp_path / "model"
    for rel in in_swift:
        target = model_dir / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(store.get(prefix + rel))
    settings = Settings()
    runtime_python = ensure_runtime(settings, settings.default_runtime, echo=print)
    assert_learned_the_known_function(evaluate_model(runtime_python, model_dir))
    assert list(admin.network.security_groups(name=group)) == []


def test_no_valid_host_retries_the_next_flavor(
    client: StackMLClient, package: str, faults: Faults
) -> None:
    faults.inject("no_valid_host", match={"flavor": "m1.small"}, count=10)
    job = client.create_job(
        {"name": "cloud-nvh", "trainer": {"package_uri": package, "module": "trainer.ok"}}
    )
    done = _done(client, job["id"])
    assert done["state"] == "SUCCEEDED", done["failure"]
    assert [r["flavor"] for r in done["resources"]] == ["m1.small", "m1.medium"]
    retries = [e for e in client.events(job["id"])["events"] if e["kind"] == "retry"]
    assert "no valid host" in retries[0]["message"] and "trying m1.medium" in retries[0]["message"]


def test_no_valid_host_everywhere_fails_in_allocate_with_novas_fault(
    client: StackMLClient, package: str, faults: Faults
) -> None:
    faults.inject("no_valid_host", count=10)
    job = client.create_job(
        {"name": "cloud-nvh-all", "trainer": {"package_uri": package, "module": "trainer.ok"}}
    )
    done = _done(client, job["id"])
    assert (done["state"], done["failure"]["phase"], done["failure"]["reason"]) == (
        "FAILED",
        "allocate",
        "no_valid_host",
    )
    assert "No valid host was found" in done["failure"]["message"]


def test_quota_exceeded_waits_in_queued_then_runs(
    client: StackMLClient, package: str, faults: Faults
) -> None:
    faults.inject("quota_exceeded", count=1)
    job = client.create_job(
        {"name": "cloud-quota", "trainer": {"package_uri": package, "module": "trainer.ok"}}
    )
    done = _done(client, job["id"])
    assert done["state"] == "SUCCEEDED", done["failure"]
    back = [
        e
        for e in client.events(job["id"])["events"]
        if e["from"] == "ALLOCATING" and e["to"] == "QUEUED"
    ]
    assert back and "Quota exceeded" in back[0]["message"]


def test_server_stuck_in_build_is_deleted_and_the_next_flavor_tried(
    client: StackMLClient, package: str, faults: Faults
) -> None:
    faults.inject("slow_build", match={"flavor": "m1.small"}, seconds=60, count=1)
    job = client.create_job(
        {"name": "cloud-slow", "trainer": {"package_uri": package, "module": "trainer.ok"}}
    )
    done = _done(client, job["id"])
    assert done["state"] == "SUCCEEDED", done["failure"]
    assert [r["flavor"] for r in done["resources"]] == ["m1.small", "m1.medium"]


def test_server_that_vanishes_fails_the_job_with_server_lost(
    client: StackMLClient, package: str, faults: Faults
) -> None:
    job = client.create_job(
        {"name": "cloud-vanish", "trainer": {"package_uri": package, "module": "trainer.sleep"}}
    )
    running = wait_job(client, job["id"], lambda j: j["state"] == "RUNNING", 60)
    faults.inject("vanish", match={"name_regex": running["resources"][-1]["name"]}, count=1)
    done = _done(client, job["id"], timeout=90)
    assert (done["state"], done["failure"]["reason"]) == ("FAILED", "server_lost")


def test_a_restartable_job_whose_server_vanishes_resumes_on_a_new_one_from_swift(
    client: StackMLClient, package: str, faults: Faults
) -> None:
    job = client.create_job(
        {
            "name": "cloud-restart",
            "trainer": {"package_uri": package, "module": "trainer.resumable"},
            "restart_policy": "OnFailure",
            "max_restarts": 1,
        }
    )
    deadline = time.monotonic() + 90
    while b"synced" not in client.logs(job["id"])[0]:
        state = client.get_job(job["id"])
        assert state["state"] not in TERMINAL, state["failure"]
        assert time.monotonic() < deadline, f"no checkpoint synced in 90s: {state['state']}"
        time.sleep(0.2)
    first = client.get_job(job["id"])["resources"][-1]["name"]
    faults.inject("vanish", match={"name_regex": first}, count=1)
    done = _done(client, job["id"], timeout=150)
    log = client.logs(job["id"])[0].decode()
    assert done["state"] == "SUCCEEDED", (done["failure"], log)
    assert done["restarts"] == 1 and f"resumed {job['id']}" in log, log
    assert [r["name"] for r in done["resources"]] == [first, f"{first}-r1"]
    (why,) = [e["message"] for e in client.events(job["id"])["events"] if e["kind"] == "restart"]
    assert why.startswith("restart 1 of 1 (OnFailure): "), why


def test_delete_that_fails_twice_is_retried_until_it_succeeds(
    client: StackMLClient, package: str, faults: Faults
) -> None:
    faults.inject("delete_fails", count=2)
    job = client.create_job(
        {"name": "cloud-delfail", "trainer": {"package_uri": package, "module": "trainer.ok"}}
    )
    done = _done(client, job["id"], timeout=120)
    assert done["state"] == "SUCCEEDED", done["failure"]


def test_gpu_job_is_placed_on_a_gpu_flavor(client: StackMLClient, package: str) -> None:
    job = client.create_job(
        {
            "name": "cloud-gpu",
            "resources": {"gpus": 1, "gpu_type": "a100"},
            "trainer": {"package_uri": package, "module": "trainer.ok"},
        }
    )
    done = _done(client, job["id"])
    assert done["state"] == "SUCCEEDED", done["failure"]
    assert done["resources"][0]["flavor"] == "g1.a100x1"
    with pytest.raises(Exception) as err:
        client.create_job(
            {
                "name": "cloud-gpu8",
                "resources": {"gpus": 8},
                "trainer": {"package_uri": package, "module": "trainer.ok"},
            }
        )
    assert getattr(err.value, "status", None) == 422


def test_flavors_endpoint_lists_the_clouds_gpu_flavors(
    cloud_platform: tuple[LocalPlatform, DevCloud],
) -> None:
    flavors = requests.get(f"{cloud_platform[0].url}/v1/flavors", timeout=10).json()["flavors"]
    by_name = {f["name"]: f for f in flavors}
    assert by_name["g1.a100x2"]["gpus"] == 2 and by_name["g1.a100x2"]["gpu_type"] == "a100"
    assert by_name["m1.small"]["gpus"] == 0


def test_swift_answering_503_during_export_fails_the_upload_and_keeps_nothing(
    client: StackMLClient, package: str, cloud_platform: tuple[LocalPlatform, DevCloud]
) -> None:
    """The object servers go away while the runner uploads: the proxy answers 503, the runner
    retries, then the job fails in export with `upload_failed`; no half-written model stays."""
    from devcloud import venvs
    from devcloud.process import Service, http_answers
    from service.backends import registry

    platform, cloud = cloud_platform
    objects = Service("swift-object", cloud.run_dir)
    platform.restart_worker({"STACKML_CHAOS_PAUSE": "export:3"})
    try:
        job = client.create_job(
            {"name": "cloud-503", "trainer": {"package_uri": package, "module": "trainer.ok"}}
        )
        wait_job(client, job["id"], lambda j: j["state"] == "EXPORTING", 60)
        assert objects.stop()  # every object request through the proxy now answers 503
        done = _done(client, job["id"], timeout=120)
    finally:
        venv = venvs.ensure_venv(cloud.venv_root, "swift", venvs.SWIFT_REQUIREMENTS)
        swift_dir = cloud.state_dir / "swift"
        objects.start(
            [
                str(venv / "bin" / "python"),
                str(venv / "bin" / "swift-object-server"),
                str(swift_dir / "etc" / "object-server.conf"),
                "-v",
            ],
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
            cwd=swift_dir,
        )
        url = f"http://127.0.0.1:{cloud.ports.swift_object}/healthcheck"
        objects.wait_ready(lambda: http_answers(url), 30)
        platform.restart_worker()
    assert (done["state"], done["failure"]["phase"], done["failure"]["reason"]) == (
        "FAILED",
        "export",
        "upload_failed",
    )
    assert "503" in done["failure"]["message"]
    store = registry.store()
    assert store.list(store.key_of(done["output"]["model_uri"])) == []
    data, _ = client.logs(job["id"])
    assert f"hello from {job['id']}" in data.decode()  # the log written before the fault stays
