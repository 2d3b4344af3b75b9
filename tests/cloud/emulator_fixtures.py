"""The Nova emulator as a real process for tests: start, talk to it as admin, find leaks, stop."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import requests

from devcloud.emulator import cleanup
from devcloud.process import free_port
from service.backends.compute import sandbox
from service.backends.compute.sandbox import leak_report

REPO = Path(__file__).resolve().parents[2]
RUNTIME_ROOT = Path("/var/cache/stackml/runtimes")
RUNTIME_KEY = "tensorflow-2.21"
IMAGE = "stackml-tensorflow-2.21"
START_TIMEOUT = 30.0
SETTLE_TIMEOUT = 15.0


def ensure_runtime() -> Path:
    """The runtime the emulator mounts into servers (built once, as the e2e suite does)."""
    from service.config import Settings
    from service.runtime import ensure_runtime as build

    return build(Settings(runtime_root=RUNTIME_ROOT), RUNTIME_KEY)


def new_base() -> Path:
    """A work dir the sandbox login user can traverse (mkdtemp makes 0700)."""
    assert Path(sandbox.SSHD).exists(), (
        "openssh-server is required (apt-get install openssh-server)"
    )
    base = Path(tempfile.mkdtemp(prefix="stackml-emu-", dir="/var/tmp"))
    os.chmod(base, 0o755)
    return base


class EmulatorProcess:
    """`python -m devcloud.emulator` on a free loopback port with its own state dir."""

    def __init__(self, base: Path, *, keystone_url: str = "none", args: tuple[str, ...] = ()):
        self.base = base
        self.state_dir = base / "state"
        self.sandbox_root = self.state_dir / "sandboxes"
        self.keystone_url = keystone_url
        self.args = args
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = base / f"emulator-{self.port}.log"
        self.http = requests.Session()

    @property
    def compute(self) -> str:
        return f"{self.url}/compute/v2.1"

    def start(self) -> EmulatorProcess:
        log = open(self.log_path, "ab")  # the child keeps it
        argv = [
            sys.executable,
            "-m",
            "devcloud.emulator",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--state-dir",
            str(self.state_dir),
            "--keystone-url",
            self.keystone_url,
            "--runtime-root",
            str(RUNTIME_ROOT),
            *self.args,
        ]
        self.proc = subprocess.Popen(
            argv, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        log.close()
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if self.proc.poll() is not None:
                raise AssertionError(f"the emulator exited ({self.proc.returncode}):\n{self.log()}")
            with contextlib.suppress(requests.RequestException):
                if self.http.get(f"{self.url}/compute/", timeout=2).status_code == 200:
                    return self
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"the emulator did not answer in {START_TIMEOUT}s:\n{self.log()}"
                )
            time.sleep(0.05)

    def stop(self) -> None:
        """SIGTERM (sandboxes stay, as VMs do), then wait; SIGKILL the group if it hangs."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
                raise AssertionError(f"the emulator ignored SIGTERM:\n{self.log()}") from None
        self.proc = None

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-6000:]
        except OSError:
            return ""

    # ---- raw calls

    def call(
        self, method: str, path: str, *, mv: str | None = "2.100", **kw: Any
    ) -> requests.Response:
        headers = dict(kw.pop("headers", {}) or {})
        if mv and path.startswith("/compute/v2.1"):
            headers.setdefault("OpenStack-API-Version", f"compute {mv}")
        return self.http.request(method, self.url + path, headers=headers, timeout=15, **kw)

    def inject(self, kind: str, **fault: Any) -> dict[str, Any]:
        r = self.call("POST", "/compute/_stackml/faults", json={"kind": kind, **fault})
        assert r.status_code == 201, r.text
        created: dict[str, Any] = r.json()["fault"]
        return created

    def faults(self) -> list[dict[str, Any]]:
        items: list[dict[str, Any]] = self.call("GET", "/compute/_stackml/faults").json()["faults"]
        return items

    def clear_faults(self) -> None:
        assert self.call("DELETE", "/compute/_stackml/faults").status_code == 204

    def state(self) -> dict[str, Any]:
        data: dict[str, Any] = json.loads((self.state_dir / "state.json").read_text())
        return data

    # ---- leaks

    def leftovers(self) -> list[str]:
        """Servers, keypairs, floating IPs, distributed jobs' security groups and sandboxes that
        exist now (empty = clean)."""
        found = []
        servers = self.call("GET", "/compute/v2.1/servers/detail?all_tenants=1").json()["servers"]
        found += [f"server {s['id']} ({s['name']}, {s['status']})" for s in servers]
        found += [f"keypair {k}" for k in self.state()["keypairs"]]
        fips = self.call("GET", "/network/v2.0/floatingips").json()["floatingips"]
        found += [f"floating IP {f['floating_ip_address']} ({f['description']})" for f in fips]
        found += [
            f"security group {sg['name']}"
            for sg in self.state()["security_groups"].values()
            if sg["name"].startswith("stackml-peers-")
        ]
        found += leak_report(self.sandbox_root)
        return found

    def assert_clean(self) -> None:
        """Deletes finish in the background: wait for them (bounded), then nothing may be left;
        whatever is left is removed so that the next test starts clean."""
        deadline = time.monotonic() + SETTLE_TIMEOUT
        while (left := self.leftovers()) and time.monotonic() < deadline:
            time.sleep(0.05)
        if left:
            self.purge()
        assert left == [], f"left behind: {left}"

    def purge(self) -> None:
        for s in self.call("GET", "/compute/v2.1/servers?all_tenants=1").json()["servers"]:
            self.call("DELETE", f"/compute/v2.1/servers/{s['id']}")
        for key in list(self.state()["keypairs"]):
            user, name = key.split("/", 1)
            self.call("DELETE", f"/compute/v2.1/os-keypairs/{name}?user_id={user}")
        for f in self.call("GET", "/network/v2.0/floatingips").json()["floatingips"]:
            self.call("DELETE", f"/network/v2.0/floatingips/{f['id']}")
        deadline = time.monotonic() + SETTLE_TIMEOUT
        while self.call("GET", "/compute/v2.1/servers?all_tenants=1").json()["servers"]:
            if time.monotonic() > deadline:
                break
            time.sleep(0.05)
        for sg_id, sg in self.state()["security_groups"].items():
            if sg["name"].startswith("stackml-peers-"):
                self.call("DELETE", f"/network/v2.0/security-groups/{sg_id}")

    def teardown(self) -> None:
        """Stop the process, delete every sandbox it left, remove the work dir; then check."""
        try:
            self.stop()
        finally:
            cleanup(self.state_dir)
            leaks = leak_report(self.sandbox_root)
            shutil.rmtree(self.base, ignore_errors=True)
        assert leaks == [], f"sandboxes left after cleanup: {leaks}"


def sdk_connection(emu: EmulatorProcess, *, api_timeout: float = 15.0) -> Any:
    """An openstacksdk Connection to the emulator without Keystone (endpoint overrides only;
    clouds.yaml and OS_* variables are not read)."""
    import openstack.config
    from openstack.connection import Connection

    region = openstack.config.get_cloud_region(
        load_yaml_config=False,
        load_envvars=False,
        auth_type="none",
        compute_endpoint_override=f"{emu.url}/compute/v2.1",
        network_endpoint_override=f"{emu.url}/network",
        image_endpoint_override=f"{emu.url}/image",
        api_timeout=api_timeout,
    )
    return Connection(config=region)


def wait_status(conn: Any, server_id: str, statuses: set[str], timeout: float = 20.0) -> Any:
    """Poll a server (openstacksdk) until its status is one of `statuses`."""
    deadline = time.monotonic() + timeout
    while True:
        s = conn.compute.get_server(server_id)
        if s.status in statuses:
            return s
        assert time.monotonic() < deadline, f"server {server_id} stayed {s.status}"
        time.sleep(0.05)


@contextlib.contextmanager
def running_emulator(*args: str) -> Iterator[EmulatorProcess]:
    """A started emulator (with the runtime built), torn down and checked afterwards."""
    ensure_runtime()
    emu = EmulatorProcess(new_base(), args=args)
    emu.start()
    try:
        yield emu
    finally:
        emu.teardown()
