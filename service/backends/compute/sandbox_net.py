"""Sandbox network isolation: a network namespace per sandbox, reaching only what a VM would.

A sandbox with `root` isolation and a network (`SandboxNetwork`, from the `sandbox_network*`
settings) gets, before its sshd starts:

- a named network namespace `stackml-<root tag>-<id>` (/run/netns), in which sshd and every job
  process live (the launcher is `nsenter --net=/run/netns/<ns> unshare ...`);
- a veth pair: `smv<slot>` in the host's namespace (its ifalias names the sandbox dir, so a
  leftover is traceable), `eth0` inside with the sandbox's address `<cidr> + 1 + slot` (/32);
- point-to-point routes only: inside, the gateway (/32 on eth0) and the allow-list hosts via the
  gateway; on the host, the sandbox's /32 on its veth. No default route, so anything else is
  "Network is unreachable"; the host's `ip_forward` is left as it is (off here), so a sandbox
  cannot route to another;
- the gateway address (`<cidr> + 1`), a /32 on the host's `lo` (added once, kept), and the
  whole CIDR `unreachable` on the host (kept), the peer CIDR too: a gone sandbox's address (and
  any peer address) fails at once instead of leaving by the default route;
- an nft table `inet stackml` inside the namespace (the job is unprivileged there and cannot
  change it): output policy drop except loopback, established/related, TCP to the store gateway
  (gateway:store_port) and the allow list, rejected at once (TCP reset / admin-prohibited) so
  a refused connect does not hang; input only SSH (22), loopback and established traffic.

The host's loopback (Redis, PostgreSQL, the API, other sandboxes' 127.77.x.y sshd) is not in the
namespace at all: 127.0.0.1 there is the sandbox's own `lo`. Services bound to 0.0.0.0 on the
host answer on the gateway address too, which is why the nft table admits only the store port.

A sandbox of a peer group (ServerSpec.peer_group: a distributed job's replicas) also gets a
second veth: `smp<slot>` on the host, enslaved to the group's own bridge `smb<hash of root tag
and group>` (no address on the host, the bridge's netfilter calls off), and `eth1` inside with
the peer address `<peer_cidr> + 1 + <its peer_index>` (the replica's index; without one,
`+ 1 + slot`) on the peer CIDR's prefix: the same address for a replica's replacement (each
group has a bridge of its own, so the groups' addresses may repeat). Only the group's sandboxes
are on that bridge, so only they reach each other there; the nft table admits TCP on
`peer_ports` in and out of `eth1` and nothing else on it. The last member's teardown deletes
the bridge.

Teardown deletes the host veths (their peers go with them) and the namespace, whose nft state
dies with it. `leaks(root)` reports namespaces, veths and bridges a sandbox dir left behind.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import ipaddress
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from service.domain.errors import BackendError

if TYPE_CHECKING:
    from service.config import Settings

NETNS_DIR = Path("/run/netns")
NETNS_PREFIX = "stackml-"
VETH_PREFIX = "smv"
PEER_VETH_PREFIX = "smp"
BRIDGE_PREFIX = "smb"
PEER_LINK = "eth1"
GATEWAY_LINK = "lo"
LOCK = Path("/run/stackml/net.lock")
SSH_PORT = 22
CMD_TIMEOUT = 10.0
ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"}
TOOLS = {"ip": "iproute2", "nft": "nftables", "nsenter": "util-linux"}


class SandboxNetError(BackendError):
    """The sandbox network could not be set up or torn down (or its tools are missing)."""

    reason = "sandbox_network"


@dataclass(frozen=True)
class SandboxNetwork:
    """What an isolated sandbox may reach: the store gateway and the allow list, nothing else."""

    cidr: str = "10.253.0.0/16"
    store_port: int = 8080  # the store gateway's TCP port on the gateway address
    allow: tuple[tuple[str, int], ...] = ()  # (IPv4 address, TCP port) package mirrors etc.
    peer_cidr: str = "10.252.0.0/16"  # peer group addresses, on each group's own bridge

    def __post_init__(self) -> None:
        net = self._net()
        if net.num_addresses < 4:
            raise ValueError(f"sandbox_network_cidr {self.cidr} is too small")
        try:
            peers = ipaddress.IPv4Network(self.peer_cidr, strict=True)
        except ValueError as e:
            raise ValueError(
                f"sandbox_peer_cidr {self.peer_cidr!r} is not an IPv4 network: {e}"
            ) from e
        if peers.overlaps(net):
            raise ValueError(
                f"sandbox_peer_cidr {self.peer_cidr} overlaps sandbox_network_cidr {self.cidr}"
            )
        if not 0 < self.store_port < 65536:
            raise ValueError(f"store gateway port {self.store_port} is out of range")

    def _net(self) -> ipaddress.IPv4Network:
        try:
            return ipaddress.IPv4Network(self.cidr, strict=True)
        except ValueError as e:
            raise ValueError(
                f"sandbox_network_cidr {self.cidr!r} is not an IPv4 network: {e}"
            ) from e

    @property
    def gateway(self) -> str:
        return str(self._net().network_address + 1)

    def address(self, slot: int) -> str:
        net = self._net()
        addr = net.network_address + 1 + slot
        if addr >= net.broadcast_address:
            raise SandboxNetError(f"slot {slot} has no address in {self.cidr}: use a larger cidr")
        return str(addr)

    def peer_address(self, slot: int) -> str:
        net = ipaddress.IPv4Network(self.peer_cidr)
        addr = net.network_address + 1 + slot
        if addr >= net.broadcast_address:
            raise SandboxNetError(f"slot {slot} has no peer address in {self.peer_cidr}")
        return str(addr)

    @property
    def peer_prefix(self) -> int:
        return ipaddress.IPv4Network(self.peer_cidr).prefixlen

    @property
    def store_url(self) -> str:
        return f"http://{self.gateway}:{self.store_port}"


# --------------------------------------------------------------------------- settings


def _effective_isolation(settings: Settings) -> str:
    iso = settings.sandbox_isolation
    if iso == "auto":
        return "root" if os.geteuid() == 0 else "rootless"
    return iso


def parse_allow(entries: list[str]) -> tuple[tuple[str, int], ...]:
    """`["host:port", ...]` -> ((ip, port), ...); names resolve now (IPv4 only), once per
    process (the settings are read on every backend lookup)."""
    return _parse_allow(tuple(str(e) for e in entries))


@functools.lru_cache(maxsize=32)
def _parse_allow(entries: tuple[str, ...]) -> tuple[tuple[str, int], ...]:
    out: list[tuple[str, int]] = []
    for entry in entries:
        host, sep, port_s = str(entry).rpartition(":")
        if not sep or not host or not port_s.isdigit() or not 0 < int(port_s) < 65536:
            raise ValueError(f"sandbox_allow entry {entry!r} must be host:port")
        try:
            infos = socket.getaddrinfo(host, int(port_s), socket.AF_INET, socket.SOCK_STREAM)
        except OSError as e:
            raise ValueError(f"sandbox_allow entry {entry!r}: cannot resolve {host}: {e}") from e
        for info in infos:
            if ipaddress.IPv4Address(info[4][0]).is_loopback:
                raise ValueError(
                    f"sandbox_allow entry {entry!r} is a loopback address: inside a sandbox "
                    "127.0.0.0/8 is its own loopback; serve the mirror on the host's address "
                    "or the gateway's instead"
                )
            pair = (str(info[4][0]), int(port_s))
            if pair not in out:
                out.append(pair)
    return tuple(out)


def config_problem(settings: Settings) -> str | None:
    """Why these settings must not start (None: fine). auth=keystone serves tenants, so their
    sandboxes must not reach the platform's loopback services."""
    if settings.compute != "sandbox":
        return None
    iso = _effective_isolation(settings)
    if settings.sandbox_network == "isolated" and iso != "root":
        return (
            f"sandbox_network=isolated needs sandbox_isolation=root (running as root); it is {iso}"
        )
    if settings.auth == "keystone" and (iso != "root" or settings.sandbox_network == "host"):
        return (
            "auth=keystone with compute=sandbox needs sandbox network isolation: set "
            "sandbox_network=isolated (or auto) with sandbox_isolation=root and run as root; "
            f"now sandbox_network={settings.sandbox_network}, sandbox_isolation={iso}. Without "
            "it every tenant's job reaches the platform's Redis, PostgreSQL and API on loopback"
        )
    return None


def from_settings(settings: Settings) -> SandboxNetwork | None:
    """The network of the settings' sandboxes: None = host networking (rootless/none isolation,
    or sandbox_network=host). Refuses configurations config_problem() names."""
    problem = config_problem(settings)
    if problem:
        raise SandboxNetError(problem)
    if settings.compute != "sandbox" or settings.sandbox_network == "host":
        return None
    if _effective_isolation(settings) != "root":
        return None  # auto without root: host networking (server.json says network_isolated)
    return SandboxNetwork(
        cidr=settings.sandbox_network_cidr,
        store_port=settings.sandbox_gateway_port or settings.port,
        allow=parse_allow(settings.sandbox_allow),
        peer_cidr=settings.sandbox_peer_cidr,
    )


# --------------------------------------------------------------------------- commands


def require_tools() -> None:
    missing = [
        f"{t} ({pkg})" for t, pkg in TOOLS.items() if shutil.which(t, path=ENV["PATH"]) is None
    ]
    if missing:
        raise SandboxNetError(
            "sandbox network isolation needs " + ", ".join(missing) + ": install them "
            "(scripts/system-deps.sh) or set sandbox_network=host (tenants then reach the "
            "host's loopback)"
        )


def _run(argv: list[str], stdin: str | None = None, check: bool = True) -> str:
    try:
        r = subprocess.run(
            argv, input=stdin, capture_output=True, text=True, env=ENV, timeout=CMD_TIMEOUT,
            check=False,
        )  # fmt: skip
    except (OSError, subprocess.TimeoutExpired) as e:
        raise SandboxNetError(f"{' '.join(argv)} failed: {e}") from e
    if check and r.returncode != 0:
        raise SandboxNetError(f"{' '.join(argv)} failed ({r.returncode}): {r.stderr.strip()}")
    return r.stdout


@contextlib.contextmanager
def _locked() -> Iterator[None]:
    LOCK.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def ensure_gateway(net: SandboxNetwork) -> None:
    """The gateway address, a /32 on the host's `lo` (idempotent, machine-wide, kept: the store
    gateway listens on it). Not a dummy link: some kernels (containers) have no dummy driver.

    And the whole sandbox CIDR `unreachable` in the host's main table (kept too): a live
    sandbox's /32 on its veth is more specific and wins, but the address of a sandbox that is
    gone must fail at once (EHOSTUNREACH), not leave by the default route, where whatever
    answers there (seen here: an egress proxy's `404` with an empty body) would pass for the
    dead sandbox, e.g. for a serving replica the proxy has not dropped yet."""
    require_tools()
    with _locked():
        # one `ip` for the three (every sandbox's setup runs this); each is idempotent. Peer
        # addresses live only on the groups' bridges: the host never routes them out either.
        _ip_batch(
            f"addr replace {net.gateway}/32 dev {GATEWAY_LINK}",
            f"route replace unreachable {net._net()}",
            f"route replace unreachable {net.peer_cidr}",
        )


def _ip_batch(*commands: str, netns: str | None = None) -> None:
    """Run `ip` commands in one process (`ip -batch`), stopping at the first that fails."""
    _run(["ip", *(("-n", netns) if netns else ()), "-batch", "-"], stdin="\n".join(commands) + "\n")


def _quoted(word: str) -> str:
    """A word for an `ip -batch` line, which splits on blanks and takes a word in double or
    single quotes as it is (no escapes)."""
    for q in "\"'":
        if q not in word and "\n" not in word and "\r" not in word:
            return f"{q}{word}{q}"
    raise SandboxNetError(f"{word!r} holds both quote characters or a line break")


def netns_name(tag: str, sid: str) -> str:
    return f"{NETNS_PREFIX}{tag}-{sid}"


def veth_name(slot: int) -> str:
    return f"{VETH_PREFIX}{slot}"


def peer_veth_name(slot: int) -> str:
    return f"{PEER_VETH_PREFIX}{slot}"


def bridge_name(tag: str, group: str) -> str:
    """A peer group's bridge (15 characters at most, as Linux wants)."""
    return BRIDGE_PREFIX + hashlib.sha256(f"{tag}/{group}".encode()).hexdigest()[:10]


def launcher(netns: str) -> list[str]:
    """The argv prefix that starts the sandbox's launcher inside its namespace (nsenter execs)."""
    return ["nsenter", f"--net={NETNS_DIR / netns}", "--"]


def _ports(ports: tuple[int, ...]) -> list[int]:
    return sorted({int(p) for p in ports if 0 < int(p) < 65536 and int(p) != SSH_PORT})


def ruleset(
    net: SandboxNetwork, ingress_ports: tuple[int, ...] = (), peer_ports: tuple[int, ...] = ()
) -> str:
    """The namespace's nft table: out only to the store gateway and the allow list; in only
    SSH and `ingress_ports` (a serving replica's REST port, ServerSpec.ingress_ports); on the
    peer link, TCP on `peer_ports` both ways (a peer group's sandboxes only)."""
    allow = "".join(f"    ip daddr {ip} tcp dport {port} accept\n" for ip, port in net.allow)
    allow += "".join(
        f'    oifname "{PEER_LINK}" tcp dport {p} accept\n' for p in _ports(peer_ports)
    )
    ingress = "".join(f"    tcp dport {p} accept\n" for p in _ports(ingress_ports))
    ingress += "".join(
        f'    iifname "{PEER_LINK}" tcp dport {p} accept\n' for p in _ports(peer_ports)
    )
    return (
        "table inet stackml {\n"
        "  chain output {\n"
        "    type filter hook output priority filter; policy drop;\n"
        '    oifname "lo" accept\n'
        "    ct state established,related accept\n"
        f"    ip daddr {net.gateway} tcp dport {net.store_port} accept\n"
        f"{allow}"
        "    meta l4proto tcp reject with tcp reset\n"
        "    reject with icmpx type admin-prohibited\n"
        "  }\n"
        "  chain input {\n"
        "    type filter hook input priority filter; policy drop;\n"
        '    iifname "lo" accept\n'
        "    ct state established,related accept\n"
        f"    tcp dport {SSH_PORT} accept\n"
        f"{ingress}"
        "  }\n"
        "}\n"
    )


def setup(
    net: SandboxNetwork,
    tag: str,
    sid: str,
    slot: int,
    owner: Path,
    ingress_ports: tuple[int, ...] = (),
    peer_group: str | None = None,
    peer_ports: tuple[int, ...] = (),
    peer_index: int | None = None,
) -> dict[str, str]:
    """Make the sandbox's namespace, veth, routes and nft table (and its peer group's link);
    returns what server.json records. On failure nothing is left."""
    ensure_gateway(net)
    ns, veth, addr = netns_name(tag, sid), veth_name(slot), net.address(slot)
    info = {"netns": ns, "veth": veth, "address": addr, "gateway": net.gateway}
    if peer_group is not None:
        info.update(
            bridge=bridge_name(tag, peer_group),
            peer_veth=peer_veth_name(slot),
            # the replica's index where given (stable: its replacement gets the same address;
            # each group has a bridge of its own), else the slot's
            peer_address=net.peer_address(slot if peer_index is None else peer_index),
        )
    try:
        # the slot is ours now: a veth of that name is a leftover of a sandbox that is gone
        if Path(f"/sys/class/net/{veth}").exists():
            _run(["ip", "link", "del", veth], check=False)
        _ip_batch(
            f"netns add {ns}",
            f"link add {veth} type veth peer name eth0 netns {ns}",
            f"link set {veth} alias {_quoted(str(owner))}",
            f"link set {veth} up",
            f"route replace {addr}/32 dev {veth} src {net.gateway}",
        )
        _ip_batch(
            "link set lo up",
            "link set eth0 addrgenmode none",  # no IPv6 link-local address
            f"addr add {addr}/32 dev eth0",
            "link set eth0 up",
            f"route add {net.gateway}/32 dev eth0 src {addr}",
            *(f"route replace {ip}/32 via {net.gateway} dev eth0" for ip, _ in net.allow),
            netns=ns,
        )
        if peer_group is not None:
            _join_bridge(net, info, ns, owner)
        _run([*launcher(ns), "nft", "-f", "-"], stdin=ruleset(net, ingress_ports, peer_ports))
    except BaseException:
        teardown(info, owner)
        raise
    return info


def _join_bridge(net: SandboxNetwork, info: dict[str, str], ns: str, owner: Path) -> None:
    """The peer link: the group's bridge (made by its first member), a veth on it, eth1 inside.
    Under the machine-wide lock: the last member's teardown deletes the bridge under it too."""
    bridge, pveth = info["bridge"], info["peer_veth"]
    with _locked():
        if not Path(f"/sys/class/net/{bridge}").exists():
            _ip_batch(
                f"link add {bridge} type bridge",
                # bridged frames skip the host's iptables (br_netfilter, a Docker FORWARD drop)
                f"link set {bridge} type bridge nf_call_iptables 0 nf_call_ip6tables 0 "
                "nf_call_arptables 0",
                f"link set {bridge} alias {_quoted(str(owner.parent))}",
                f"link set {bridge} up",
            )
        if Path(f"/sys/class/net/{pveth}").exists():
            _run(["ip", "link", "del", pveth], check=False)  # a gone sandbox's leftover
        _ip_batch(
            f"link add {pveth} type veth peer name {PEER_LINK} netns {ns}",
            f"link set {pveth} alias {_quoted(str(owner))}",
            f"link set {pveth} master {bridge} up",
        )
    _ip_batch(
        f"link set {PEER_LINK} addrgenmode none",
        f"addr add {info['peer_address']}/{net.peer_prefix} dev {PEER_LINK}",
        f"link set {PEER_LINK} up",
        netns=ns,
    )
    # a gratuitous ARP once the link is up: a replica's replacement takes the address of the
    # one it replaces (a stable peer index), and its peers' neighbour entries (REACHABLE for
    # up to 45 s) must learn the new MAC at once instead of blackholing their connects. The
    # kernel's own (arp_notify) goes out before the veth has carrier and is lost: sent here,
    # twice, from inside the namespace.
    _run([*launcher(ns), sys.executable, "-c", GARP, PEER_LINK, info["peer_address"]])


# a gratuitous ARP request (sender = target = the address) out of argv[1], twice
GARP = """
import socket, struct, sys, time
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
s.bind((sys.argv[1], 0))
mac, ip = s.getsockname()[4], socket.inet_aton(sys.argv[2])
arp = struct.pack("!HHBBH", 1, 0x0800, 6, 4, 1) + mac + ip + bytes(6) + ip
for n in range(2):
    time.sleep(0.1 * n)
    s.send(b"\\xff" * 6 + mac + b"\\x08\\x06" + arp)
"""


def teardown(info: dict[str, str] | None, owner: Path) -> None:
    """Remove the sandbox's veth (only if it still names `owner`) and its namespace."""
    if not info:
        return
    veth, ns = info.get("veth", ""), info.get("netns", "")
    for link in (veth, info.get("peer_veth", "")):
        if link and _alias(link) == str(owner):
            _run(["ip", "link", "del", link], check=False)
            if Path(f"/sys/class/net/{link}").exists():
                raise SandboxNetError(f"cannot delete the sandbox's veth {link}")
    if ns and (NETNS_DIR / ns).exists():
        _run(["ip", "netns", "del", ns])
    bridge = info.get("bridge", "")
    if bridge:
        with _locked():
            brif = Path(f"/sys/class/net/{bridge}/brif")
            if brif.is_dir() and not any(brif.iterdir()):  # its last member is gone
                _run(["ip", "link", "del", bridge], check=False)


def _alias(link: str) -> str | None:
    try:
        return Path(f"/sys/class/net/{link}/ifalias").read_text().strip()
    except OSError:
        return None


def leaks(root: Path, tag: str) -> list[str]:
    """Namespaces and host veths that sandboxes under `root` left behind."""
    found: list[str] = []
    with contextlib.suppress(FileNotFoundError):
        for name in sorted(os.listdir(NETNS_DIR)):
            if name.startswith(f"{NETNS_PREFIX}{tag}-"):
                found.append(f"network namespace {name} remains")
    with contextlib.suppress(FileNotFoundError):
        for link in sorted(os.listdir("/sys/class/net")):
            alias = _alias(link)
            if (
                link.startswith((VETH_PREFIX, PEER_VETH_PREFIX))
                and alias
                and alias.startswith(f"{root}/")
            ):
                found.append(f"veth {link} of {alias} remains")
            elif link.startswith(BRIDGE_PREFIX) and alias == str(root):
                found.append(f"bridge {link} of {alias} remains")
    return found
