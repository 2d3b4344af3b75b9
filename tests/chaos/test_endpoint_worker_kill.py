"""SIGKILL the worker while it converges an endpoint (being created, scaled, deleted), start a
new one: the endpoint converges, no replica is booted twice, nothing is leaked."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import requests

from service.backends.compute.sandbox import SandboxBackend
from service.client import StackMLClient
from service.config import Settings
from service.platform import LocalPlatform
from service.runtime import ensure_runtime
from tests.e2e.test_serving import seed_tiny_model, until


def _killed_inside_a_round(platform: LocalPlatform, act: Callable[[], Any]) -> None:
    """Run `act` (which enqueues a converge) on a worker that pauses inside every round,
    kill that worker while it holds the endpoint, start a normal one."""
    platform.restart_worker({"STACKML_CHAOS_PAUSE": "serve:60"})
    try:
        act()
        time.sleep(2.0)  # the paused round holds the message and the endpoint's lease
        platform.kill_worker()
    finally:
        platform.restart_worker()


def test_worker_killed_while_an_endpoint_is_created_scaled_and_deleted(
    chaos_platform: LocalPlatform,
    client: StackMLClient,
    chaos_settings: Settings,
    tmp_path: Path,
) -> None:
    runtime_python = ensure_runtime(chaos_settings, chaos_settings.default_runtime)
    seed_tiny_model(chaos_settings, runtime_python, tmp_path, "chaos", [1.0])
    api = client._json
    backend = SandboxBackend(chaos_settings.sandbox_dir, chaos_settings.flavors())
    box: dict[str, str] = {}

    def create() -> None:
        box["id"] = api("POST", "/v1/models/chaos/endpoints", json={"replicas": 1})["id"]

    _killed_inside_a_round(chaos_platform, create)
    path = f"/v1/models/chaos/endpoints/{box['id']}"

    def ready(n: int) -> dict[str, Any] | None:
        e = api("GET", path)
        assert e["state"] != "FAILED", e
        ok = e["state"] == "READY" and len(e["servers"]) == n
        return e if ok and all(s["replica_state"] == "ready" for s in e["servers"]) else None

    until("created after the kill", lambda: ready(1), 300)
    r = requests.post(
        f"{chaos_platform.url}/v1/models/chaos:predict",
        json={"instances": [[1.0, 1.0, 1.0]]},
        timeout=60,
    )
    assert r.status_code == 200 and r.json() == {"predictions": [[6.0]]}, r.text

    _killed_inside_a_round(chaos_platform, lambda: api("PATCH", path, json={"replicas": 2}))
    scaled = until("scaled after the kill", lambda: ready(2), 300)
    tagged = backend.list_servers(("stackml-endpoint", box["id"]))
    assert sorted(t.id for t in tagged) == sorted(s["server_id"] for s in scaled["servers"])

    _killed_inside_a_round(chaos_platform, lambda: api("DELETE", path))
    until("deleted after the kill", lambda: api("GET", path)["state"] == "DELETED", 300)
    assert backend.list_servers(("stackml-endpoint", box["id"])) == []
