"""OpenStack API calls per job: one server booted and deleted through OpenStackBackend against
the Nova emulator the way one job does it (create, poll until ACTIVE with the host key from the
console, delete, poll until gone), counted by kind.

Baseline, measured in the same run: openstacksdk's cloud layer doing the same job the obvious
way (`create_server(..., wait=True)` by names, console output, `delete_server(wait=True)`).
Prints calls by kind for the first job of a worker process (cold caches) and for a later one
(warm), with and without a floating IP, the ratio to the baseline, then one JSON line.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import requests

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from devcloud.emulator import cleanup  # noqa: E402
from service.backends.compute.openstack import OpenStackBackend, template  # noqa: E402
from service.backends.interfaces import ServerSpec, ServerState  # noqa: E402
from workers import ssh  # noqa: E402

POLL = 0.2  # the allocate step's poll interval
DEADLINE = 60.0
TAGS = (("stackml-job", "bench"), ("stackml-role", "chief"), ("stackml-project", "bench"))


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_emulator(work: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = _port()
    url = f"http://127.0.0.1:{port}"
    log = open(work / "emulator.log", "wb")  # the child keeps it
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "devcloud.emulator",
            "--port",
            str(port),
            "--quiet",
            "--state-dir",
            str(work / "state"),
            "--keystone-url",
            "none",
        ],
        cwd=ROOT,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    log.close()
    deadline = time.monotonic() + 30
    while True:
        if proc.poll() is not None:
            raise SystemExit((work / "emulator.log").read_text()[-3000:])
        with contextlib.suppress(requests.RequestException):
            if requests.get(f"{url}/compute/", timeout=2).ok:
                return proc, url
        if time.monotonic() > deadline:
            raise SystemExit("the emulator did not start")
        time.sleep(0.05)


def connection(url: str) -> Any:
    import openstack.config
    from openstack.connection import Connection

    region = openstack.config.get_cloud_region(
        load_yaml_config=False,
        load_envvars=False,
        auth_type="none",
        compute_endpoint_override=f"{url}/compute/v2.1",
        network_endpoint_override=f"{url}/network",
        image_endpoint_override=f"{url}/image",
        api_timeout=30,
    )
    return Connection(config=region)


def one_job(backend: OpenStackBackend, public_key: str, name: str) -> dict[str, int]:
    """What the allocate and teardown steps do with the backend for one single-server job."""
    backend.calls.reset()
    flavor = backend.find_flavor("m1.small")
    assert flavor is not None
    ref = backend.create_server(
        ServerSpec(name=name, flavor=flavor, image="cirros", public_key=public_key, tags=TAGS)
    )
    deadline = time.monotonic() + DEADLINE
    status = backend.get_server(ref.id)
    while status.state is ServerState.BUILD and time.monotonic() < deadline:
        time.sleep(POLL)
        status = backend.get_server(ref.id)
    assert status.state is ServerState.ACTIVE and status.host_key, status
    backend.delete_server(ref.id)
    while backend.get_server(ref.id).state is not ServerState.DELETED:
        assert time.monotonic() < deadline, "delete not confirmed"
        time.sleep(POLL)
    # teardown's sweep before the trust goes: what is still listed under the job's tag
    assert backend.list_servers(TAGS[0]) == []
    return backend.calls.snapshot()


def baseline_job(url: str, public_key: str, name: str, cold: Any = None) -> dict[str, int]:
    """The obvious openstacksdk cloud-layer way, counted the same way."""
    conn = cold or connection(url)
    counts: Counter[str] = Counter()

    def hook(r: Any, *a: Any, **k: Any) -> None:
        counts[f"{r.request.method} {template(r.request.url)}"] += 1

    conn.session.session.hooks["response"].append(hook)
    conn.compute.create_keypair(name=name, public_key=public_key)
    server = conn.create_server(
        name,
        image="cirros",
        flavor="m1.small",
        network="private",
        key_name=name,
        meta=dict(TAGS),
        wait=True,
        timeout=DEADLINE,
        auto_ip=False,
    )
    conn.compute.get_server_console_output(server.id)
    conn.delete_server(server.id, wait=True, timeout=DEADLINE)
    conn.compute.delete_keypair(name)
    return dict(sorted(counts.items()))


def show(title: str, counts: dict[str, int]) -> None:
    print(f"{title}: {sum(counts.values())} calls")
    for kind, n in counts.items():
        print(f"  {n:3d}  {kind}")


def main() -> int:
    work = Path(tempfile.mkdtemp(prefix="stackml-bench-os-", dir="/var/tmp"))
    os.chmod(work, 0o755)
    proc, url = start_emulator(work)
    figures: dict[str, Any] = {"bench": "openstack_calls"}
    try:
        _, pub = ssh.generate_keypair()
        images = {"cirros": "cirros"}
        backend = OpenStackBackend(lambda: connection(url), network="private", images=images)
        cold = one_job(backend, pub, "stackml-bench-1-chief")
        warm = one_job(backend, pub, "stackml-bench-2-chief")
        fip_backend = OpenStackBackend(
            lambda: connection(url), network="private", floating_network="public", images=images
        )
        one_job(fip_backend, pub, "stackml-bench-3-chief")
        fip_warm = one_job(fip_backend, pub, "stackml-bench-4-chief")
        base_cold = baseline_job(url, pub, "bench-base-1")
        base_conn = connection(url)
        baseline_job(url, pub, "bench-base-2", base_conn)
        base_warm = baseline_job(url, pub, "bench-base-3", base_conn)

        show(
            "first job of a worker (cold caches: discovery, flavors, network, image, "
            "security group)",
            cold,
        )
        show("a later job (warm)", warm)
        show("a later job with a floating IP", fip_warm)
        show("baseline: openstacksdk cloud layer, first job", base_cold)
        show("baseline: openstacksdk cloud layer, later job", base_warm)
        polls = warm.get("GET /compute/v2.1/servers/{id}", 0)
        total, base_total = sum(warm.values()), sum(base_warm.values())
        print(
            f"calls per job (warm): {total}, of which {polls} server GETs (polls at {POLL}s, "
            f"incl. the 404 that confirms the delete)"
        )
        print(f"ratio backend/baseline (warm): {total / base_total:.2f}  (lower is better)")
        figures.update(
            cold=sum(cold.values()),
            warm=total,
            warm_floating_ip=sum(fip_warm.values()),
            baseline_cold=sum(base_cold.values()),
            baseline_warm=base_total,
            ratio=round(total / base_total, 3),
            warm_by_kind=warm,
        )
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        cleanup(work / "state")
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
