"""Sandbox filesystem isolation against real sshd, namespaces, loop devices and cgroups:
the platform's files are private to it, private /tmp /var/tmp /dev/shm /run/lock die with the
sandbox, the home has a disk quota, no_new_privs holds, and the cgroup code (freeze, kill)
works on a pure cgroup v2 layout as well as on a mixed v1 + unified one."""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import secrets
import shutil
import socket
import sqlite3
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import text

from service.backends.compute import sandbox
from service.backends.compute.sandbox import SandboxBackend, leak_report, v2_cgroup
from service.backends.interfaces import Flavor, ServerSpec, ServerState, ServerStatus
from service.backends.storage.local import LocalStore
from service.config import Settings
from service.datadir import DataDirError, secure_data_dir
from service.db.session import engine_for
from workers import ssh

FLAVOR = Flavor(name="test.fs", vcpus=1, ram_mb=512, pids=256)

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="root isolation needs root")


@pytest.fixture(scope="module")
def keypair() -> tuple[str, str]:
    return ssh.generate_keypair()


@pytest.fixture
def base() -> Iterator[Path]:
    """A scratch dir outside the sandboxes' private tmp dirs (/tmp, /var/tmp are tmpfs inside
    them, which would hide a path there and make every "cannot read" below vacuous)."""
    assert Path(sandbox.SSHD).exists(), "openssh-server is required"
    path = Path(tempfile.mkdtemp(prefix="stackml-fstest-", dir="/var/lib"))
    yield path
    shutil.rmtree(path, ignore_errors=True)
    ssh.close_all()


def clean_up(root: Path, cgroup_root: Path | None = None) -> None:
    """Teardown: nothing may be left behind (then delete whatever was, anyway)."""
    leaks = leak_report(root, cgroup_root)
    cleaner = SandboxBackend(root, [], cgroup_root=cgroup_root)
    for ref in cleaner.list_servers():
        cleaner.delete_server(ref.id)
    assert leaks == [], f"the test left things behind: {leaks}"


def spec(public_key: str, name: str = "job-1", flavor: Flavor = FLAVOR) -> ServerSpec:
    return ServerSpec(name=name, flavor=flavor, image="tensorflow-2.21", public_key=public_key)


def target(st: ServerStatus, pem: str) -> ssh.SSHTarget:
    assert st.host and st.username
    return ssh.SSHTarget(st.host, st.port, st.username, pem, st.host_key)


def record(root: Path, server_id: str) -> dict[str, object]:
    data: dict[str, object] = json.loads((root / server_id / "server.json").read_text())
    return data


# --------------------------------------------------------------------------- platform files


def test_the_sandbox_user_reads_none_of_the_platform_files(
    base: Path, keypair: tuple[str, str]
) -> None:
    """The database, its WAL, the signing key, store objects and another job's staged package,
    tried as the sandbox user from inside a real sandbox over SSH: all refused. Then again with
    the data dir opened up by hand (0755): the files themselves are 0600."""
    pem, pub = keypair
    data_dir = base / "data"
    data_dir.mkdir(mode=0o755)
    os.chmod(data_dir, 0o755)  # an old install's data dir: secure_data_dir tightens it
    settings = Settings(
        data_dir=data_dir,
        database_url="",
        compute="sandbox",
        runtime_root=Path("/var/cache/stackml/runtimes"),
    )
    previous = secure_data_dir(settings)
    root = settings.sandbox_dir
    try:
        assert os.umask(0o077) == 0o077  # secure_data_dir set it
        assert data_dir.stat().st_mode & 0o777 == 0o700
        db = Path(settings.db_url.removeprefix("sqlite:///"))
        engine = engine_for(settings.db_url)
        with engine.connect() as conn:  # held open: the WAL and SHM files stay
            conn.execute(text("CREATE TABLE jobs_env (v TEXT)"))
            conn.execute(text("INSERT INTO jobs_env VALUES ('AWS_SECRET=hunter2')"))
            conn.commit()
            wal, shm = Path(f"{db}-wal"), Path(f"{db}-shm")
            assert wal.exists() and shm.exists()
            store = LocalStore(settings.store_dir, "http://127.0.0.1:1", settings.signing_key())
            store.put("proj-a/packages/trainer.tar.gz", b"someone else's package")
            obj = store.path("proj-a/packages/trainer.tar.gz")
            key = data_dir / "secret.key"
            private = [db, wal, shm, key, obj]
            for f in private:
                assert f.stat().st_mode & 0o777 == 0o600, f
            assert settings.store_dir.stat().st_mode & 0o777 == 0o700
            assert obj.parent.stat().st_mode & 0o777 == 0o700

            backend = SandboxBackend(root, [FLAVOR])
            try:
                other = backend.create_server(spec(pub, name="other-job"))
                other_st = backend.get_server(other.id)
                with ssh.wait_for_ssh(target(other_st, pem), 10) as conn_b:
                    conn_b.put_bytes(b"other job's package", "package.tar.gz", 0o600)
                ref = backend.create_server(spec(pub))
                st = backend.get_server(ref.id)
                other_dir = root / other.id
                tries = [
                    *private,
                    other_dir / sandbox.HOME_IMAGE,
                    other_dir / "server.json",
                    sandbox.SANDBOX_MNT / "ssh_host_ed25519_key",  # its own host key
                ]
                with ssh.wait_for_ssh(target(st, pem), 10) as conn_a:
                    for f in tries:
                        r = conn_a.run(["cat", str(f)], timeout=10, check=False)
                        assert r.returncode != 0, f"the sandbox user read {f}"
                        assert b"Permission denied" in r.stderr, (f, r.stderr)
                    r = conn_a.run(["ls", str(data_dir)], timeout=10, check=False)
                    assert r.returncode != 0 and b"Permission denied" in r.stderr
                    # the other job's home is in its own namespace only; its sshd is no
                    # process of this one's
                    r = conn_a.run(
                        f"cat /proc/{record(root, other.id)['sshd_pid']}/root/run/stackml/home/"
                        "package.tar.gz; ls /run/stackml/home",
                        timeout=10,
                        check=False,
                    )
                    assert b"other job" not in r.stdout and b"package" not in r.stdout
                    # defense in depth: with the data dir opened by hand, the files stay 0600
                    os.chmod(data_dir, 0o755)
                    os.chmod(settings.store_dir, 0o755)
                    for f in private:
                        r = conn_a.run(["cat", str(f)], timeout=10, check=False)
                        assert r.returncode != 0 and b"Permission denied" in r.stderr, f
                    os.chmod(data_dir, 0o700)
                # sshd still read authorized_keys as the login user through SANDBOX_MNT
                assert (root / ref.id).stat().st_mode & 0o777 == 0o711
                assert root.stat().st_mode & 0o777 == 0o700
                backend.delete_server(ref.id)
                backend.delete_server(other.id)
            finally:
                clean_up(root)
        engine.dispose()
    finally:
        os.umask(previous)


def test_a_runtime_root_inside_the_private_data_dir_is_refused(base: Path) -> None:
    settings = Settings(
        data_dir=base / "data", compute="sandbox", runtime_root=base / "data" / "runtimes"
    )
    with pytest.raises(DataDirError, match="runtime_root .* inside the data dir"):
        secure_data_dir(settings)
    assert not (base / "data").exists()  # refused before anything changed
    default = Settings(data_dir=base / "data", runtime_root=None)
    assert default.runtime_dir == Path("/var/cache/stackml/runtimes")


def test_sqlite_files_made_loose_before_are_tightened(base: Path) -> None:
    data_dir = base / "data"
    data_dir.mkdir(mode=0o755)
    os.chmod(data_dir, 0o755)
    db = data_dir / "stackml.db"
    sqlite3.connect(db).close()
    for f in (db, data_dir / "stackml.db-wal", data_dir / "secret.key"):
        f.touch()
        os.chmod(f, 0o644)
    settings = Settings(data_dir=data_dir, database_url="")
    previous = secure_data_dir(settings)
    os.umask(previous)
    assert data_dir.stat().st_mode & 0o777 == 0o700
    for f in (db, data_dir / "stackml.db-wal", data_dir / "secret.key"):
        assert f.stat().st_mode & 0o777 == 0o600, f


# --------------------------------------------------------------------------- leftovers


def test_private_tmp_dirs_die_with_the_sandbox(base: Path, keypair: tuple[str, str]) -> None:
    """100 MiB in /dev/shm and files in /tmp, /var/tmp, /run/lock: private tmpfs inside the
    sandbox, nothing on the host, gone with the sandbox, invisible to the next one."""
    pem, pub = keypair
    root = base / "sandboxes"
    backend = SandboxBackend(root, [FLAVOR])
    mark = f"stackml-leftover-{secrets.token_hex(4)}"
    dirs = ["/tmp", "/var/tmp", "/dev/shm", "/run/lock"]
    try:
        ref = backend.create_server(spec(pub))
        st = backend.get_server(ref.id)
        with ssh.wait_for_ssh(target(st, pem), 10) as conn:
            conn.run(f"dd if=/dev/zero of=/dev/shm/{mark}.big bs=1M count=100 2>/dev/null",
                     timeout=60)  # fmt: skip
            conn.run(" && ".join(f"echo x >{d}/{mark}" for d in dirs), timeout=10)
            conn.run(f"setsid nohup sleep 1000 </dev/null >/tmp/{mark}.out 2>&1 &", timeout=10)
            sizes = conn.run(f"du -sm /dev/shm/{mark}.big; stat -f -c %T {' '.join(dirs)}",
                             timeout=10).text.split()  # fmt: skip
            assert sizes[0] == "100"
            assert sizes[2:] == ["tmpfs"] * len(dirs)
        for d in dirs:  # private to the sandbox even while it runs
            assert not Path(d, mark).exists()
        assert not Path(f"/dev/shm/{mark}.big").exists()
        backend.delete_server(ref.id)
        assert not any(p.name.startswith(mark) for d in dirs for p in Path(d).iterdir())

        ref2 = backend.create_server(spec(pub, name="job-2"))
        st2 = backend.get_server(ref2.id)
        with ssh.wait_for_ssh(target(st2, pem), 10) as conn:
            seen = conn.run(f"ls -a {' '.join(dirs)}", timeout=10).text
        assert mark not in seen
        backend.delete_server(ref2.id)
    finally:
        clean_up(root)


def test_home_has_a_disk_quota(base: Path, keypair: tuple[str, str]) -> None:
    """Writing past the home's size is ENOSPC inside the sandbox; the host's disk holds at
    most the image. The size is the flavor's disk_gb, else the backend's default."""
    pem, pub = keypair
    root = base / "sandboxes"
    backend = SandboxBackend(root, [FLAVOR], default_disk_mb=64)
    try:
        ref = backend.create_server(spec(pub))
        st = backend.get_server(ref.id)
        image = root / ref.id / sandbox.HOME_IMAGE
        assert image.stat().st_size == 64 << 20
        with ssh.wait_for_ssh(target(st, pem), 10) as conn:
            r = conn.run("dd if=/dev/zero of=big bs=1M count=100", timeout=60, check=False)
            assert r.returncode != 0
            assert b"No space left on device" in r.stderr
            assert conn.run("stat -f -c %T .", timeout=10).text.strip() == "ext2/ext3"
            assert image.stat().st_blocks * 512 <= 64 << 20  # the host's disk: the image, no more
            conn.run("rm big && echo ok >small", timeout=10)  # the home works again
            assert conn.run("cat small", timeout=10).text == "ok\n"
        assert record(root, ref.id)["home_mb"] == 64
        backend.delete_server(ref.id)

        sized = Flavor(name="test.disk", vcpus=1, ram_mb=256, pids=128, disk_gb=2)
        ref = backend.create_server(spec(pub, name="job-2", flavor=sized))
        assert (root / ref.id / sandbox.HOME_IMAGE).stat().st_size == 2 << 30
        with ssh.wait_for_ssh(target(backend.get_server(ref.id), pem), 10) as conn:
            blocks = conn.run("df -BM --output=size . | tail -1", timeout=10).text.strip()
        assert 1900 <= int(blocks.rstrip("M")) <= 2048
        backend.delete_server(ref.id)
    finally:
        clean_up(root)


def test_no_new_privs_setuid_does_not_elevate(base: Path, keypair: tuple[str, str]) -> None:
    pem, pub = keypair
    suid_dir = base / "suid"
    suid_dir.mkdir(mode=0o755)
    os.chmod(base, 0o755)  # for the check on the host below (the sandbox sees the bind target)
    shutil.copy("/usr/bin/id", suid_dir / "id")
    os.chown(suid_dir / "id", 0, 0)
    os.chmod(suid_dir / "id", 0o4755)
    os.chmod(suid_dir, 0o755)
    mount_at = f"/opt/stackml-suid-test-{secrets.token_hex(4)}"
    root = base / "sandboxes"
    backend = SandboxBackend(root, [FLAVOR], mounts=lambda _spec: [(suid_dir, mount_at)])
    try:
        ref = backend.create_server(spec(pub))
        st = backend.get_server(ref.id)
        assert st.username
        with ssh.wait_for_ssh(target(st, pem), 10) as conn:
            status = conn.run("grep NoNewPrivs /proc/self/status", timeout=10).text.split()
            assert status == ["NoNewPrivs:", "1"]
            euid = conn.run([f"{mount_at}/id", "-u"], timeout=10).text.strip()
            assert euid == str(_uid(st.username))
            detached = conn.run(
                "setsid sh -c 'grep NoNewPrivs /proc/self/status' </dev/null", timeout=10
            ).text.split()
            assert detached == ["NoNewPrivs:", "1"]
        # the binary does elevate outside the sandbox: the check above is not vacuous
        host = subprocess.run(
            ["setpriv", f"--reuid={_uid(st.username)}", "--clear-groups", f"{suid_dir}/id", "-u"],
            capture_output=True, text=True, timeout=10, check=True,
        )  # fmt: skip
        assert host.stdout.strip() == "0"
        backend.delete_server(ref.id)
    finally:
        try:
            clean_up(root)
        finally:
            with contextlib.suppress(FileNotFoundError):
                Path(mount_at).rmdir()  # the (empty) mount point made on the host


def _uid(user: str) -> int:
    return pwd.getpwnam(user).pw_uid


def test_leak_report_sees_loop_devices_and_host_mounts(base: Path) -> None:
    """What a broken teardown would leave: an attached home image, a sandbox tmpfs on the
    host. leak_report must name both."""
    root = base / "sandboxes"
    d = root / "sb-0000abcd"
    d.mkdir(parents=True)
    image = d / sandbox.HOME_IMAGE
    with open(image, "wb") as fh:
        fh.truncate(8 << 20)
    loop = subprocess.run(["losetup", "--find", "--show", str(image)], capture_output=True,
                          text=True, timeout=10, check=True).stdout.strip()  # fmt: skip
    point = base / "mnt"
    point.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", sandbox.TMPFS_SOURCE, str(point)],
                   timeout=10, check=True)  # fmt: skip
    try:
        report = leak_report(root)
        assert any(loop.removeprefix("/dev/") in p and str(image) in p for p in report), report
        assert any(str(point) in p and sandbox.TMPFS_SOURCE in p for p in report), report
    finally:
        subprocess.run(["umount", str(point)], timeout=10, check=True)
        subprocess.run(["losetup", "-d", loop], timeout=10, check=True)
    shutil.rmtree(d)
    assert leak_report(root) == []


# --------------------------------------------------------------------------- cgroup layouts


def _pure_v2_root() -> Path:
    """A pure cgroup v2 tree on this host: the host's own (a pure v2 machine, e.g. Debian 12)
    or the v2 hierarchy mounted beside v1 controllers (a mixed host, treated as pure v2)."""
    for candidate in (sandbox.CGROUP_ROOT, sandbox.CGROUP_ROOT / "unified"):
        if (candidate / "cgroup.controllers").exists():
            return candidate
    pytest.fail(f"no cgroup v2 hierarchy at {sandbox.CGROUP_ROOT} or below it")


def _banner(host: str, port: int, wait: float) -> bytes:
    """The first bytes sshd sends on a new connection within `wait` seconds (b"" if none)."""
    with socket.create_connection((host, port), timeout=5) as s:
        s.settimeout(wait)
        try:
            return s.recv(64)
        except TimeoutError:
            return b""


@pytest.mark.parametrize("layout", ["host", "pure-v2"])
def test_freeze_and_kill_on_both_cgroup_layouts(
    base: Path, keypair: tuple[str, str], layout: str
) -> None:
    """`host`: whatever this machine has (here v1 controllers + the unified mount; on Debian
    12 pure v2). `pure-v2`: the cgroup code pointed at a v2-only tree. Either way the sandbox
    is in one v2 group that freezes (sshd stops answering) and thaws, and a frozen sandbox is
    deleted without leftovers. Code that assumed v1 finds no v2 group on the pure tree."""
    pem, pub = keypair
    root = base / "sandboxes"
    cg_root = None if layout == "host" else _pure_v2_root()
    backend = SandboxBackend(root, [FLAVOR], cgroup_root=cg_root)
    try:
        ref = backend.create_server(spec(pub))
        st = backend.get_server(ref.id)
        assert st.host
        cgroups = [str(c) for c in record(root, ref.id)["cgroups"]]  # type: ignore[attr-defined]
        name = f"{sandbox._root_tag(root)}-{ref.id}"
        group = v2_cgroup(cgroups)
        assert group is not None, f"no cgroup v2 group among {cgroups}"
        if cg_root is not None:
            assert cgroups == [str(cg_root / "stackml" / name)]
        with ssh.wait_for_ssh(target(st, pem), 10) as conn:
            own = conn.run("cat /proc/self/cgroup", timeout=10).text
            conn.run("setsid nohup sleep 1000 >/dev/null 2>&1 &", timeout=10)
        rel = "/" + str(group.relative_to(_v2_mount_of(group)))
        assert f"0::{rel}\n" in own  # the session runs in the v2 group

        assert _banner(st.host, st.port, 5).startswith(b"SSH-2.0-")
        backend.freeze(ref.id)
        assert "frozen 1" in (group / "cgroup.events").read_text().splitlines()
        assert _banner(st.host, st.port, 1) == b""  # sshd is frozen: no answer
        backend.freeze(ref.id, frozen=False)
        assert _banner(st.host, st.port, 5).startswith(b"SSH-2.0-")

        backend.freeze(ref.id)
        pids = (group / "cgroup.procs").read_text().split()
        assert len(pids) >= 2  # sshd and the detached sleep, frozen
        backend.delete_server(ref.id)  # cgroup.kill works on a frozen group
        assert backend.get_server(ref.id).state is ServerState.DELETED
        assert not any(Path(c).exists() for c in cgroups)
        assert not any(Path(f"/proc/{p}").exists() for p in pids)
    finally:
        clean_up(root, cg_root)


def _v2_mount_of(group: Path) -> Path:
    """The cgroup2 mount point above `group` (/proc/self/cgroup paths are relative to it)."""
    for p in (group, *group.parents):
        if (p / "cgroup.controllers").exists() and not (p.parent / "cgroup.controllers").exists():
            return p
    raise AssertionError(f"{group} is not in a cgroup2 hierarchy")


def test_a_mount_target_in_a_private_tmp_dir_is_refused(base: Path, keypair: tuple[str, str]):
    """It would be hidden by the sandbox's own tmpfs: refused before anything starts."""
    root = base / "sandboxes"
    backend = SandboxBackend(root, [FLAVOR], mounts=lambda _spec: [(base, "/tmp/stackml-rt")])
    try:
        with pytest.raises(sandbox.SandboxError, match="private tmp dir"):
            backend.create_server(spec(keypair[1]))
        assert not Path("/tmp/stackml-rt").exists()
    finally:
        clean_up(root)
