"""Sandbox network isolation (sandbox_net.py) against real namespaces, veths, nft and OpenSSH:
from inside a sandbox, the host's loopback services, a host service on 0.0.0.0, the API and
other sandboxes' sshd are refused; the store gateway answers; delete leaves nothing behind."""

from __future__ import annotations

import errno
import json
import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from werkzeug.serving import make_server

from service.api.auth import ConfigurationError
from service.api.store import create_gateway_app
from service.backends.compute import sandbox_net
from service.backends.compute.sandbox import SandboxBackend, SandboxError, leak_report
from service.backends.compute.sandbox_net import SandboxNetwork
from service.backends.interfaces import Access, Flavor, ServerSpec, ServerStatus
from service.backends.storage.local import LocalStore
from service.config import Settings
from service.platform import LocalPlatform
from tests.envutil import free_port
from workers import ssh

SMALL = Flavor(name="test.small", vcpus=1, ram_mb=512, pids=256)
REDIS = ("127.0.0.1", 6379)
POSTGRES = ("127.0.0.1", 5432)

# run inside the sandbox as the job's user: try each target, print {"host:port": outcome}
PROBE = r"""
import json, socket, sys
out = {}
for target in sys.argv[1:]:
    host, port = target.rsplit(":", 1)
    s = socket.socket()
    s.settimeout(5)
    try:
        s.connect((host, int(port)))
        out[target] = "connected"
    except OSError as e:
        out[target] = type(e).__name__ + ": " + str(e)
    finally:
        s.close()
print(json.dumps(out))
"""


def _host_can_connect(host: str, port: int) -> bool:
    try:
        socket.create_connection((host, port), timeout=3).close()
        return True
    except OSError:
        return False


@pytest.fixture(scope="module")
def keypair() -> tuple[str, str]:
    return ssh.generate_keypair()


@pytest.fixture
def base() -> Iterator[Path]:
    assert os.geteuid() == 0, "network namespaces and veths need root"
    for tool in ("ip", "nft", "nsenter"):
        assert shutil.which(tool), f"{tool} is required (scripts/system-deps.sh)"
    d = Path(tempfile.mkdtemp(prefix="stackml-sbnet-", dir="/var/tmp"))
    os.chmod(d, 0o755)
    yield d
    problems = []
    for root in d.glob("sandboxes*"):
        problems += leak_report(root)
        cleaner = SandboxBackend(root, [])
        for ref in cleaner.list_servers():
            cleaner.delete_server(ref.id)
    shutil.rmtree(d, ignore_errors=True)
    ssh.close_all()
    assert problems == [], f"the test left things behind: {problems}"


@pytest.fixture
def net() -> SandboxNetwork:
    return SandboxNetwork(store_port=free_port())


def _spec(public_key: str, name: str) -> ServerSpec:
    return ServerSpec(name=name, flavor=SMALL, image="tensorflow-2.21", public_key=public_key)


def _target(st: ServerStatus, pem: str) -> ssh.SSHTarget:
    assert st.host and st.username
    return ssh.SSHTarget(st.host, st.port, st.username, pem, st.host_key)


def _probe(conn: ssh.SSHConnection, targets: list[str]) -> dict[str, str]:
    out = conn.run(["python3", "-c", PROBE, *targets], timeout=60).text
    result: dict[str, str] = json.loads(out)
    return result


def _host_ip() -> str:
    """The host's own (non-loopback, non-sandbox) address: services on 0.0.0.0 answer there."""
    out = subprocess.run(
        ["ip", "-o", "-4", "addr", "show", "scope", "global"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    for line in out.splitlines():
        addr = line.split()[3].split("/")[0]
        if not addr.startswith("10.253."):
            return addr
    raise AssertionError(f"this host has no global IPv4 address: {out}")


class _Listener:
    """A throwaway TCP service on the host (what a service on 0.0.0.0 or the API would be)."""

    def __init__(self, host: str) -> None:
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, 0))
        self.sock.listen(16)
        self.port: int = self.sock.getsockname()[1]

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def gateway(base: Path, net: SandboxNetwork) -> Iterator[LocalStore]:
    """The real store gateway app on the gateway address, with a local store holding one object."""
    sandbox_net.ensure_gateway(net)
    settings = Settings(data_dir=base / "data", store="local", compute="sandbox")
    store = LocalStore(base / "store", base_url=net.store_url, signing_key=b"k" * 32)
    store.put("projects/p/data/hello.txt", b"hello from the store\n")
    server = make_server(net.gateway, net.store_port, create_gateway_app(settings, store=store))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield store
    finally:
        server.shutdown()
        server.server_close()


def test_sandbox_reaches_only_the_store_gateway(
    base: Path, net: SandboxNetwork, gateway: LocalStore, keypair: tuple[str, str]
) -> None:
    pem, pub = keypair
    isolated = SandboxBackend(base / "sandboxes", [SMALL], network=net)
    plain = SandboxBackend(base / "sandboxes-hostnet", [SMALL])  # host networking, 127.77.x.y
    a = isolated.create_server(_spec(pub, "a"))
    b = isolated.create_server(_spec(pub, "b"))
    c = plain.create_server(_spec(pub, "c"))
    try:
        st_a, st_b, st_c = (
            isolated.get_server(a.id),
            isolated.get_server(b.id),
            plain.get_server(c.id),
        )
        assert st_a.host == net.address(int((base / "sandboxes" / a.id / "slot").read_text()))
        assert st_a.host != st_b.host and st_a.port == 22
        rec = json.loads((base / "sandboxes" / a.id / "server.json").read_text())
        assert rec["network_isolated"] is True and rec["network"]["netns"].startswith("stackml-")
        plain_rec = json.loads((base / "sandboxes-hostnet" / c.id / "server.json").read_text())
        assert plain_rec["network_isolated"] is False

        wildcard = _Listener("0.0.0.0")  # a host service on every address, the gateway's included
        api = _Listener("127.0.0.1")  # what the API is to a sandbox: a loopback port
        host_ip = _host_ip()
        targets = {
            "redis": f"{REDIS[0]}:{REDIS[1]}",
            "postgres": f"{POSTGRES[0]}:{POSTGRES[1]}",
            "api": f"127.0.0.1:{api.port}",
            "wildcard_on_loopback": f"127.0.0.1:{wildcard.port}",
            "wildcard_on_gateway": f"{net.gateway}:{wildcard.port}",
            "wildcard_on_host_ip": f"{host_ip}:{wildcard.port}",
            "host_sshd_on_gateway": f"{net.gateway}:22",
            "other_sandbox_sshd": f"{st_b.host}:{st_b.port}",
            "hostnet_sandbox_sshd": f"{st_c.host}:{st_c.port}",
        }
        try:
            # every target is alive: from the host each one answers
            for name in ("redis", "postgres", "api", "wildcard_on_gateway", "other_sandbox_sshd",
                         "hostnet_sandbox_sshd"):  # fmt: skip
                host, port = targets[name].rsplit(":", 1)
                assert _host_can_connect(host, int(port)), f"{name} ({targets[name]}) is not up"
            with ssh.wait_for_ssh(_target(st_a, pem), 10) as conn:
                got = _probe(conn, [*targets.values(), f"{net.gateway}:{net.store_port}"])
                for name, target in targets.items():
                    assert got[target] != "connected", f"the sandbox reached {name} at {target}"
                    assert got[target].startswith(("ConnectionRefusedError", "OSError")), got[
                        target
                    ]
                assert got[f"{net.gateway}:{net.store_port}"] == "connected"

                # the store gateway answers signed URLs, and only store routes
                grant = gateway.grant("projects/p/data/", Access.READ, 600)
                url = LocalStore.object_url(grant, "hello.txt")
                fetch = (
                    "import sys, urllib.request, urllib.error\n"
                    "try:\n"
                    "    r = urllib.request.urlopen(sys.argv[1], timeout=10)\n"
                    "    print(r.status, r.read().decode().strip())\n"
                    "except urllib.error.HTTPError as e:\n"
                    "    print(e.code)\n"
                )
                out = conn.run(["python3", "-c", fetch, url], timeout=30).text.strip()
                assert out == "200 hello from the store"
                for path in ("/v1/jobs", "/healthz", "/v1/health"):
                    out = conn.run(["python3", "-c", fetch, net.store_url + path], timeout=30).text
                    assert out.strip() == "404", (path, out)

                # the job cannot lift its own firewall (no CAP_NET_ADMIN in its namespace)
                r = conn.run(["/usr/sbin/nft", "flush", "ruleset"], timeout=30, check=False)
                assert r.returncode != 0
                r = conn.run(["ip", "route", "add", "default", "via", net.gateway], timeout=30,
                             check=False)  # fmt: skip
                assert r.returncode != 0
                again = _probe(conn, [targets["wildcard_on_gateway"]])
                assert again[targets["wildcard_on_gateway"]] != "connected"
        finally:
            wildcard.close()
            api.close()

        rec_b = json.loads((base / "sandboxes" / b.id / "server.json").read_text())
        names = [rec["network"]["netns"], rec_b["network"]["netns"]]
        veths = [rec["network"]["veth"]]
    finally:  # also after a failure, so that only the failure itself is reported
        for backend, ref in ((isolated, a), (isolated, b), (plain, c)):
            backend.delete_server(ref.id)
    for ns in names:
        assert not (sandbox_net.NETNS_DIR / ns).exists(), f"netns {ns} remains"
    for veth in veths:
        alias = sandbox_net._alias(veth)
        assert alias is None or not alias.startswith(str(base)), f"veth {veth} remains"
    tables = subprocess.run(["nft", "list", "tables"], capture_output=True, text=True).stdout
    assert "stackml" not in tables  # nothing in the host's own ruleset, ever
    assert leak_report(base / "sandboxes") == []
    # the address of a sandbox that is gone fails on the host at once: it is not routed out
    # by the default route, where something else could answer for it
    _assert_unreachable(st_a.host)


def _assert_unreachable(host: str) -> None:
    """Refused by the host's route (EHOSTUNREACH), not a connect that waits for its timeout."""
    with pytest.raises(OSError) as gone:
        socket.create_connection((host, 8501), timeout=5).close()
    assert gone.value.errno == errno.EHOSTUNREACH, gone.value


def test_the_sandbox_cidr_is_unreachable_on_the_host_but_for_live_sandboxes(
    base: Path, net: SandboxNetwork, keypair: tuple[str, str]
) -> None:
    cidr = net.cidr
    subprocess.run(["ip", "-4", "route", "del", "unreachable", cidr], capture_output=True)
    backend = SandboxBackend(base / "sandboxes", [SMALL], network=net)
    ref = backend.create_server(_spec(keypair[1], "live"))  # sets the gateway and the route up
    routes = subprocess.run(
        ["ip", "-4", "route", "show", "exact", cidr], capture_output=True, text=True, check=True
    ).stdout
    assert routes.split() == ["unreachable", cidr], routes
    host = backend.get_server(ref.id).host
    assert host is not None
    assert _host_can_connect(host, 22)  # its own /32 on its veth wins over the CIDR
    _assert_unreachable(net.address(4000))  # no sandbox has this one
    backend.delete_server(ref.id)
    _assert_unreachable(host)


def test_leak_report_sees_a_leftover_namespace_and_veth(
    base: Path, net: SandboxNetwork, keypair: tuple[str, str]
) -> None:
    _, pub = keypair
    root = base / "sandboxes"
    backend = SandboxBackend(root, [SMALL], network=net)
    ref = backend.create_server(_spec(pub, "leaky"))
    rec = json.loads((root / ref.id / "server.json").read_text())
    backend._kill(ref.id, rec, time.monotonic() + 10)  # what a crash mid-delete leaves
    report = leak_report(root)
    assert any(rec["network"]["netns"] in p for p in report), report
    assert any(rec["network"]["veth"] in p for p in report), report
    backend.delete_server(ref.id)  # a delete after a crash removes them
    assert leak_report(root) == []


def test_a_sandbox_whose_path_has_blanks_and_quotes_is_set_up_and_torn_down(
    base: Path, net: SandboxNetwork
) -> None:
    """setup() hands its commands to `ip -batch`, one process: the veth's alias (the owner's
    path, which teardown checks before it deletes anything) survives blanks and a quote."""
    owner = base / 'a "quoted" dir' / "srv-1"
    info = sandbox_net.setup(net, "tq", "srv-1", 3999, owner)
    try:
        assert sandbox_net._alias(info["veth"]) == str(owner)
        assert Path("/run/netns", info["netns"]).exists()
    finally:
        sandbox_net.teardown(info, owner)
    assert not Path(f"/sys/class/net/{info['veth']}").exists()
    assert not Path("/run/netns", info["netns"]).exists()
    with pytest.raises(sandbox_net.SandboxNetError, match="both quote characters"):
        sandbox_net.setup(net, "tq", "srv-2", 3998, base / 'it\'s a "dir"')
    assert not Path(f"/sys/class/net/{sandbox_net.veth_name(3998)}").exists()


def test_network_needs_root_isolation(base: Path, net: SandboxNetwork) -> None:
    with pytest.raises(SandboxError, match="network isolation needs sandbox isolation 'root'"):
        SandboxBackend(base / "sandboxes", [SMALL], isolation="rootless", network=net)


def test_settings_choose_the_network() -> None:
    on = Settings(compute="sandbox", sandbox_isolation="root", port=8123)
    got = sandbox_net.from_settings(on)
    assert got is not None and got.store_port == 8123 and got.gateway == "10.253.0.1"
    assert on.base_url == "http://10.253.0.1:8123"  # grants point at the store gateway
    assert sandbox_net.from_settings(on.model_copy(update={"sandbox_network": "host"})) is None
    rootless = on.model_copy(update={"sandbox_isolation": "rootless"})
    assert sandbox_net.from_settings(rootless) is None
    assert rootless.base_url == "http://127.0.0.1:8123"
    with pytest.raises(sandbox_net.SandboxNetError, match="needs sandbox_isolation=root"):
        sandbox_net.from_settings(rootless.model_copy(update={"sandbox_network": "isolated"}))


@pytest.mark.parametrize(
    "update",
    [{"sandbox_network": "host"}, {"sandbox_isolation": "rootless"}, {"sandbox_isolation": "none"}],
)
def test_keystone_with_sandboxes_refuses_to_start_without_isolation(
    base: Path, update: dict[str, str]
) -> None:
    settings = Settings(
        data_dir=base / "data",
        auth="keystone",
        compute="sandbox",
        **update,  # type: ignore[arg-type]
    )
    platform = LocalPlatform(settings)
    with pytest.raises(ConfigurationError, match="auth=keystone with compute=sandbox needs"):
        platform.start()
    assert not (base / "data").exists()  # refused before anything started
    with pytest.raises(sandbox_net.SandboxNetError, match="auth=keystone"):
        sandbox_net.from_settings(settings)  # a worker building the backend refuses too


def test_the_allow_list_opens_exactly_its_entries(base: Path, keypair: tuple[str, str]) -> None:
    """sandbox_allow (package mirrors): a listed host:port is reachable, the same host's other
    ports are not; a loopback entry is refused (127.0.0.0/8 is the sandbox's own)."""
    pem, pub = keypair
    host_ip = _host_ip()
    mirror, other = _Listener(host_ip), _Listener(host_ip)
    try:
        allow = sandbox_net.parse_allow([f"{host_ip}:{mirror.port}"])
        net = SandboxNetwork(store_port=free_port(), allow=allow)
        backend = SandboxBackend(base / "sandboxes", [SMALL], network=net)
        st = backend.get_server(backend.create_server(_spec(pub, "mirrored")).id)
        with ssh.wait_for_ssh(_target(st, pem), 10) as conn:
            got = _probe(conn, [f"{host_ip}:{mirror.port}", f"{host_ip}:{other.port}"])
        assert got[f"{host_ip}:{mirror.port}"] == "connected", got
        assert got[f"{host_ip}:{other.port}"].startswith("ConnectionRefusedError"), got
        backend.delete_server(st.id)
    finally:
        mirror.close()
        other.close()
    with pytest.raises(ValueError, match="loopback"):
        sandbox_net.parse_allow(["127.0.0.1:3141"])
    with pytest.raises(ValueError, match="host:port"):
        sandbox_net.parse_allow(["mirror.example"])


# run inside a sandbox: listen on argv[1] for one connection, print who came, or "timeout"
LISTEN = r"""
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", int(sys.argv[1])))
s.listen(4)
s.settimeout(float(sys.argv[2]))
try:
    c, who = s.accept()
    print(who[0], c.recv(16).decode())
except socket.timeout:
    print("timeout")
"""


def _send(
    sender: ssh.SSHConnection,
    receiver: ssh.SSHConnection,
    address: str,
    port: int,
    message: str,
    seconds: float,
) -> list[str]:
    """`receiver` listens on `port` while `sender` connects to `address` (within `seconds`)
    and sends `message`: what the listener printed ("<peer address> <message>", or
    "timeout")."""
    got: list[str] = []
    t = threading.Thread(
        target=lambda: got.append(
            receiver.run(
                ["python3", "-c", LISTEN, str(port), str(seconds + 5)], timeout=60
            ).text.strip()
        )
    )
    t.start()
    time.sleep(1.0)
    sender.run(
        ["python3", "-c", f"import socket; socket.create_connection(('{address}', {port}), "
         f"timeout={seconds}).send(b'{message}')"],
        timeout=30,
    )  # fmt: skip
    t.join(timeout=30)
    return got


def test_a_peer_group_reaches_its_own_members_on_its_ports_only(
    base: Path, net: SandboxNetwork, keypair: tuple[str, str]
) -> None:
    """Two sandboxes of one peer group connect on the peer port, over their own bridge; a
    sandbox of another group, one of no group and the host do not reach them there; another
    port between peers is refused. Deleting the members deletes the bridge."""
    pem, pub = keypair
    backend = SandboxBackend(base / "sandboxes", [SMALL], network=net)
    assert backend.peer_network is None
    assert SandboxBackend(base / "sandboxes-hostnet", [SMALL]).peer_network is not None

    def boot(name: str, group: str | None) -> str:
        spec = ServerSpec(
            name=name, flavor=SMALL, image="tensorflow-2.21", public_key=pub,
            peer_group=group, peer_ports=(2222,) if group else (),
        )  # fmt: skip
        return backend.create_server(spec).id

    ids = {n: boot(n, g) for n, g in (("a", "job-1"), ("b", "job-1"), ("x", "job-2"), ("z", None))}
    try:
        st = {n: backend.get_server(i) for n, i in ids.items()}
        assert st["z"].peer_host is None
        peers = {n: st[n].peer_host for n in ("a", "b", "x")}
        assert len(set(peers.values())) == 3 and all(
            p and p.startswith("10.252.") for p in peers.values()
        ), peers
        bridges = {
            json.loads((base / "sandboxes" / ids[n] / "server.json").read_text())["network"][
                "bridge"
            ]
            for n in ("a", "b", "x")
        }
        assert len(bridges) == 2  # one per group
        conns = {n: ssh.wait_for_ssh(_target(st[n], pem), 10) for n in ids}

        # a (same group) reaches b on the peer port; b sees a's peer address
        got = _send(conns["a"], conns["b"], str(peers["b"]), 2222, "hello", 5)
        assert got == [f"{peers['a']} hello"]
        # nobody else gets there: another group, no group, the host; nor a's other ports
        for n in ("x", "z"):
            probe = _probe(conns[n], [f"{peers['b']}:2222"])
            assert probe[f"{peers['b']}:2222"] != "connected", (n, probe)
        _assert_unreachable(str(peers["b"]))  # the host does not route peer addresses
        probe = _probe(conns["a"], [f"{peers['b']}:22", f"{peers['b']}:2223"])
        assert all(v != "connected" for v in probe.values()), probe
        for c in conns.values():
            c.close()
    finally:
        for i in ids.values():
            backend.delete_server(i)
    for bridge in bridges:
        assert not Path(f"/sys/class/net/{bridge}").exists(), f"bridge {bridge} remains"
    assert leak_report(base / "sandboxes") == []


def test_a_replicas_replacement_gets_its_peer_address_and_is_reached_there(
    base: Path, net: SandboxNetwork, keypair: tuple[str, str]
) -> None:
    """With a peer index, a group member's peer address is the index's, not the slot's: the
    server booted for the same index after the first is deleted (a replica replaced alone)
    has the same address, and its peer reaches it there (a fresh neighbour, not the gone
    one's)."""
    pem, pub = keypair
    backend = SandboxBackend(base / "sandboxes", [SMALL], network=net)
    assert backend.capabilities.stable_peer_addresses

    def boot(name: str, index: int) -> str:
        spec = ServerSpec(
            name=name, flavor=SMALL, image="tensorflow-2.21", public_key=pub,
            peer_group="job-3", peer_ports=(2222, 2223), peer_index=index,
        )  # fmt: skip
        return backend.create_server(spec).id

    chief, first = boot("c0", 0), boot("c1", 1)
    ids = [chief, first]
    try:
        address = backend.get_server(first).peer_host
        assert address == net.peer_address(1), address
        conn = ssh.wait_for_ssh(_target(backend.get_server(chief), pem), 10)
        assert _probe(conn, [f"{address}:2223"])[f"{address}:2223"] != "connected"  # no listener
        backend.delete_server(first)
        second = boot("c1-again", 1)
        ids.append(second)
        again = backend.get_server(second)
        assert again.peer_host == address
        replacement = ssh.wait_for_ssh(_target(again, pem), 10)
        got = _send(conn, replacement, str(address), 2223, "again", 15)
        assert got == [f"{net.peer_address(0)} again"]
        conn.close()
        replacement.close()
    finally:
        for i in ids:
            backend.delete_server(i)
    assert leak_report(base / "sandboxes") == []
