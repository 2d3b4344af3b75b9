"""The sandbox compute backend against the real OpenSSH server, namespaces and cgroups."""

from __future__ import annotations

import json
import os
import pwd
import shutil
import signal
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from service.backends.compute import sandbox
from service.backends.compute.sandbox import SandboxBackend, SandboxBootFailed, leak_report
from service.backends.interfaces import Flavor, ServerSpec, ServerState, ServerStatus
from service.domain.errors import ServerNotFound
from workers import ssh

SMALL = Flavor(name="test.small", vcpus=1, ram_mb=512, pids=256)
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="namespaces + cgroups need root")


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def keypair() -> tuple[str, str]:
    return ssh.generate_keypair()


@pytest.fixture
def root() -> Iterator[Path]:
    """A fresh sandbox root; at teardown nothing may be left behind (then clean up anyway)."""
    assert Path(sandbox.SSHD).exists(), (
        "openssh-server is required (apt-get install openssh-server)"
    )
    # 0700 (mkdtemp's mode), like a data dir: the sandbox users need nothing below it
    base = Path(tempfile.mkdtemp(prefix="stackml-sbtest-", dir="/var/tmp"))
    sandboxes = base / "sandboxes"
    yield sandboxes
    leaks = leak_report(sandboxes)
    try:
        cleaner = SandboxBackend(sandboxes, [])
        for ref in cleaner.list_servers():
            cleaner.delete_server(ref.id)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    assert leaks == [], f"the test left things behind: {leaks}"
    ssh.close_all()


@pytest.fixture
def backend(root: Path) -> SandboxBackend:
    return SandboxBackend(root, [SMALL])


def spec(public_key: str, name: str = "job-1", flavor: Flavor = SMALL, **kw: object) -> ServerSpec:
    return ServerSpec(name=name, flavor=flavor, image="tensorflow-2.21", public_key=public_key,
                      **kw)  # type: ignore[arg-type]  # fmt: skip


def target(st: ServerStatus, pem: str) -> ssh.SSHTarget:
    assert st.host and st.username
    return ssh.SSHTarget(st.host, st.port, st.username, pem, st.host_key)


def record(root: Path, server_id: str) -> dict[str, object]:
    data: dict[str, object] = json.loads((root / server_id / "server.json").read_text())
    return data


def host_pids(uid: int, cmdline: bytes) -> list[int]:
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            if os.stat(f"/proc/{name}").st_uid != uid:
                continue
            with open(f"/proc/{name}/cmdline", "rb") as fh:
                if fh.read() == cmdline:
                    found.append(int(name))
        except OSError:
            continue
    return found


# --------------------------------------------------------------------------- lifecycle


def test_boot_connect_run_delete(backend: SandboxBackend, root: Path, keypair: tuple[str, str]):
    pem, pub = keypair
    ref = backend.create_server(spec(pub, tags=(("stackml:job", "j1"),)))
    st = backend.get_server(ref.id)
    assert st.state is ServerState.ACTIVE
    assert st.host and st.host.startswith("127.77.")
    assert st.host_key and st.host_key.startswith("ssh-ed25519 ")
    assert [r.id for r in backend.list_servers(("stackml:job", "j1"))] == [ref.id]
    assert backend.list_servers(("stackml:job", "other")) == []
    assert "Server listening on" in backend.console_log(ref.id)

    with ssh.wait_for_ssh(target(st, pem), 10) as conn:
        out = conn.run(["sh", "-c", 'echo "$STACKML_SERVER_ID $(id -un)"'], timeout=10).text
        assert out.split() == [ref.id, st.username]

    backend.delete_server(ref.id)
    assert backend.get_server(ref.id).state is ServerState.DELETED
    backend.delete_server(ref.id)  # idempotent
    assert backend.list_servers() == []
    with pytest.raises(ServerNotFound):
        backend.console_log(ref.id)


def test_a_delete_killed_mid_removal_leaves_nothing_once_the_server_is_looked_up(
    backend: SandboxBackend, root: Path
):
    # a worker SIGKILLed inside delete_server after the rename, before rmtree finished: the
    # record is gone (the server reads as DELETED, so nobody deletes it again) but its remains
    # are aside; the next look-up finishes the removal instead of leaving them for ever
    from service.backends.compute.sandbox import leak_report

    trash = root / ".trash-sb-0badc0de"
    (trash / "home" / "deep").mkdir(parents=True)
    (trash / "home" / "deep" / "model.bin").write_bytes(b"x" * 4096)
    (trash / "server.json").write_text("{}")
    os.chmod(trash / "home" / "deep", 0o500)  # a job may leave read-only dirs behind
    assert leak_report(root)  # it is a leak until removed
    assert backend.get_server("sb-0badc0de").state is ServerState.DELETED
    assert not trash.exists()
    assert not leak_report(root)


def test_remains_of_a_delete_killed_mid_removal_go_with_the_next_listing(
    backend: SandboxBackend, root: Path
):
    # nobody looks the server up again (its job is done, its row says deleted): the reconciler's
    # periodic listing is what finishes the removal, and the listing never shows the remains
    from service.backends.compute.sandbox import leak_report

    trash = root / ".trash-sb-0badf00d"
    (trash / "home").mkdir(parents=True)
    (trash / "server.json").write_text('{"name": "x", "tags": []}')
    os.chmod(trash / "home", 0o500)
    assert backend.list_servers() == []
    assert not trash.exists()
    assert not leak_report(root)


def test_unknown_ids_are_deleted_not_errors(backend: SandboxBackend):
    assert backend.get_server("sb-00000000").state is ServerState.DELETED
    assert backend.get_server("../../etc").state is ServerState.DELETED
    backend.delete_server("../../etc")
    backend.delete_server("sb-00000000")


def test_boot_failure_fails_fast_and_cleans_up(
    backend: SandboxBackend, keypair: tuple[str, str], monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setattr(sandbox, "SSHD", "/nonexistent/sshd")
    started = time.monotonic()
    with pytest.raises(SandboxBootFailed, match="nonexistent"):
        backend.create_server(spec(keypair[1]))
    assert time.monotonic() - started < 5
    assert backend.list_servers() == []


def test_rejects_a_malformed_public_key(backend: SandboxBackend, keypair: tuple[str, str]):
    with pytest.raises(sandbox.AllocationFailed):
        backend.create_server(spec(keypair[1] + "\nssh-ed25519 AAAAinjected"))


def test_killed_sshd_is_reported_as_error(
    backend: SandboxBackend, root: Path, keypair: tuple[str, str]
):
    pem, pub = keypair
    ref = backend.create_server(spec(pub))
    pid = record(root, ref.id)["sshd_pid"]
    assert isinstance(pid, int)
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while (st := backend.get_server(ref.id)).state is ServerState.ACTIVE:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert st.state is ServerState.ERROR and st.fault
    with pytest.raises(ssh.SSHUnreachable):
        ssh.SSHConnection.open(target(st, pem), timeout=2)
    backend.delete_server(ref.id)
    assert backend.get_server(ref.id).state is ServerState.DELETED


def test_second_instance_sees_and_deletes(root: Path, keypair: tuple[str, str]):
    first = SandboxBackend(root, [SMALL])
    second = SandboxBackend(root, [SMALL])
    ref = first.create_server(spec(keypair[1], tags=(("k", "v"),)))
    assert [r.id for r in second.list_servers(("k", "v"))] == [ref.id]
    assert second.get_server(ref.id).state is ServerState.ACTIVE
    second.delete_server(ref.id)
    assert first.get_server(ref.id).state is ServerState.DELETED
    assert second.get_server(ref.id).state is ServerState.DELETED


def test_ten_concurrent_creates_get_distinct_addresses(
    backend: SandboxBackend, keypair: tuple[str, str]
):
    pem, pub = keypair
    with ThreadPoolExecutor(10) as pool:
        refs = list(pool.map(lambda i: backend.create_server(spec(pub, name=f"n{i}")), range(10)))
        statuses = [backend.get_server(r.id) for r in refs]
        assert all(s.state is ServerState.ACTIVE for s in statuses)
        assert len({(s.host, s.port) for s in statuses}) == 10
        assert len({s.username for s in statuses}) == (10 if os.geteuid() == 0 else 1)

        def whoami(st: ServerStatus) -> str:
            with ssh.SSHConnection.open(target(st, pem), timeout=10) as conn:
                return conn.run("echo $STACKML_SERVER_ID", timeout=10).text.strip()

        assert list(pool.map(whoami, statuses)) == [r.id for r in refs]
        list(pool.map(lambda r: backend.delete_server(r.id), refs))
    assert backend.list_servers() == []


# --------------------------------------------------------------------------- isolation


@needs_root
def test_delete_kills_detached_processes(backend: SandboxBackend, keypair: tuple[str, str]):
    pem, pub = keypair
    ref = backend.create_server(spec(pub))
    st = backend.get_server(ref.id)
    assert st.username
    uid = pwd.getpwnam(st.username).pw_uid
    with ssh.wait_for_ssh(target(st, pem), 10) as conn:
        conn.run("setsid nohup sleep 1000 >/dev/null 2>&1 &", timeout=10)
    deadline = time.monotonic() + 5
    while not (pids := host_pids(uid, b"sleep\x001000\x00")):  # nohup execs it a moment later
        assert time.monotonic() < deadline, "the detached process should outlive its session"
        time.sleep(0.01)
    assert len(pids) == 1
    backend.delete_server(ref.id)
    assert host_pids(uid, b"sleep\x001000\x00") == []


@needs_root
def test_user_home_and_runtime_access(
    backend: SandboxBackend, root: Path, keypair: tuple[str, str]
):
    pem, pub = keypair
    # runtimes live outside the private data dir and outside the private tmp dirs
    # (like the default runtime_root /var/cache/stackml/runtimes)
    runtimes = Path(tempfile.mkdtemp(prefix="stackml-rt-test-", dir="/var/cache"))
    runtime = runtimes / "rt"
    runtime.mkdir(mode=0o755)
    os.chmod(runtimes, 0o755)
    (runtime / "hello.py").write_text("import sys; print('hello from', sys.executable)\n")
    os.chmod(runtime / "hello.py", 0o644)
    ref = backend.create_server(spec(pub))
    st = backend.get_server(ref.id)
    try:
        with ssh.wait_for_ssh(target(st, pem), 10) as conn:
            out = conn.run(["/usr/bin/python3", str(runtime / "hello.py")], timeout=10).text
    finally:
        shutil.rmtree(runtimes)
    assert out == "hello from /usr/bin/python3\n"
    with ssh.wait_for_ssh(target(st, pem), 10) as conn:
        assert conn.run('stat -c %a:%U "$HOME"; pwd', timeout=10).text.split() == [
            f"700:{st.username}",
            str(sandbox.SLOT_HOME),
        ]
        conn.put_bytes(b"data", "x.txt", 0o600)  # lands in the home image, not on the host
        sshd = record(root, ref.id)["sshd_pid"]
        inside = Path(f"/proc/{sshd}/root") / str(sandbox.SLOT_HOME).lstrip("/") / "x.txt"
        assert inside.read_bytes() == b"data"
        assert not (sandbox.SLOT_HOME / "x.txt").exists()
        # its own PID namespace and /proc: sshd is PID 1 and nothing of the host shows
        assert conn.run("cat /proc/1/comm", timeout=10).text == "sshd\n"
        assert len(conn.run("ps -e --no-headers", timeout=10).text.splitlines()) < 10
        assert conn.run("hostname", timeout=10).text.strip() == "job-1"
    backend.delete_server(ref.id)


@needs_root
def test_memory_limit_kills_the_hog_not_the_server(
    backend: SandboxBackend, keypair: tuple[str, str]
):
    pem, pub = keypair
    tiny = Flavor(name="test.tiny", vcpus=1, ram_mb=64, pids=64)
    ref = backend.create_server(spec(pub, flavor=tiny))
    st = backend.get_server(ref.id)
    with ssh.wait_for_ssh(target(st, pem), 10) as conn:
        with pytest.raises(ssh.RemoteCommandError) as err:
            conn.run(["python3", "-c", "b = b'x' * (256 << 20); print('survived')"], timeout=30)
        assert err.value.returncode in (-1, 137)
        assert "survived" not in err.value.stdout_tail
        assert conn.run(["true"], timeout=10).returncode == 0
    assert backend.get_server(ref.id).state is ServerState.ACTIVE
    backend.delete_server(ref.id)


@needs_root
def test_pids_limit(backend: SandboxBackend, keypair: tuple[str, str]):
    pem, pub = keypair
    limited = Flavor(name="test.pids", vcpus=1, ram_mb=256, pids=24)
    ref = backend.create_server(spec(pub, flavor=limited))
    st = backend.get_server(ref.id)
    script = (
        "import subprocess\n"
        "procs = []\n"
        "try:\n"
        "    for _ in range(100):\n"
        "        procs.append(subprocess.Popen(['sleep', '30']))\n"
        "except OSError as e:\n"
        "    print(len(procs), type(e).__name__)\n"
        "finally:\n"
        "    for p in procs:\n"
        "        p.kill()\n"
    )
    with ssh.wait_for_ssh(target(st, pem), 10) as conn:
        started, error = conn.run(["python3", "-c", script], timeout=30).text.split()
    assert int(started) < limited.pids and error == "BlockingIOError"
    backend.delete_server(ref.id)


@needs_root
def test_cgroup_limits_follow_the_flavor(
    backend: SandboxBackend, root: Path, keypair: tuple[str, str]
):
    flavor = Flavor(name="test.limits", vcpus=2, ram_mb=300, pids=77)
    ref = backend.create_server(spec(keypair[1], flavor=flavor))
    cgroups = [Path(p) for p in record(root, ref.id)["cgroups"]]  # type: ignore[attr-defined]
    values: dict[str, str] = {}
    for cg in cgroups:
        for name in ("memory.max", "memory.limit_in_bytes", "pids.max", "cpu.max",
                     "cpu.cfs_quota_us"):  # fmt: skip
            if (cg / name).exists():
                values[name] = (cg / name).read_text().strip()
        assert (cg / "cgroup.procs").read_text().split(), f"sshd is not in {cg}"
    assert values.get("memory.max", values.get("memory.limit_in_bytes")) == str(300 << 20)
    assert values["pids.max"] == "77"
    assert values.get("cpu.max", values.get("cpu.cfs_quota_us", "")).split()[0] == "200000"
    backend.delete_server(ref.id)
    assert not any(cg.exists() for cg in cgroups)


def test_isolation_none_boots_and_deletes(root: Path, keypair: tuple[str, str]):
    pem, pub = keypair
    plain = SandboxBackend(root, [SMALL], isolation="none")
    ref = plain.create_server(spec(pub))
    st = plain.get_server(ref.id)
    with ssh.wait_for_ssh(target(st, pem), 10) as conn:
        assert conn.run(["true"], timeout=10).returncode == 0
    plain.delete_server(ref.id)
    assert plain.get_server(ref.id).state is ServerState.DELETED


@needs_root
def test_pure_v2_layout(root: Path, keypair: tuple[str, str]):
    """The backend on a pure v2 tree (the host's own on a pure v2 machine, else the cgroup2
    mount beside the v1 controllers, injected as cgroup_root): one cgroup per sandbox, limits
    only for the controllers that can be delegated, cgroup.kill on delete. (Freezing on both
    layouts: test_sandbox_fs.py.)"""
    pem, pub = keypair
    cg_root = next(
        (p for p in (sandbox.CGROUP_ROOT, sandbox.CGROUP_ROOT / "unified")
         if (p / "cgroup.controllers").exists()),
        None,
    )  # fmt: skip
    assert cg_root is not None, f"no cgroup v2 hierarchy at {sandbox.CGROUP_ROOT}"
    v2 = SandboxBackend(root, [SMALL], cgroup_root=cg_root)
    ref = v2.create_server(spec(pub))
    cgroups = record(root, ref.id)["cgroups"]
    assert cgroups == [f"{cg_root}/stackml/{sandbox._root_tag(root)}-{ref.id}"]
    st = v2.get_server(ref.id)
    with ssh.wait_for_ssh(target(st, pem), 10) as conn:
        conn.run("setsid nohup sleep 1000 >/dev/null 2>&1 &", timeout=10)
        own = conn.run("cat /proc/self/cgroup", timeout=10).text
    assert f"0::/stackml/{sandbox._root_tag(root)}-{ref.id}" in own
    v2.delete_server(ref.id)
    assert not Path(cgroups[0]).exists()
    assert leak_report(root, cg_root) == []


def test_sandboxes_of_a_run_killed_before_its_cleanup_are_reaped_by_the_next(
    root: Path, keypair: tuple[str, str]
):
    # a test tier killed mid-run (its pytest gone) leaves its sandboxes' sshd running; the next
    # run of the tier reaps them through the backend and removes the dead run's data dir, and
    # never touches a run whose process still lives
    import subprocess

    from tests.envutil import reap_dead_runs

    gone = subprocess.Popen(["true"])
    gone.wait()
    base = root.parent
    dead, live = base / f"stackml-t-{gone.pid}", base / f"stackml-t-{os.getppid()}"
    left = SandboxBackend(dead / "sandboxes", [SMALL]).create_server(spec(keypair[1]))
    (live / "sandboxes").mkdir(parents=True)
    assert leak_report(dead / "sandboxes")  # its sshd runs
    assert reap_dead_runs("t", base=base) == [dead]
    assert not dead.exists() and live.is_dir()
    assert not [p for p in leak_report(dead / "sandboxes") if left.id in p]
