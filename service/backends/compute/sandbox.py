"""Sandbox compute backend: each "VM" is an isolated OpenSSH server here (see interfaces.py).

Layout of one sandbox, `<root>/<id>/` (root = `settings.sandbox_dir`, 0700 like the data dir
above it; `<id>/` is 0711 in root mode, 0700 otherwise; every file 0600 unless said):

    server.json             the record root (the platform) reads: name, tags, address, port, user,
                            flavor, host key, pids (+ their start times), cgroups, home size,
                            state BUILD|ACTIVE
    slot                    the slot index this sandbox holds (address 127.77.x.y and user)
    sshd_config             ListenAddress, HostKey, AuthorizedKeysFile, AllowUsers, ...
    ssh_host_ed25519_key    a fresh host key per sandbox; clients pin its public line
    authorized_keys         ServerSpec.public_key (0644: sshd reads it as the sandbox user)
    console.log             sshd's stderr (`sshd -D -e`), the sandbox's "serial console"
    home.img                root mode: the login user's $HOME, a sparse ext4 image of the
                            flavor's disk_gb (else `default_disk_mb`): its disk quota
    home/                   rootless/none: unused (the current user's own $HOME is the home)

Slots. Slot N >= 1 is the loopback address 127.77.((N-1) // 254).((N-1) % 254 + 1) (host
network; isolated: <cidr>+1+N, see Network) and, as root, the dedicated user `stackml-sbN`
(created on demand, with a usable password-less entry).
Both are machine-wide, so as root the slot registry is too: a file per taken slot in
/run/stackml/slots/ (content "<root>/<id>"), allocated lowest-first under an flock on
/run/stackml/slots.lock (so few users ever get created); a slot whose owner dir is gone is
reclaimed. Without root the registry is `<root>/.slots/`.

Isolation (`isolation=`):
- `root` (auto as root): sshd listens on port 22 (a free port >= 1024 when something holds a
  wildcard :22) and runs as `unshare --pid --mount --mount-proc --uts --ipc --fork --kill-child
  sh -c <init>`; the init joins the sandbox's cgroups (memory = ram_mb, pids, cpu = vcpus as a
  CFS quota: cgroup v1 controllers plus the v2 `unified` mount for cgroup.kill, or one pure-v2
  cgroup; `cgroup_root=` says where the hierarchies are), bind-mounts `<id>/` read-only at
  /run/stackml/sandbox (sshd_config points there: the host path is unreachable for the login
  user), loop-mounts home.img (nosuid, nodev) on the slot users' passwd home /run/stackml/home,
  mounts private tmpfs (half the flavor's RAM each) on /tmp, /var/tmp, /dev/shm and /run/lock,
  sets the hostname to the server name and execs sshd under `setpriv --no-new-privs` (no
  setuid or file-capability elevation for anything in the sandbox). Every mount is private to
  the mount namespace and goes with it: nothing a job writes outlives the sandbox, and the
  image's loop device detaches itself (delete waits for that). sshd is PID 1 of its namespace:
  killing it kills every process the job started, detached ones included; the sandbox sees only
  its own processes. Logins get STACKML_SERVER_ID and STACKML_FLAVOR in their environment.
  `freeze()` freezes/thaws it through its cgroup v2 group (pure v2 or the unified one).
- `rootless` (auto otherwise): `unshare --user --map-current-user --pid --mount --mount-proc
  --fork --kill-child sshd` as the current user (whose own $HOME is the home), on a free port
  >= 1024, without cgroups.
- `none`: a plain sshd in its own session, no namespaces, no limits (debugging only: processes
  that detach with setsid survive a delete).

Network (`network=`, root isolation only; the registry passes the `sandbox_network*` settings,
a SandboxBackend made without it keeps the host's network): None = the host's network, loopback
included (rootless, none, the devcloud emulator, tests' own backends; server.json says
`"network_isolated": false`). A `SandboxNetwork` gives each sandbox its own network namespace
(sandbox_net.py): the launcher is `nsenter --net=/run/netns/stackml-<tag>-<id> unshare ...`,
sshd listens on the sandbox's address <cidr>+1+slot port 22 (reached over a veth `smv<slot>`),
and an nft table inside lets the job reach only the store gateway and the allow list. Delete
removes the veth and the namespace after the processes; `leak_report` lists leftovers.

Two options exist for the Nova emulator (devcloud/emulator), whose sandboxes must look like
servers booted from a stackml image; both need `root` isolation:
- `login_user="stackml"`: every sandbox logs in as that one user (created once, shared) instead
  of its slot user; its passwd home is where the sandbox's home image is mounted. Sandboxes of
  one login user share a uid, so they are isolated by their namespaces and cgroups only (and
  can signal each other's processes): fine for an emulator, not for tenants.
- `mounts=f(spec) -> [(host dir, path inside)]`: directories bind-mounted read-only in the
  sandbox's mount namespace (e.g. a built runtime at /opt/stackml/runtimes/<key>). The mount
  points are created (empty, 0755) on the host, since a mount namespace shares the filesystem;
  they may not lie in a private tmp dir.

Any process of the platform's user can get/list/delete any sandbox from the records;
`leak_report(root)` lists what a deleted sandbox could have left behind (processes, cgroups,
dirs and their home images, attached loop devices, mounts on the host, slots, network
namespaces and veths).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import pwd
import re
import secrets
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from service.backends.compute import sandbox_net
from service.backends.compute.sandbox_net import SandboxNetwork
from service.backends.interfaces import (
    Capabilities,
    ComputeBackend,
    Flavor,
    HostKeySource,
    ServerRef,
    ServerSpec,
    ServerState,
    ServerStatus,
)
from service.domain.errors import AllocationFailed, BackendError, DeadlineExceeded, ServerNotFound

log = logging.getLogger("stackml.sandbox")

SSHD = "/usr/sbin/sshd"
UNSHARE = "/usr/bin/unshare"
CGROUP_ROOT = Path("/sys/fs/cgroup")
RUN_DIR = Path("/run/stackml")  # machine-wide state of root-mode sandboxes (tmpfs)
SLOT_HOME = RUN_DIR / "home"  # passwd home of every slot user; bind-mounted per sandbox
USER_PREFIX = "stackml-sb"
USERADD_LOCK = Path("/run/lock/stackml-useradd.lock")
MAX_SLOTS = 254 * 256
ID_RE = re.compile(r"sb-[0-9a-f]{8}")
PUBKEY_RE = re.compile(r"(ssh-|ecdsa-|sk-)[A-Za-z0-9@.-]+ [A-Za-z0-9+/=]+( [^\x00-\x1f\x7f]*)?")
CFS_PERIOD_US = 100_000
BOOT_TIMEOUT = 15.0
KILL_TIMEOUT = 10.0
TRASH_TIMEOUT = 5.0  # seconds a delete retries removing what it moved aside
BUILD_GRACE = 60.0  # a BUILD record older than boot timeout + this has lost its creator
ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"}

SETPRIV = "/usr/bin/setpriv"
MKFS_EXT4 = "/usr/sbin/mkfs.ext4"
SANDBOX_MNT = RUN_DIR / "sandbox"  # where the sandbox's own dir shows inside its namespace
HOME_IMAGE = "home.img"  # the disk-quota'd home: a sparse ext4 image, loop-mounted inside
DEFAULT_HOME_MB = 10240  # home size for flavors without disk_gb
PRIVATE_TMP = ("/tmp", "/var/tmp", "/dev/shm", "/run/lock")  # world-writable host dirs
TMPFS_SOURCE = "stackml-sandbox"  # the source name of every private tmpfs (leak_report)

# PID 1 of the sandbox namespace (all mounts private to it, gone with it): join the cgroups,
# show its own dir at SANDBOX_MNT (sshd's config, host key, authorized_keys: the data dir
# above it is 0700), bind the read-only extra mounts, loop-mount the home image on the login
# user's home, put private tmpfs on the world-writable dirs (last: sources may live below
# them), exec sshd with no_new_privs (setuid binaries do not elevate, for every descendant).
# Arguments: dir image homedir host tmp_mb N (src dst)*N cgroup.procs...
_NS_INIT = """set -e
umask 022
d=$1 img=$2 homedir=$3 host=$4 tmpmb=$5 n=$6; shift 6
while [ "$n" -gt 0 ]; do mount --bind -o ro "$1" "$2"; shift 2; n=$((n - 1)); done
for f in "$@"; do echo 0 >"$f"; done
mount --bind -o ro "$d" {sandbox_mnt}
mount -o loop,nosuid,nodev "$img" "$homedir"
rmdir "$homedir/lost+found" 2>/dev/null || true
chmod 700 "$homedir"  # mkfs made it the login user's
for t in {private_tmp}; do
  mount -t tmpfs -o "size=${{tmpmb}}m,mode=1777,nosuid,nodev" {tmpfs_source} "$t"
done
echo "$host" >/proc/sys/kernel/hostname
exec {setpriv} --no-new-privs {sshd} -D -e -f {sandbox_mnt}/sshd_config
"""
LOGIN_USER_RE = re.compile(r"[a-z_][a-z0-9_-]{0,31}")
Mounts = Callable[[ServerSpec], Sequence[tuple[str | Path, str]]]


class SandboxError(BackendError):
    """The sandbox machinery itself failed (cgroups, users, files)."""

    reason = "sandbox_error"


class SandboxBootFailed(AllocationFailed):
    """sshd did not come up; the message carries the tail of its console log."""


class _AddressInUse(Exception):
    """sshd lost a bind race for its slot address: take another slot."""


# --------------------------------------------------------------------------- small helpers


def _write(path: Path, data: str, mode: int = 0o600) -> None:
    """Write a file atomically (tmp + rename), so concurrent readers never see half of it."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.write(fd, data.encode())
    finally:
        os.close(fd)
    os.chmod(tmp, mode)
    os.replace(tmp, path)


def _cg_write(path: Path, value: str) -> None:
    try:
        with open(path, "w") as fh:
            fh.write(value)
    except OSError as e:
        raise SandboxError(f"cannot write {value!r} to {path}: {e.strerror}") from e


@contextlib.contextmanager
def _flock(path: Path) -> Iterator[None]:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def _proc_stat(pid: int) -> tuple[str, int] | None:
    """(state letter, start time in clock ticks) of a process, None when it does not exist."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            data = fh.read()
    except OSError:
        return None
    fields = data.rsplit(")", 1)[1].split()
    return fields[0], int(fields[19])


def _alive(pid: int | None, start: int | None) -> bool:
    """True while the process `pid` started at `start` runs (not a zombie, not a reused pid)."""
    if not pid:
        return False
    st = _proc_stat(pid)
    return st is not None and st[0] not in ("Z", "X") and (start is None or st[1] == start)


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as fh:
            return [int(p) for p in fh.read().split()]
    except OSError:
        return []


def _root_tag(root: Path) -> str:
    return hashlib.sha256(str(root).encode()).hexdigest()[:8]


def _slot_address(slot: int) -> str:
    return f"127.77.{(slot - 1) // 254}.{(slot - 1) % 254 + 1}"


def _hostname(name: str) -> str:
    host = re.sub(r"[^a-z0-9-]+", "-", name.lower()).strip("-")[:63].strip("-")
    return host or "sandbox"


def _tail(path: Path, nbytes: int) -> str:
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - nbytes))
            return fh.read().decode(errors="replace")
    except OSError:
        return ""


def _host_keypair() -> tuple[bytes, str]:
    """A fresh ed25519 host key: (OpenSSH-format private key, "ssh-ed25519 AAAA..." line)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    key = Ed25519PrivateKey.generate()
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    return private, public.decode()


def _port_free(address: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as sshd does
        try:
            s.bind((address, port))
        except OSError:
            return False
        return True


def _wildcard_listener(port: int) -> bool:
    """Whether something listens on *:port (e.g. the host's own sshd on 0.0.0.0:22): then no
    127.77.x.y can bind that port and sandboxes fall back to free high ports."""
    wanted = f":{port:04X}"
    for table, wildcard in (("/proc/net/tcp", "00000000"), ("/proc/net/tcp6", "0" * 32)):
        try:
            with open(table) as fh:
                next(fh, None)
                for line in fh:
                    fields = line.split()
                    if fields[3] == "0A" and fields[1] == wildcard + wanted:
                        return True
        except OSError:
            continue
    return False


def _free_port(address: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((address, 0))
        port: int = s.getsockname()[1]
        return port


# --------------------------------------------------------------------------- cgroups


def _cgroup_bases(cgroup_root: Path | None = None) -> dict[str, Path]:
    """Where stackml's cgroups live under `cgroup_root` (default CGROUP_ROOT): {"v2": ...} on a
    pure v2 tree (Debian 12's default), else one base per v1 controller (memory, pids, cpu)
    plus "unified" when a v2 hierarchy is mounted beside them (a mixed/hybrid host)."""
    cg_root = CGROUP_ROOT if cgroup_root is None else cgroup_root
    if (cg_root / "cgroup.controllers").exists():
        return {"v2": cg_root / "stackml"}
    bases: dict[str, Path] = {}
    for ctrl in ("memory", "pids", "cpu"):
        if (cg_root / ctrl / "cgroup.procs").exists():
            bases[ctrl] = cg_root / ctrl / "stackml"
    if (cg_root / "unified" / "cgroup.controllers").exists():
        bases["unified"] = cg_root / "unified" / "stackml"
    return bases


def v2_cgroup(dirs: Sequence[str]) -> Path | None:
    """The cgroup v2 group among a sandbox's cgroups (the pure v2 one, or the `unified` one on
    a mixed host): the one with cgroup.freeze and cgroup.kill. None without a v2 hierarchy."""
    for d in dirs:
        if (Path(d) / "cgroup.freeze").exists():
            return Path(d)
    return None


LIMIT_CONTROLLERS = ("memory", "pids", "cpu")
_v2_ready_lock = threading.Lock()
_v2_ready: dict[Path, frozenset[str]] = {}


def _enable_v2_controllers(base: Path) -> frozenset[str]:
    """Delegate memory/pids/cpu to the children of `base` (once per process); returns those
    that could be. A container whose cgroup root holds processes cannot delegate: sandboxes
    then still get a cgroup (for cgroup.kill), without those limits, and a warning says so."""
    with _v2_ready_lock:
        if base in _v2_ready:
            return _v2_ready[base]
        base.mkdir(exist_ok=True)
        usable = set(LIMIT_CONTROLLERS)
        for cg in (base.parent, base):
            available = (cg / "cgroup.controllers").read_text().split()
            delegated = (cg / "cgroup.subtree_control").read_text().split()
            for ctrl in LIMIT_CONTROLLERS:
                if ctrl in delegated or ctrl not in usable:
                    continue
                try:
                    if ctrl not in available:
                        raise OSError(errno.ENOENT, "not available")
                    (cg / "cgroup.subtree_control").write_text(f"+{ctrl}")
                except OSError as e:
                    usable.discard(ctrl)
                    log.warning(
                        "cgroup v2 controller %s cannot be enabled in %s (%s): "
                        "sandboxes run without that limit",
                        ctrl,
                        cg,
                        e.strerror,
                    )
        _v2_ready[base] = frozenset(usable)
        return _v2_ready[base]


def _make_cgroups(name: str, flavor: Flavor, cgroup_root: Path | None = None) -> list[str]:
    """Create the sandbox's cgroups with the flavor's limits; returns their directories."""
    made: list[str] = []
    memory = flavor.ram_mb * 1024 * 1024
    try:
        for role, base in _cgroup_bases(cgroup_root).items():
            controllers = _enable_v2_controllers(base) if role == "v2" else frozenset()
            base.mkdir(exist_ok=True)
            cg = base / name
            cg.mkdir()
            made.append(str(cg))
            if role == "v2":
                if "memory" in controllers:
                    _cg_write(cg / "memory.max", str(memory))
                    if (cg / "memory.swap.max").exists():  # no escape into swap
                        _cg_write(cg / "memory.swap.max", "0")
                if "pids" in controllers:
                    _cg_write(cg / "pids.max", str(flavor.pids))
                if "cpu" in controllers:
                    _cg_write(cg / "cpu.max", f"{flavor.vcpus * CFS_PERIOD_US} {CFS_PERIOD_US}")
            elif role == "memory":
                _cg_write(cg / "memory.limit_in_bytes", str(memory))
                if (cg / "memory.memsw.limit_in_bytes").exists():  # no escape into swap
                    _cg_write(cg / "memory.memsw.limit_in_bytes", str(memory))
            elif role == "pids":
                _cg_write(cg / "pids.max", str(flavor.pids))
            elif role == "cpu":
                _cg_write(cg / "cpu.cfs_period_us", str(CFS_PERIOD_US))
                _cg_write(cg / "cpu.cfs_quota_us", str(flavor.vcpus * CFS_PERIOD_US))
    except OSError as e:
        _remove_cgroups(made, time.monotonic() + KILL_TIMEOUT)
        raise SandboxError(f"cannot create the sandbox cgroups: {e}") from e
    except SandboxError:
        _remove_cgroups(made, time.monotonic() + KILL_TIMEOUT)
        raise
    return made


def _cgroup_pids(cg: Path) -> list[int]:
    try:
        return [int(p) for p in (cg / "cgroup.procs").read_text().split()]
    except FileNotFoundError:
        return []


def _remove_cgroups(dirs: list[str], deadline: float) -> None:
    """Kill everything in the cgroups (cgroup.kill where there is one), then remove them."""
    paths = [Path(d) for d in dirs if Path(d).is_dir()]
    for cg in paths:
        if (cg / "cgroup.kill").exists():
            with contextlib.suppress(OSError):
                (cg / "cgroup.kill").write_text("1")
    pause = 0.001
    while paths:
        left: list[Path] = []
        for cg in paths:
            pids = _cgroup_pids(cg)
            for pid in pids:  # v1 has no cgroup.kill: kill until empty (forks race with us)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            if pids:
                left.append(cg)
                continue
            try:
                cg.rmdir()
            except FileNotFoundError:
                pass
            except OSError as e:
                if e.errno != errno.EBUSY:
                    raise SandboxError(f"cannot remove cgroup {cg}: {e.strerror}") from e
                left.append(cg)  # exiting tasks still pin it for a moment
        paths = left
        if paths:
            if time.monotonic() > deadline:
                raise DeadlineExceeded(
                    f"cgroups still busy after {KILL_TIMEOUT:.0f}s: "
                    + ", ".join(f"{cg} ({_cgroup_pids(cg)})" for cg in paths)
                )
            time.sleep(pause)
            pause = min(pause * 2, 0.05)


# --------------------------------------------------------------------------- users


_users_ok: set[str] = set()
_users_lock = threading.Lock()


def _shadow_locked(user: str) -> bool:
    try:
        with open("/etc/shadow") as fh:
            for line in fh:
                fields = line.split(":")
                if fields[0] == user:
                    return fields[1].startswith("!")
    except OSError:
        return False
    return False


def _useradd(name: str) -> None:
    cmd = [
        "useradd", "--system", "--no-create-home", "--home-dir", str(SLOT_HOME),
        "--shell", "/bin/bash", "--password", "*", "--user-group",
        "--comment", "stackml sandbox", name,
    ]  # fmt: skip
    for attempt in range(20):
        r = subprocess.run(cmd, capture_output=True, text=True, env=ENV, check=False)
        if r.returncode in (0, 9):  # 9: made meanwhile by another user of /etc/passwd
            return
        if r.returncode != 10 or attempt == 19:  # 10: /etc/passwd busy, retry
            raise SandboxError(f"useradd {name} failed: {r.stderr.strip()}")
        time.sleep(0.05)


def _ensure_user(name: str) -> pwd.struct_passwd:
    """The slot user, created once machine-wide (flock + useradd's own lock), never locked:
    useradd leaves a new account locked ("!") and sshd refuses locked accounts, so give it "*"."""
    with _users_lock:
        if name in _users_ok:
            return pwd.getpwnam(name)
        USERADD_LOCK.parent.mkdir(parents=True, exist_ok=True)
        with _flock(USERADD_LOCK):
            try:
                pwd.getpwnam(name)
            except KeyError:
                _useradd(name)
            if _shadow_locked(name):
                r = subprocess.run(
                    ["usermod", "--password", "*", name], capture_output=True, text=True,
                    env=ENV, check=False,
                )  # fmt: skip
                if r.returncode != 0:
                    raise SandboxError(f"usermod {name} failed: {r.stderr.strip()}")
        _users_ok.add(name)
        return pwd.getpwnam(name)


# --------------------------------------------------------------------------- filesystem


def _mount_point(path: Path) -> None:
    """A root-owned 0755 dir the login user can traverse (whatever the umask): mount points
    live on the host's filesystem, which every mount namespace shares."""
    path.mkdir(mode=0o755, parents=True, exist_ok=True)
    if path.stat().st_mode & 0o755 != 0o755:
        os.chmod(path, path.stat().st_mode | 0o755)


def _prepare_root_mode(root: Path) -> None:
    """The sandbox root is private (0700: nothing there is for the login users; their
    sandbox's own dir is bound at SANDBOX_MNT inside); the machine-wide mount points exist."""
    if root.stat().st_mode & 0o077:
        os.chmod(root, 0o700)
    for p in (RUN_DIR, SLOT_HOME, SANDBOX_MNT, Path("/run/sshd")):  # sshd: /run/sshd (privsep)
        _mount_point(p)


def _tmp_mb(flavor: Flavor) -> int:
    """Size of each private tmpfs (/tmp, /var/tmp, /dev/shm, /run/lock): half the flavor's RAM,
    like Linux's /dev/shm default; its pages count against the sandbox's memory limit anyway."""
    return max(16, flavor.ram_mb // 2)


def _make_home_image(path: Path, size_mb: int, user: pwd.struct_passwd) -> None:
    """A sparse ext4 image of `size_mb` MiB whose root dir belongs to `user`: the sandbox's home,
    loop-mounted in its namespace. Writing past it is ENOSPC inside, not a full host disk.
    No journal (the home dies with the sandbox), no reserved blocks, no discard at mkfs."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.ftruncate(fd, size_mb * 1024 * 1024)
    finally:
        os.close(fd)
    cmd = [
        MKFS_EXT4, "-q", "-F", "-m", "0", "-O", "^has_journal",
        "-E", f"root_owner={user.pw_uid}:{user.pw_gid},lazy_itable_init=1,nodiscard",
        "-L", "stackml-home", str(path),
    ]  # fmt: skip
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=60, check=False)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise SandboxError(f"cannot make the home image {path}: {e}") from e
    if r.returncode != 0:
        raise SandboxError(f"mkfs.ext4 {path} failed: {(r.stderr or r.stdout).strip()[-500:]}")


def _loop_backing_files(prefix: str) -> list[str]:
    """Loop devices whose backing file lies under `prefix`: "loopN: <file>" (a file removed
    while attached reads "<file> (deleted)")."""
    found = []
    with contextlib.suppress(FileNotFoundError):
        for dev in sorted(os.listdir("/sys/block")):
            if not dev.startswith("loop"):
                continue
            try:
                backing = Path(f"/sys/block/{dev}/loop/backing_file").read_text().strip()
            except OSError:
                continue  # not attached
            if backing.startswith(prefix):
                found.append(f"{dev}: {backing}")
    return found


def _wait_loop_detached(d: Path, deadline: float) -> None:
    """The home image's loop device detaches itself (autoclear) once the namespace holding its
    mount is gone, i.e. once every process of the sandbox exited: wait for that."""
    pause = 0.001
    while loops := _loop_backing_files(f"{d}/"):
        if time.monotonic() > deadline:
            raise DeadlineExceeded(f"sandbox {d.name}: home image still attached: {loops}")
        time.sleep(pause)
        pause = min(pause * 2, 0.05)


def _host_mounts(root: Path) -> list[str]:
    """Mounts in this (the host's) mount namespace that a sandbox made: private tmpfs, or
    anything mounted below `root`. Sandbox mounts live in their own namespaces: none belong here."""
    found = []
    with contextlib.suppress(OSError), open("/proc/self/mountinfo") as fh:
        for line in fh:
            pre, _, post = line.partition(" - ")
            point = pre.split()[4].replace("\\040", " ")
            source = post.split()[1] if len(post.split()) > 1 else ""
            if source == TMPFS_SOURCE or point.startswith(f"{root}/"):
                found.append(f"mount {point} ({source}) remains on the host")
    return found


# --------------------------------------------------------------------------- slots
# --------------------------------------------------------------------------- slots


class _Slots:
    """Slot registry: a file per taken slot in `dir`, allocated under an flock on `lock`."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.lock = directory.with_name(directory.name + ".lock")

    def allocate(self, owner: Path, probe_port: int | None) -> int:
        self.dir.mkdir(parents=True, exist_ok=True)
        with _flock(self.lock):
            taken = {int(n) for n in os.listdir(self.dir) if n.isdigit()}
            for slot in range(1, MAX_SLOTS + 1):
                if slot in taken:
                    try:
                        holder = (self.dir / str(slot)).read_text().strip()
                    except FileNotFoundError:
                        holder = ""
                    if holder and Path(holder).is_dir():
                        continue
                    with contextlib.suppress(FileNotFoundError):
                        (self.dir / str(slot)).unlink()  # its sandbox dir is gone: reclaim
                if probe_port is not None and not _port_free(_slot_address(slot), probe_port):
                    continue  # held by something that is not ours (or a sandbox being torn down)
                fd = os.open(self.dir / str(slot), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
                with os.fdopen(fd, "w") as fh:
                    fh.write(f"{owner}\n")
                return slot
        raise AllocationFailed(f"no free sandbox slot among {MAX_SLOTS}")

    def release(self, slot: int, owner: Path) -> None:
        with _flock(self.lock):
            path = self.dir / str(slot)
            try:
                holder = path.read_text().strip()
            except FileNotFoundError:
                return
            if holder == str(owner):
                path.unlink()

    def owned_under(self, root: Path) -> list[str]:
        try:
            names = os.listdir(self.dir)
        except FileNotFoundError:
            return []
        found = []
        for n in names:
            with contextlib.suppress(OSError):
                holder = (self.dir / n).read_text().strip()
                if holder.startswith(f"{root}/"):
                    found.append(f"slot {n} held by {holder}")
        return found


# --------------------------------------------------------------------------- the backend


class SandboxBackend(ComputeBackend):
    """Local OpenSSH sandboxes; see the module docstring for the layout and interfaces.py."""

    name = "sandbox"
    # the host key is in the server's record at ACTIVE; runtimes are the worker's own builds
    capabilities = Capabilities(HostKeySource.RECORD, runtimes_dir=None, stable_peer_addresses=True)

    def __init__(
        self,
        root: Path | str,
        flavors: list[Flavor],
        isolation: str = "auto",
        *,
        boot_timeout: float = BOOT_TIMEOUT,
        login_user: str | None = None,
        mounts: Mounts | None = None,
        network: SandboxNetwork | None = None,
        cgroup_root: Path | str | None = None,
        default_disk_mb: int = DEFAULT_HOME_MB,
    ) -> None:
        self.root = Path(os.path.realpath(root))
        self._flavors = list(flavors)
        is_root = os.geteuid() == 0
        if isolation == "auto":
            isolation = "root" if is_root else "rootless"
        if isolation not in ("root", "rootless", "none"):
            raise ValueError(f"unknown sandbox isolation {isolation!r}")
        if isolation == "root" and not is_root:
            raise SandboxError("sandbox isolation 'root' needs root; use 'rootless' or 'auto'")
        if (login_user or mounts) and isolation != "root":
            raise SandboxError("login_user and mounts need sandbox isolation 'root'")
        if network is not None:
            if isolation != "root":
                raise SandboxError("sandbox network isolation needs sandbox isolation 'root'")
            sandbox_net.require_tools()
        if login_user is not None and not LOGIN_USER_RE.fullmatch(login_user):
            raise ValueError(f"invalid login user name {login_user!r}")
        self.isolation = isolation
        self.boot_timeout = boot_timeout
        self.login_user = login_user
        self._mounts = mounts
        self.network = network  # None: the host's network (loopback included)
        # where the cgroup hierarchies are mounted (tests point it at a pure v2 tree)
        self.cgroup_root = Path(cgroup_root) if cgroup_root is not None else None
        if default_disk_mb < 16:
            raise ValueError("default_disk_mb must be at least 16")
        self.default_disk_mb = default_disk_mb  # the home quota of flavors without disk_gb
        self._tag = _root_tag(self.root)
        self._slots = _Slots(RUN_DIR / "slots" if is_root else self.root / ".slots")
        self._procs: dict[str, subprocess.Popen[bytes]] = {}
        self._procs_lock = threading.Lock()

    # ---- ComputeBackend

    def flavors(self) -> list[Flavor]:
        return list(self._flavors)

    @property
    def peer_network(self) -> str | None:
        if self.network is None:
            return (
                "distributed jobs need isolated sandboxes (sandbox_network isolated or auto, "
                "running as root): on the host's network their replicas' ports would collide"
            )
        return None

    def create_server(self, spec: ServerSpec) -> ServerRef:
        """Boots synchronously: returns once sshd listens (state ACTIVE)."""
        key = spec.public_key.strip()
        if spec.peer_group is not None and self.peer_network is not None:
            raise AllocationFailed(self.peer_network)
        if not PUBKEY_RE.fullmatch(key):
            raise AllocationFailed("the server's public key must be one OpenSSH public key line")
        if spec.flavor.vcpus < 1 or spec.flavor.ram_mb < 1 or spec.flavor.pids < 1:
            raise AllocationFailed(f"flavor {spec.flavor.name!r} has no usable limits")
        self._reap()
        self._prepare_root()
        for _attempt in range(5):
            try:
                return self._create_once(spec, key)
            except _AddressInUse:
                continue  # another process won the address between probe and bind
        raise AllocationFailed("could not bind a sandbox address after 5 attempts")

    def get_server(self, server_id: str) -> ServerStatus:
        self._reap()
        rec = self._record(server_id)
        if rec is None:
            self._clear_trash(server_id)  # a delete killed mid-removal left its remains aside
            return ServerStatus(id=server_id, state=ServerState.DELETED)
        common: dict[str, Any] = {
            "host": rec["address"],
            "port": rec["port"],
            "username": rec["user"],
            "host_key": rec["host_key"],
            "created_at": rec.get("created_at"),
            "peer_host": (rec.get("network") or {}).get("peer_address"),
        }
        if rec.get("sshd_pid") is None:
            age = time.time() - rec["created_at"]
            if age > rec.get("boot_timeout", BOOT_TIMEOUT) + BUILD_GRACE:
                return ServerStatus(
                    id=server_id, state=ServerState.ERROR, fault="boot never completed", **common
                )
            return ServerStatus(id=server_id, state=ServerState.BUILD, **common)
        if _alive(rec["sshd_pid"], rec["sshd_start"]):
            return ServerStatus(id=server_id, state=ServerState.ACTIVE, **common)
        tail = _tail(self.root / server_id / "console.log", 512).strip().splitlines()[-3:]
        fault = "sshd is not running" + (": " + " | ".join(tail) if tail else "")
        return ServerStatus(id=server_id, state=ServerState.ERROR, fault=fault, **common)

    def delete_server(self, server_id: str) -> None:
        if not ID_RE.fullmatch(server_id):
            return
        deadline = time.monotonic() + KILL_TIMEOUT
        d = self.root / server_id
        rec = self._record(server_id)
        if rec is not None:
            self._kill(server_id, rec, deadline)
            self._net_down(server_id, d, rec)
            with contextlib.suppress(OSError, ValueError):
                self._slots.release(int((d / "slot").read_text()), d)
        elif d.is_dir():  # a create that died before writing its record
            _remove_cgroups(self._cgroup_dirs(server_id), deadline)
            self._net_down(server_id, d, None)
            with contextlib.suppress(OSError, ValueError):
                self._slots.release(int((d / "slot").read_text()), d)
        _wait_loop_detached(d, deadline)
        self._remove_dir(server_id)

    def _net_down(self, sid: str, d: Path, rec: dict[str, Any] | None) -> None:
        """Remove the sandbox's namespace and veth (after its processes are gone)."""
        info = (rec or {}).get("network")
        if info is None:
            try:
                info = self._net_info(sid, int((d / "slot").read_text()))
            except (OSError, ValueError):
                info = {"netns": sandbox_net.netns_name(self._tag, sid)}
        sandbox_net.teardown(info, d)

    def list_servers(self, tag: tuple[str, str] | None = None) -> list[ServerRef]:
        self._reap()
        self._sweep_trash()
        refs = []
        for sid in self._ids():
            rec = self._record(sid)
            if rec is None:
                continue
            tags = tuple((k, v) for k, v in rec["tags"])
            if tag is None or tag in tags:
                refs.append(ServerRef(id=sid, name=rec["name"], tags=tags))
        return refs

    def freeze(self, server_id: str, frozen: bool = True, timeout: float = KILL_TIMEOUT) -> None:
        """Freeze (or thaw) every process of a sandbox through its cgroup v2 group's
        cgroup.freeze, on a pure v2 host and on a mixed one alike; returns once the kernel
        reports it done (cgroup.events "frozen")."""
        rec = self._record(server_id)
        if rec is None:
            raise ServerNotFound(f"sandbox {server_id} does not exist")
        cg = v2_cgroup(rec.get("cgroups") or [])
        if cg is None:
            raise SandboxError(f"sandbox {server_id} has no cgroup v2 group to freeze")
        _cg_write(cg / "cgroup.freeze", "1" if frozen else "0")
        want = f"frozen {int(frozen)}"
        deadline = time.monotonic() + timeout
        pause = 0.001
        while want not in (cg / "cgroup.events").read_text().splitlines():
            if time.monotonic() > deadline:
                raise DeadlineExceeded(f"sandbox {server_id}: {cg} not {want} after {timeout}s")
            time.sleep(pause)
            pause = min(pause * 2, 0.05)

    def console_log(self, server_id: str, tail_bytes: int = 8192) -> str:
        if not ID_RE.fullmatch(server_id) or not (self.root / server_id).is_dir():
            raise ServerNotFound(f"sandbox {server_id} does not exist")
        return _tail(self.root / server_id / "console.log", tail_bytes)

    # ---- creation

    def _prepare_root(self) -> None:
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        if self.isolation == "root":
            _prepare_root_mode(self.root)

    def _home_mb(self, flavor: Flavor) -> int:
        """The home's disk quota: the flavor's disk_gb, else the backend's default."""
        return flavor.disk_gb * 1024 if flavor.disk_gb > 0 else self.default_disk_mb

    def _new_dir(self) -> tuple[str, Path]:
        while True:
            sid = f"sb-{secrets.token_hex(4)}"
            d = self.root / sid
            try:
                d.mkdir(mode=0o700)
            except FileExistsError:
                continue
            # root mode: sshd reads authorized_keys as the login user, through SANDBOX_MNT
            os.chmod(d, 0o711 if self.isolation == "root" else 0o700)
            return sid, d

    def _create_once(self, spec: ServerSpec, public_key: str) -> ServerRef:
        started = time.monotonic()
        sid, d = self._new_dir()
        cgroups: list[str] = []
        proc: subprocess.Popen[bytes] | None = None
        slot: int | None = None
        try:
            is_root_mode = self.isolation == "root"
            port: int | None = None
            if self.network is not None:
                port = sandbox_net.SSH_PORT  # its own namespace: port 22 is always free
            elif os.geteuid() == 0 and self.isolation != "rootless" and not _wildcard_listener(22):
                port = 22
            slot = self._slots.allocate(d, None if self.network else port)
            (d / "slot").write_text(str(slot))
            address = self.network.address(slot) if self.network else _slot_address(slot)
            if port is None:
                port = _free_port(address)

            if is_root_mode:
                user = _ensure_user(self.login_user or f"{USER_PREFIX}{slot}")
                _mount_point(Path(user.pw_dir))
                home = d / HOME_IMAGE
                _make_home_image(home, self._home_mb(spec.flavor), user)
            else:
                home = d / "home"
                home.mkdir(mode=0o700)
                user = pwd.getpwuid(os.geteuid())
            mounts = self._resolve_mounts(spec)

            private, host_key = _host_keypair()
            fd = os.open(d / "ssh_host_ed25519_key", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as fh:
                fh.write(private)
            (d / "authorized_keys").write_text(public_key + "\n")
            os.chmod(d / "authorized_keys", 0o644)
            _write(d / "sshd_config", self._sshd_config(d, sid, spec, address, port, user))

            if is_root_mode:
                cgroups = _make_cgroups(f"{self._tag}-{sid}", spec.flavor, self.cgroup_root)

            rec: dict[str, Any] = {
                "id": sid,
                "name": spec.name,
                "tags": [list(t) for t in spec.tags],
                "image": spec.image,
                "flavor": asdict(spec.flavor),
                "isolation": self.isolation,
                "address": address,
                "port": port,
                "user": user.pw_name,
                "home": str(home) if is_root_mode else user.pw_dir,
                "home_mb": self._home_mb(spec.flavor) if is_root_mode else None,
                "tmp_mb": _tmp_mb(spec.flavor) if is_root_mode else None,
                "cgroup_root": str(self.cgroup_root or CGROUP_ROOT),
                "host_key": host_key,
                "mounts": [list(m) for m in mounts],
                "network_isolated": self.network is not None,
                "network": None,
                "cgroups": cgroups,
                "created_at": time.time(),
                "boot_timeout": self.boot_timeout,
                "launcher_pid": None,
                "launcher_start": None,
                "sshd_pid": None,
                "sshd_start": None,
            }
            _write(d / "server.json", json.dumps(rec, indent=1))
            if self.network is not None:
                rec["network"] = self._net_info(sid, slot)  # first: a crash mid-setup is traceable
                _write(d / "server.json", json.dumps(rec, indent=1))
                rec["network"] = sandbox_net.setup(
                    self.network,
                    self._tag,
                    sid,
                    slot,
                    d,
                    ingress_ports=spec.ingress_ports,
                    peer_group=spec.peer_group,
                    peer_ports=spec.peer_ports,
                    peer_index=spec.peer_index,
                )
                _write(d / "server.json", json.dumps(rec, indent=1))

            proc = self._spawn(d, spec, cgroups, user.pw_dir, mounts, rec["network"])
            with self._procs_lock:
                self._procs[sid] = proc
            sshd_pid = self._wait_listening(d, proc, started)
            launcher = _proc_stat(proc.pid)
            sshd = _proc_stat(sshd_pid)
            rec.update(
                launcher_pid=proc.pid,
                launcher_start=launcher[1] if launcher else None,
                sshd_pid=sshd_pid,
                sshd_start=sshd[1] if sshd else None,
                boot_seconds=round(time.monotonic() - started, 4),
            )
            _write(d / "server.json", json.dumps(rec, indent=1))
            log.info("sandbox %s (%s) up on %s:%s as %s in %.0f ms", sid, spec.name, address,
                     port, user.pw_name, (time.monotonic() - started) * 1000)  # fmt: skip
            return ServerRef(id=sid, name=spec.name, tags=spec.tags)
        except BaseException:
            self._abort(sid, d, proc, cgroups, slot)
            raise

    def _abort(
        self,
        sid: str,
        d: Path,
        proc: subprocess.Popen[bytes] | None,
        cgroups: list[str],
        slot: int | None,
    ) -> None:
        deadline = time.monotonic() + KILL_TIMEOUT
        if proc is not None and proc.poll() is None:
            # kill the launcher's child (sshd or its init) and let the launcher reap it
            kids = _children(proc.pid) if self.isolation != "none" else []
            for pid in kids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            if not kids:
                proc.kill()
        try:
            _remove_cgroups(cgroups, deadline)
        finally:
            if proc is not None:
                try:
                    proc.wait(2.0)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        proc.wait(max(0.1, deadline - time.monotonic()))
                with self._procs_lock:
                    self._procs.pop(sid, None)
            if self.network is not None and slot is not None:
                sandbox_net.teardown(self._net_info(sid, slot), d)
            if slot is not None:
                self._slots.release(slot, d)
            _wait_loop_detached(d, deadline)
            self._remove_dir(sid)

    def _net_info(self, sid: str, slot: int) -> dict[str, str]:
        """The names a sandbox's network has (derivable: a record may predate them)."""
        return {
            "netns": sandbox_net.netns_name(self._tag, sid),
            "veth": sandbox_net.veth_name(slot),
        }

    def _sshd_config(
        self,
        d: Path,
        sid: str,
        spec: ServerSpec,
        address: str,
        port: int,
        user: pwd.struct_passwd,
    ) -> str:
        flavor = re.sub(r"[^A-Za-z0-9._-]", "_", spec.flavor.name)
        # root mode: sshd sees its dir at SANDBOX_MNT (the host path is not reachable by the
        # login user, and may lie below a dir that gets a private tmpfs)
        base = SANDBOX_MNT if self.isolation == "root" else d
        lines = [
            f"ListenAddress {address}:{port}",
            f"HostKey {base}/ssh_host_ed25519_key",
            f"AuthorizedKeysFile {base}/authorized_keys",
            "PidFile none" if self.isolation == "root" else f"PidFile {d}/sshd.pid",
            f"AllowUsers {user.pw_name}",
            "PermitRootLogin " + ("prohibit-password" if user.pw_uid == 0 else "no"),
            "PubkeyAuthentication yes",
            "PasswordAuthentication no",
            "KbdInteractiveAuthentication no",
            "HostbasedAuthentication no",
            "UsePAM no",
            "StrictModes no",
            "UseDNS no",
            "PrintMotd no",
            "PrintLastLog no",
            "X11Forwarding no",
            "PermitUserEnvironment no",
            "MaxStartups 200",
            "MaxSessions 64",
            "LoginGraceTime 30",
            "LogLevel INFO",
            f"SetEnv STACKML_SERVER_ID={sid} STACKML_FLAVOR={flavor}",
            "Subsystem sftp internal-sftp",
        ]
        return "\n".join(lines) + "\n"

    def _resolve_mounts(self, spec: ServerSpec) -> list[tuple[str, str]]:
        """The spec's read-only mounts as (real host dir, normalized target), targets made."""
        if self._mounts is None:
            return []
        resolved = []
        for src, dst in self._mounts(spec):
            real = os.path.realpath(src)
            target = os.path.normpath(dst)
            if not os.path.isdir(real):
                raise SandboxError(f"mount source {src} is not a directory")
            if not target.startswith("/") or target == "/" or "\n" in target:
                raise SandboxError(f"mount target {dst!r} must be an absolute path below /")
            if any(target == t or target.startswith(t + "/") for t in PRIVATE_TMP):
                raise SandboxError(f"mount target {dst!r} lies in a private tmp dir")
            _mount_point(Path(target))
            resolved.append((real, target))
        return resolved

    def _spawn(
        self,
        d: Path,
        spec: ServerSpec,
        cgroups: list[str],
        homedir: str,
        mounts: list[tuple[str, str]],
        network: dict[str, str] | None = None,
    ) -> subprocess.Popen[bytes]:
        cfg = str(d / "sshd_config")
        sshd = [SSHD, "-D", "-e", "-f", cfg]
        if self.isolation == "root":
            init = _NS_INIT.format(
                sshd=SSHD, setpriv=SETPRIV, sandbox_mnt=SANDBOX_MNT,
                private_tmp=" ".join(PRIVATE_TMP), tmpfs_source=TMPFS_SOURCE,
            )  # fmt: skip
            procs = [f"{cg}/cgroup.procs" for cg in cgroups]
            argv = [
                UNSHARE, "--pid", "--mount", "--mount-proc", "--uts", "--ipc", "--fork",
                "--kill-child", "--",
                "/bin/sh", "-c", init, "sandbox-init", str(d), str(d / HOME_IMAGE), homedir,
                _hostname(spec.name),
                str(_tmp_mb(spec.flavor)), str(len(mounts)), *(p for m in mounts for p in m),
                *procs,
            ]  # fmt: skip
        elif self.isolation == "rootless":
            argv = [
                UNSHARE, "--user", "--map-current-user", "--pid", "--mount", "--mount-proc",
                "--fork", "--kill-child",
                "--", *sshd,
            ]  # fmt: skip
        else:
            argv = sshd
        if network:  # its own network namespace (nsenter execs unshare: same pid)
            argv = [*sandbox_net.launcher(network["netns"]), *argv]
        fd = os.open(d / "console.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            return subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=fd,
                stderr=fd,
                start_new_session=True,
                env=ENV,
                cwd="/",
            )
        except OSError as e:
            raise SandboxBootFailed(f"cannot start {argv[0]}: {e}") from e
        finally:
            os.close(fd)

    def _wait_listening(self, d: Path, proc: subprocess.Popen[bytes], started: float) -> int:
        """Wait for sshd's "Server listening" line; fail fast when the launcher exits."""
        deadline = started + self.boot_timeout
        pause = 0.0005
        with open(d / "console.log", "rb") as console:
            seen = b""
            while True:
                seen += console.read()
                if b"Server listening on" in seen:
                    break
                rc = proc.poll()
                if rc is not None:
                    seen += console.read()
                    tail = seen.decode(errors="replace").strip()[-1500:]
                    if "Address already in use" in tail:
                        raise _AddressInUse(tail)
                    raise SandboxBootFailed(f"sshd exited with status {rc} while booting: {tail}")
                if time.monotonic() > deadline:
                    tail = seen.decode(errors="replace").strip()[-1500:]
                    raise DeadlineExceeded(
                        f"sshd did not listen within {self.boot_timeout:g}s: {tail}"
                    )
                time.sleep(pause)
                pause = min(pause * 1.5, 0.01)
        if self.isolation == "none":
            return proc.pid
        kids = _children(proc.pid)  # unshare --fork: its one child is sshd (PID 1 inside)
        if len(kids) != 1:
            raise SandboxBootFailed(f"cannot find sshd under launcher {proc.pid}: {kids}")
        return kids[0]

    # ---- records, teardown

    def _ids(self) -> list[str]:
        try:
            return sorted(n for n in os.listdir(self.root) if ID_RE.fullmatch(n))
        except FileNotFoundError:
            return []

    def _record(self, server_id: str) -> dict[str, Any] | None:
        if not ID_RE.fullmatch(server_id):
            return None
        try:
            rec: dict[str, Any] = json.loads((self.root / server_id / "server.json").read_text())
        except (FileNotFoundError, NotADirectoryError):
            return None
        except (OSError, ValueError) as e:
            raise SandboxError(f"sandbox {server_id}: unreadable record: {e}") from e
        return rec

    def _reap(self) -> None:
        """Collect exit statuses of launchers this process started (no zombies kept)."""
        with self._procs_lock:
            for sid, proc in list(self._procs.items()):
                if proc.poll() is not None:
                    del self._procs[sid]

    def _kill(self, sid: str, rec: dict[str, Any], deadline: float) -> None:
        """Kill sshd and everything in its namespace and cgroups. The launcher (unshare) is
        left to reap sshd and exit by itself: killing it first would orphan sshd's zombie."""
        cgroups = sorted(set(rec.get("cgroups") or []) | set(self._cgroup_dirs(sid)))
        for cg in cgroups:  # v2: the kernel kills the whole tree at once, forks included
            if (Path(cg) / "cgroup.kill").exists():
                with contextlib.suppress(OSError):
                    (Path(cg) / "cgroup.kill").write_text("1")
        sshd, sshd_start = rec.get("sshd_pid"), rec.get("sshd_start")
        if sshd and _alive(sshd, sshd_start):
            if rec.get("isolation") == "none":
                # no namespace: kill its connection handlers first and let sshd reap them
                settle = time.monotonic() + 0.5
                while (kids := _children(sshd)) and time.monotonic() < settle:
                    for pid in kids:
                        with contextlib.suppress(ProcessLookupError):
                            os.kill(pid, signal.SIGKILL)
                    time.sleep(0.005)
            with contextlib.suppress(ProcessLookupError):
                os.kill(sshd, signal.SIGKILL)
        with self._procs_lock:
            proc = self._procs.pop(sid, None)
        if sshd is None:
            # a record without pids: its creator died mid-boot; find sshd and launcher by argv
            for pid in _pids_with_arg(str(self.root / sid) + "/"):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        _remove_cgroups(cgroups, deadline)
        launcher, launcher_start = rec.get("launcher_pid"), rec.get("launcher_start")
        grace = time.monotonic() + 2.0
        if proc is not None:
            try:
                proc.wait(max(0.05, min(grace, deadline) - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                try:
                    proc.wait(max(0.05, deadline - time.monotonic()))
                except subprocess.TimeoutExpired as e:
                    raise DeadlineExceeded(f"sandbox {sid}: launcher {proc.pid} survived") from e
        elif launcher and launcher != sshd:
            while _alive(launcher, launcher_start) and time.monotonic() < grace:
                time.sleep(0.002)
            if _alive(launcher, launcher_start):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(launcher, signal.SIGKILL)
        for what, who, start in (
            ("sshd", sshd, sshd_start),
            ("launcher", launcher, launcher_start),
        ):
            while who and _alive(who, start):
                if time.monotonic() > deadline:
                    raise DeadlineExceeded(f"sandbox {sid}: {what} pid {who} survived SIGKILL")
                time.sleep(0.002)

    def _cgroup_dirs(self, sid: str) -> list[str]:
        """The sandbox's cgroups that exist, found by name (a record may predate them)."""
        name = f"{self._tag}-{sid}"
        bases = _cgroup_bases(self.cgroup_root).values()
        return [str(b / name) for b in bases if (b / name).is_dir()]

    def _remove_dir(self, sid: str) -> None:
        d = self.root / sid
        with contextlib.suppress(FileNotFoundError):
            os.rename(d, self.root / f".trash-{sid}")  # atomically gone for every reader
        self._clear_trash(sid)

    def _sweep_trash(self) -> None:
        """Finish removing what deletes moved aside and did not remove: a delete whose process
        was killed mid-removal (a worker stopped or SIGKILLed) leaves `.trash-<id>`; the next
        listing (the reconciler lists every interval) finishes it. A trash dir has no record,
        so no reader can take it for a server; removing it twice at once is harmless."""
        try:
            names = [n for n in os.listdir(self.root) if n.startswith(".trash-")]
        except FileNotFoundError:
            return
        for name in names:
            self._clear_trash(name.removeprefix(".trash-"))

    def _clear_trash(self, sid: str) -> None:
        """Remove what a delete moved aside (`.trash-<id>`), also when the process that moved it
        was killed before it finished; retried for a few seconds, since a detaching loop device
        can hold part of it a moment (leak_report names what is still left)."""
        if not ID_RE.fullmatch(sid):
            return
        trash = self.root / f".trash-{sid}"
        end = time.monotonic() + TRASH_TIMEOUT
        while trash.exists():
            shutil.rmtree(trash, onerror=_force_remove)
            if not trash.exists() or time.monotonic() > end:
                return
            time.sleep(0.05)


def _force_remove(func: Any, path: str, exc_info: Any) -> None:
    """rmtree helper: a job may leave read-only dirs behind; make them writable and retry."""
    with contextlib.suppress(OSError):
        os.chmod(os.path.dirname(path), 0o700)
        os.chmod(path, 0o700)
    try:
        func(path)
    except FileNotFoundError:
        pass
    except OSError:
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)


def _pids_with_arg(prefix: str) -> list[int]:
    """Processes with an argument under `prefix` (sshd -f <root>/<id>/sshd_config, its launcher)."""
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == os.getpid():
            continue
        try:
            with open(f"/proc/{name}/cmdline", "rb") as fh:
                args = fh.read().split(b"\0")
        except OSError:
            continue
        if any(a.startswith(prefix.encode()) for a in args):
            found.append(int(name))
    return found


def leak_report(root: Path | str, cgroup_root: Path | str | None = None) -> list[str]:
    """What sandboxes under `root` left behind: processes, cgroups (under `cgroup_root`, default
    CGROUP_ROOT), dirs (with their home images), attached loop devices, mounts on the host,
    slots. Empty = clean."""
    root = Path(os.path.realpath(root))
    problems: list[str] = []
    for pid in _pids_with_arg(f"{root}/"):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as fh:
                cmd = fh.read().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue
        if cmd:
            problems.append(f"process {pid} still runs: {cmd[:200]}")
    tag = _root_tag(root)
    for base in _cgroup_bases(Path(cgroup_root) if cgroup_root else None).values():
        with contextlib.suppress(FileNotFoundError):
            for name in sorted(os.listdir(base)):
                if name.startswith(f"{tag}-") and (base / name).is_dir():
                    problems.append(f"cgroup {base / name} remains ({_cgroup_pids(base / name)})")
    with contextlib.suppress(FileNotFoundError):
        for name in sorted(os.listdir(root)):
            if ID_RE.fullmatch(name) or name.startswith(".trash-"):
                problems.append(f"sandbox dir {root / name} remains")
    for loop in _loop_backing_files(f"{root}/"):
        problems.append(f"loop device {loop} still attached")
    problems.extend(_host_mounts(root))
    problems.extend(sandbox_net.leaks(root, tag))
    for registry in (RUN_DIR / "slots", root / ".slots"):
        problems.extend(_Slots(registry).owned_under(root))
    return problems
