"""ServerSpec.ingress_ports against a real network namespace and nft: the host reaches a
sandbox's admitted port (a serving replica's REST port) and no other; a sandbox booted without
it admits nothing but SSH; another sandbox cannot reach the admitted port (its own egress
stays closed)."""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from service.backends.compute.sandbox import SandboxBackend, leak_report
from service.backends.compute.sandbox_net import SandboxNetwork
from service.backends.interfaces import Flavor, ServerSpec, ServerStatus
from tests.envutil import free_port
from workers import ssh

SMALL = Flavor(name="test.small", vcpus=1, ram_mb=512, pids=256)
ADMITTED, OTHER = 8501, 8502

# listens on both ports inside the sandbox for a while (detached from the SSH session)
LISTEN = (
    "import socket, time\n"
    "socks = []\n"
    f"for p in ({ADMITTED}, {OTHER}):\n"
    "    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
    "    s.bind(('0.0.0.0', p)); s.listen(8); socks.append(s)\n"
    "open('listening', 'w').close()\n"
    "time.sleep(120)\n"
)
PROBE = (
    "import socket, sys\n"
    "s = socket.socket(); s.settimeout(3)\n"
    "try:\n"
    "    s.connect((sys.argv[1], int(sys.argv[2]))); print('connected')\n"
    "except OSError as e:\n"
    "    print(type(e).__name__)\n"
)


@pytest.fixture
def base() -> Iterator[Path]:
    assert os.geteuid() == 0, "network namespaces and veths need root"
    for tool in ("ip", "nft", "nsenter"):
        assert shutil.which(tool), f"{tool} is required (scripts/system-deps.sh)"
    d = Path(tempfile.mkdtemp(prefix="stackml-ingress-", dir="/var/tmp"))
    os.chmod(d, 0o755)
    yield d
    cleaner = SandboxBackend(d / "sandboxes", [])  # what a failed test left running
    for ref in cleaner.list_servers():
        cleaner.delete_server(ref.id)
    problems = leak_report(d / "sandboxes")
    shutil.rmtree(d, ignore_errors=True)
    ssh.close_all()
    assert problems == [], f"the test left things behind: {problems}"


def _connects(host: str, port: int) -> bool:
    try:
        socket.create_connection((host, port), timeout=3).close()
        return True
    except OSError:
        return False


def _listen(st: ServerStatus, pem: str) -> ssh.SSHConnection:
    assert st.host and st.username
    conn = ssh.wait_for_ssh(ssh.SSHTarget(st.host, st.port, st.username, pem, st.host_key), 10)
    conn.put_bytes(LISTEN.encode(), "listen.py", 0o644)
    conn.run(["sh", "-c", "setsid python3 listen.py >/dev/null 2>&1 < /dev/null &"], timeout=10)
    deadline = time.monotonic() + 10
    while conn.run(["test", "-e", "listening"], timeout=10, check=False).returncode != 0:
        assert time.monotonic() < deadline, "the listener did not start"
        time.sleep(0.1)
    return conn


def test_only_the_admitted_port_is_reachable_from_the_host(base: Path) -> None:
    pem, pub = ssh.generate_keypair()
    net = SandboxNetwork(store_port=free_port())
    backend = SandboxBackend(base / "sandboxes", [SMALL], network=net)
    replica = backend.create_server(
        ServerSpec("replica", SMALL, "tensorflow-2.21", pub, ingress_ports=(ADMITTED,))
    )
    plain = backend.create_server(ServerSpec("plain", SMALL, "tensorflow-2.21", pub))
    st_r, st_p = backend.get_server(replica.id), backend.get_server(plain.id)
    assert st_r.host and st_p.host
    conn_r = _listen(st_r, pem)
    conn_p = _listen(st_p, pem)
    # both listen on both ports inside their namespaces
    for conn in (conn_r, conn_p):
        inside = conn.run(["python3", "-c", PROBE, "127.0.0.1", str(OTHER)], timeout=30).text
        assert inside.strip() == "connected"
    assert _connects(st_r.host, ADMITTED)
    assert not _connects(st_r.host, OTHER)
    assert not _connects(st_p.host, ADMITTED)
    assert not _connects(st_p.host, OTHER)
    # another sandbox cannot reach the replica's admitted port: its egress stays closed
    across = conn_p.run(["python3", "-c", PROBE, st_r.host, str(ADMITTED)], timeout=30).text
    assert across.strip() != "connected"
    for ref in (replica, plain):
        backend.delete_server(ref.id)
