"""The emulated hypervisor: each server is a sandbox (service/backends/compute/sandbox.py).

A create records the server in BUILD and starts a boot thread: after a scheduling moment it
either fails the server with Nova's "No valid host" fault (an injected fault), or waits out an
injected slow build, boots a sandbox from the server's flavor, image and keypair, gives it a
port on the private network (the sandbox's loopback address is the fixed IP) and turns ACTIVE
with a cloud-init style console log that prints the host key. A delete tears the sandbox down
in the background, then the server is gone (404). Restarting the emulator keeps running
sandboxes (they are the VMs), resumes interrupted boots and deletes, and removes sandboxes that
no server owns.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import os
import secrets
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from devcloud.emulator import faults
from devcloud.emulator.catalog import (
    PRIVATE_NET,
    RUNTIME_MOUNT_ROOT,
    EmulatorConfig,
    stable_id,
)
from devcloud.emulator.state import State, StateStore
from service.backends.compute.sandbox import ID_RE, SandboxBackend
from service.backends.interfaces import Flavor, ServerSpec, ServerState
from service.domain.errors import BackendError, ServerNotFound

log = logging.getLogger("stackml.emulator")

SCHEDULE_SECONDS = 0.05  # a server is always seen in BUILD for a moment, as with Nova
JOIN_TIMEOUT = 60.0


@dataclass
class _Boot:
    thread: threading.Thread
    cancel: threading.Event


def _placeholder_key() -> str:
    """A public key nobody holds: a server booted without a keypair gets this one."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    pub = Ed25519PrivateKey.generate().public_key()
    return pub.public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    ).decode()


def ssh_fingerprint(public_line: str) -> str:
    blob = base64.b64decode(public_line.split()[1])
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")


def console_head(server: dict[str, Any], host_key: str, runtime_note: str) -> str:
    """What a cloud-init image prints on its serial console while booting."""
    host = server["hostname"]
    key = " ".join(host_key.split()[:2])
    up = time.strftime("%a, %d %b %Y %H:%M:%S +0000", time.gmtime())
    return "\n".join(
        [
            "[    0.000000] Linux version 6.1.0-stackml (stackml devcloud emulator: a sandbox)",
            f"[    0.000000] Command line: root=LABEL=cloudimg-rootfs console=ttyS0 {host}",
            f"Cloud-init v. 23.1.2 running 'init' at {up}. Up 1.02 seconds.",
            "ci-info: ++++++++++++++++++++++Net device info+++++++++++++++++++++++",
            f"ci-info: | eth0 | True | {server.get('address') or '-'} | "
            f"{server.get('mac') or '-'} |",
            f"ci-info: {runtime_note}",
            "Generating public/private ed25519 key pair.",
            f"Cloud-init v. 23.1.2 running 'modules:final' at {up}. Up 2.10 seconds.",
            "-----BEGIN SSH HOST KEY FINGERPRINTS-----",
            f"256 {ssh_fingerprint(key)} root@{host} (ED25519)",
            "-----END SSH HOST KEY FINGERPRINTS-----",
            "-----BEGIN SSH HOST KEY KEYS-----",
            f"{key} root@{host}",
            "-----END SSH HOST KEY KEYS-----",
            f"Cloud-init v. 23.1.2 finished at {up}. Datasource DataSourceOpenStackLocal.  "
            "Up 2.31 seconds",
            "",
        ]
    )


def random_mac() -> str:
    return "fa:16:3e:" + ":".join(f"{b:02x}" for b in secrets.token_bytes(3))


def release_network(state: State, server_id: str) -> None:
    """Delete the server's ports; floating IPs on them are disassociated (kept), as in Neutron."""
    gone = [pid for pid, p in state["ports"].items() if p["device_id"] == server_id]
    for pid in gone:
        del state["ports"][pid]
    for fip in state["floatingips"].values():
        if fip["port_id"] in gone:
            fip.update(
                port_id=None,
                fixed_ip_address=None,
                router_id=None,
                status="DOWN",
                port_details=None,
                updated_at=time.time(),
            )


class Machines:
    """Boots, watches and deletes the sandboxes behind the servers."""

    def __init__(self, cfg: EmulatorConfig, store: StateStore) -> None:
        self.cfg = cfg
        self.store = store
        isolation = cfg.isolation
        if isolation == "auto":
            isolation = "root" if os.geteuid() == 0 else "rootless"
        extra: dict[str, Any] = {}
        if isolation == "root":
            extra = {"login_user": cfg.login_user, "mounts": self._mounts}
        else:
            log.warning(
                "sandbox isolation %s: servers log in as the current user and carry no runtime "
                "at %s (run the emulator as root for stackml-image servers)",
                isolation,
                RUNTIME_MOUNT_ROOT,
            )
        self.sandboxes = SandboxBackend(cfg.sandboxes, [], isolation=isolation, **extra)
        self._nokey = _placeholder_key()
        self._lock = threading.Lock()
        self._boots: dict[str, _Boot] = {}
        self._deletes: dict[str, threading.Thread] = {}

    # ---- sandbox specs

    def _mounts(self, spec: ServerSpec) -> list[tuple[str | Path, str]]:
        image = next((i for i in self.cfg.images if i.name == spec.image), None)
        if image is None or image.runtime is None:
            return []
        built = self.cfg.runtime_dir(image.runtime)
        if built is None:
            return []
        return [(built, f"{RUNTIME_MOUNT_ROOT}/{image.runtime}")]

    def _runtime_note(self, image_name: str) -> str:
        image = next((i for i in self.cfg.images if i.name == image_name), None)
        if image is None or image.runtime is None:
            return f"image {image_name}: no stackml runtime"
        built = self.cfg.runtime_dir(image.runtime)
        if built is None or self.sandboxes.isolation != "root":
            return f"image {image_name}: runtime {image.runtime} is NOT on this server"
        return (
            f"image {image_name}: runtime {image.runtime} at {RUNTIME_MOUNT_ROOT}/{image.runtime}"
        )

    def _spec(self, srv: dict[str, Any]) -> ServerSpec:
        f = srv["flavor"]
        return ServerSpec(
            name=srv["name"],
            flavor=Flavor(name=f["name"], vcpus=f["vcpus"], ram_mb=f["ram"], disk_gb=f["disk"]),
            image=srv["image_name"],
            public_key=srv.get("public_key") or self._nokey,
            tags=(("nova-server", srv["id"]),),
        )

    # ---- boot

    def launch(self, server_id: str) -> None:
        cancel = threading.Event()
        thread = threading.Thread(
            target=self._boot, args=(server_id, cancel), name=f"boot-{server_id[:8]}", daemon=True
        )
        with self._lock:
            self._boots[server_id] = _Boot(thread, cancel)
        thread.start()

    def _boot(self, server_id: str, cancel: threading.Event) -> None:
        try:
            self._boot_steps(server_id, cancel)
        except Exception as e:
            log.exception("boot of server %s failed", server_id)
            self._set_error(server_id, 500, f"Build of instance {server_id} aborted: {e}")
        finally:
            with self._lock:
                self._boots.pop(server_id, None)

    def _boot_steps(self, server_id: str, cancel: threading.Event) -> None:
        srv = self.store.read()["servers"].get(server_id)
        if srv is None or cancel.wait(SCHEDULE_SECONDS):
            return
        plan = srv.get("boot") or {}
        if plan.get("no_valid_host"):
            self._set_error(server_id, 500, faults.NO_VALID_HOST)
            return
        if plan.get("delay") and cancel.wait(float(plan["delay"])):
            return
        with self.store.tx() as st:
            if server_id in st["servers"]:
                st["servers"][server_id]["task_state"] = "spawning"
        try:
            ref = self.sandboxes.create_server(self._spec(srv))
        except BackendError as e:
            self._set_error(server_id, 500, f"Build of instance {server_id} aborted: {e}")
            return
        sandbox = self.sandboxes.get_server(ref.id)
        assert sandbox.host and sandbox.host_key
        orphan = False
        with self.store.tx() as st:
            cur = st["servers"].get(server_id)
            if cur is None:
                orphan = True
            else:
                cur["sandbox_id"] = ref.id  # recorded even when deleting: the deleter takes it
                cur["address"] = sandbox.host
                cur["ssh_port"] = sandbox.port
                if cur.get("task_state") != "deleting":
                    self._plug(st, cur)
                    cur["console_head"] = console_head(
                        cur, sandbox.host_key, self._runtime_note(cur["image_name"])
                    )
        if orphan:
            self.sandboxes.delete_server(ref.id)
            return
        if sandbox.port != 22:
            log.warning("server %s: its sshd listens on port %s, not 22", server_id, sandbox.port)
        if self.cfg.boot_delay and cancel.wait(self.cfg.boot_delay):
            return
        with self.store.tx() as st:
            cur = st["servers"].get(server_id)
            if cur is not None and cur.get("task_state") != "deleting":
                now = time.time()
                cur.update(
                    status="ACTIVE",
                    vm_state="active",
                    task_state=None,
                    power_state=1,
                    launched_at=now,
                    updated=now,
                    progress=0,
                )

    def _plug(self, st: State, srv: dict[str, Any]) -> None:
        """A port on each of the server's networks (the sandbox address is its fixed IP)."""
        srv["mac"] = random_mac()
        for net_id in srv["networks"]:
            port_id = str(uuid.uuid4())
            now = time.time()
            st["ports"][port_id] = {
                "id": port_id,
                "name": "",
                "network_id": net_id,
                "project_id": srv["project_id"],
                "device_id": srv["id"],
                "device_owner": f"compute:{srv['availability_zone']}",
                "mac_address": srv["mac"],
                "fixed_ips": [
                    {"subnet_id": stable_id("subnet", PRIVATE_NET), "ip_address": srv["address"]}
                ],
                "security_groups": list(srv["security_group_ids"]),
                "status": "ACTIVE",
                "admin_state_up": True,
                "created_at": now,
                "updated_at": now,
            }
            srv["port_id"] = port_id

    def _set_error(self, server_id: str, code: int, message: str) -> None:
        with self.store.tx() as st:
            srv = st["servers"].get(server_id)
            if srv is None or srv.get("task_state") == "deleting":
                return
            now = time.time()
            srv.update(
                status="ERROR",
                vm_state="error",
                task_state=None,
                power_state=0,
                updated=now,
                fault={"code": code, "message": message, "created": now},
            )

    # ---- health

    def check(self, server_id: str) -> None:
        """An ACTIVE server whose sandbox died or went away is SHUTOFF (its "VM" is off)."""
        srv = self.store.read()["servers"].get(server_id)
        if not srv or srv["status"] != "ACTIVE" or not srv.get("sandbox_id"):
            return
        if self.sandboxes.get_server(srv["sandbox_id"]).state is ServerState.ACTIVE:
            return
        with self.store.tx() as st:
            cur = st["servers"].get(server_id)
            if cur and cur["status"] == "ACTIVE":
                cur.update(status="SHUTOFF", vm_state="stopped", power_state=4, updated=time.time())

    # ---- delete, vanish

    def delete(self, server_id: str) -> None:
        """Tear the server down in the background; it answers 404 once its sandbox is gone."""
        with self._lock:
            running = self._deletes.get(server_id)
            if running is not None and running.is_alive():
                return
            t = threading.Thread(
                target=self._delete, args=(server_id,), name=f"del-{server_id[:8]}", daemon=True
            )
            self._deletes[server_id] = t
        t.start()

    def _delete(self, server_id: str) -> None:
        try:
            self._stop_boot(server_id)
            srv = self.store.read()["servers"].get(server_id)
            if srv and srv.get("sandbox_id"):
                self.sandboxes.delete_server(srv["sandbox_id"])
            with self.store.tx() as st:
                st["servers"].pop(server_id, None)
                release_network(st, server_id)
        except Exception as e:
            log.exception("delete of server %s failed", server_id)
            with self.store.tx() as st:
                srv = st["servers"].get(server_id)
                if srv is not None:
                    now = time.time()
                    srv.update(
                        status="ERROR",
                        vm_state="error",
                        task_state=None,
                        updated=now,
                        fault={"code": 500, "message": f"delete failed: {e}", "created": now},
                    )
        finally:
            with self._lock:
                self._deletes.pop(server_id, None)

    def _stop_boot(self, server_id: str) -> None:
        with self._lock:
            boot = self._boots.get(server_id)
        if boot is not None:
            boot.cancel.set()
            boot.thread.join(JOIN_TIMEOUT)

    def vanish(self, server_id: str, sandbox_id: str | None) -> None:
        """The server is already out of the state; take its sandbox away now."""
        self._stop_boot(server_id)
        if sandbox_id:
            self.sandboxes.delete_server(sandbox_id)

    def console(self, srv: dict[str, Any], length: int | None) -> str:
        text = srv.get("console_head") or ""
        if srv.get("sandbox_id"):
            try:
                text += self.sandboxes.console_log(srv["sandbox_id"], 16384)
            except ServerNotFound:
                pass  # torn down meanwhile
        lines = text.splitlines(keepends=True)
        if length is not None and length >= 0:
            lines = lines[-length:] if length else []
        return "".join(lines)

    # ---- restart, cleanup

    def recover(self) -> None:
        """After a restart: finish deletes, resume boots, drop sandboxes no server owns."""
        with self.store.tx() as st:
            st["sandbox_root"] = str(self.cfg.sandboxes)
            servers = dict(st["servers"])
        owned = {s.get("sandbox_id") for s in servers.values()}
        for ref in self.sandboxes.list_servers():
            if ref.id not in owned:
                log.info("removing sandbox %s: no server owns it", ref.id)
                self.sandboxes.delete_server(ref.id)
        for sid, srv in servers.items():
            if srv.get("task_state") == "deleting":
                self.delete(sid)
            elif srv["status"] == "BUILD":
                sandbox = srv.get("sandbox_id")
                if sandbox and self.sandboxes.get_server(sandbox).state is ServerState.ACTIVE:
                    with self.store.tx() as st:
                        st["servers"][sid].update(
                            status="ACTIVE", vm_state="active", task_state=None, power_state=1
                        )
                    continue
                if sandbox:
                    self.sandboxes.delete_server(sandbox)
                with self.store.tx() as st:
                    st["servers"][sid]["sandbox_id"] = None
                    release_network(st, sid)
                self.launch(sid)

    def wait_idle(self, timeout: float) -> None:
        """Wait for running boots and deletes (tests, shutdown)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                threads = [b.thread for b in self._boots.values()] + list(self._deletes.values())
            if not threads:
                return
            threads[0].join(max(0.0, deadline - time.monotonic()))


def cleanup(state_dir: Path | str) -> int:
    """Delete every sandbox of the emulator whose state lives in `state_dir` (the servers go with
    them; keypairs, security groups and floating IPs stay). Returns how many were deleted."""
    store = StateStore(Path(state_dir))
    st = store.read()
    root = Path(st.get("sandbox_root") or Path(state_dir) / "sandboxes")
    removed = 0
    if root.is_dir():
        sandboxes = SandboxBackend(root, [])
        for name in sorted(os.listdir(root)):
            if ID_RE.fullmatch(name):
                sandboxes.delete_server(name)
                removed += 1
    with store.tx() as st:
        for sid in list(st["servers"]):
            release_network(st, sid)
        st["servers"].clear()
    return removed
