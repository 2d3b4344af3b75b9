"""A hostile trainer through the real platform: it tries the platform's Redis, PostgreSQL, the
API (cancelling another job) and another job's sshd from inside its sandbox. Every attempt is
refused, and the job still SUCCEEDS: the store works through the sandbox store gateway."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import pytest

from service.client import APIError, StackMLClient
from service.config import Settings
from service.platform import LocalPlatform
from tests.e2e.conftest import job_spec, make_package, wait_resources_deleted, wait_state

ATTACK = {
    "attack": """
        import json, os, socket, sys, urllib.error, urllib.request

        targets = json.loads(sys.argv[1])
        results = {}

        def tcp(name, host, port, payload=b""):
            s = socket.socket()
            s.settimeout(5)
            try:
                s.connect((host, port))
                s.sendall(payload)
                results[name] = "connected: " + repr(s.recv(200)[:80])
            except OSError as e:
                results[name] = type(e).__name__ + ": " + str(e)
            finally:
                s.close()

        def http(name, url):
            req = urllib.request.Request(
                url, data=b"{}", method="POST", headers={"Content-Type": "application/json"}
            )
            try:
                with urllib.request.urlopen(req, timeout=5) as r:
                    results[name] = f"http {r.status}"
            except urllib.error.HTTPError as e:
                results[name] = f"http {e.code}"
            except (OSError, urllib.error.URLError) as e:
                results[name] = type(e).__name__ + ": " + str(e)

        tcp("redis", "127.0.0.1", 6379, b"PING\\r\\n")  # harmless, proves reachability
        tcp("postgres", "127.0.0.1", 5432)
        other = targets["other_job"]
        http("api_cancel_loopback", f"http://127.0.0.1:{targets['api_port']}/v1/jobs/{other}/cancel")
        http("api_cancel_gateway", f"{targets['gateway']}/v1/jobs/{other}/cancel")
        for i, (host, port) in enumerate(targets["sshd"]):
            tcp(f"sshd_{i}", host, port)
        print("ATTACKS " + json.dumps(results), flush=True)
        model = os.environ["STACKML_MODEL_DIR"]
        with open(os.path.join(model, "attacks.json"), "w") as fh:
            json.dump(results, fh)
    """,
    "sleep": """
        import time
        print("sleeping", flush=True)
        for _ in range(1200):
            time.sleep(0.1)
    """,
}


@pytest.fixture(scope="module")
def attack_package(client: StackMLClient, tmp_path_factory: pytest.TempPathFactory) -> str:
    root = make_package(tmp_path_factory.mktemp("attack"), ATTACK)
    return str(client.stage_package(root)["package_uri"])


def _record(settings: Settings, job: dict) -> dict:
    server_id = job["resources"][0]["server_id"]
    rec: dict = json.loads((settings.sandbox_dir / server_id / "server.json").read_text())
    return rec


def test_a_hostile_trainer_is_refused_everything_but_the_store(
    client: StackMLClient,
    platform: LocalPlatform,
    e2e_settings: Settings,
    attack_package: str,
) -> None:
    victim = client.create_job(job_spec(attack_package, "trainer.sleep"))
    try:
        _attack(client, e2e_settings, attack_package, victim["id"])
    finally:
        with contextlib.suppress(APIError):  # already CANCELLED when an attack got through
            client.cancel_job(victim["id"])  # it sleeps 2 minutes otherwise
        wait_state(client, victim["id"], {"CANCELLED"}, timeout=120)
        wait_resources_deleted(client, victim["id"])


def _attack(client: StackMLClient, e2e_settings: Settings, attack_package: str, vid: str) -> None:
    victim = wait_state(client, vid, {"RUNNING"}, timeout=180)
    victim_rec = _record(e2e_settings, victim)
    assert victim_rec["network_isolated"] is True, victim_rec
    assert not victim_rec["address"].startswith("127."), victim_rec

    gateway = e2e_settings.base_url  # where the grants point: the store gateway
    assert gateway != f"http://{e2e_settings.host}:{e2e_settings.port}"
    targets = {
        "api_port": e2e_settings.port,
        "gateway": gateway,
        "other_job": victim["id"],
        "sshd": [[victim_rec["address"], victim_rec["port"]]],
    }
    spec = job_spec(attack_package, "trainer.attack")
    spec["trainer"]["args"] = [json.dumps(targets)]
    job = client.create_job(spec)
    done = wait_state(client, job["id"], {"SUCCEEDED", "FAILED", "CANCELLED"}, timeout=240)
    assert done["state"] == "SUCCEEDED", done  # the package came in and the model went out

    model_dir = Path(e2e_settings.store_dir) / done["output"]["model_uri"].split("://", 1)[1]
    results = json.loads((model_dir / "attacks.json").read_text())
    assert set(results) == {
        "redis", "postgres", "api_cancel_loopback", "api_cancel_gateway", "sshd_0"
    }  # fmt: skip
    for name in ("redis", "postgres", "api_cancel_loopback"):  # 127.0.0.1 is the sandbox's own
        assert "Connection refused" in results[name], (name, results)
    assert "Network is unreachable" in results["sshd_0"], results  # no route to other sandboxes
    # the gateway answers store routes only: the API's cancel is not there
    assert results["api_cancel_gateway"] == "http 404", results

    assert client.get_job(victim["id"])["state"] == "RUNNING"  # nobody cancelled it
    wait_resources_deleted(client, job["id"])
