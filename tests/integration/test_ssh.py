"""workers.ssh against real sandboxes: commands, deadlines, host keys, SFTP, the cache, forks."""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from service.backends.compute import sandbox
from service.backends.compute.sandbox import SandboxBackend, leak_report
from service.backends.interfaces import Flavor, ServerSpec, ServerState
from service.domain.errors import BackendError, DeadlineExceeded
from workers import ssh

FLAVOR = Flavor(name="test.small", vcpus=1, ram_mb=512, pids=256)


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def keypair() -> tuple[str, str]:
    return ssh.generate_keypair()


@pytest.fixture
def backend() -> Iterator[SandboxBackend]:
    """A backend on a fresh root; at teardown nothing may be left behind (then clean up anyway)."""
    assert Path(sandbox.SSHD).exists(), (
        "openssh-server is required (apt-get install openssh-server)"
    )
    base = Path(tempfile.mkdtemp(prefix="stackml-sshtest-", dir="/var/tmp"))
    os.chmod(base, 0o755)  # the sandbox users traverse it (mkdtemp makes 0700)
    b = SandboxBackend(base / "sandboxes", [FLAVOR])
    yield b
    ssh.close_all()
    leaks = leak_report(b.root)
    try:
        for ref in b.list_servers():
            b.delete_server(ref.id)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    assert leaks == [], f"the test left things behind: {leaks}"


@pytest.fixture
def server(
    backend: SandboxBackend, keypair: tuple[str, str]
) -> Iterator[tuple[str, ssh.SSHTarget]]:
    pem, pub = keypair
    ref = backend.create_server(ServerSpec("ssh-test", FLAVOR, "tensorflow-2.21", pub))
    st = backend.get_server(ref.id)
    assert st.host and st.username
    yield ref.id, ssh.SSHTarget(st.host, st.port, st.username, pem, st.host_key)
    backend.delete_server(ref.id)


@pytest.fixture
def conn(server: tuple[str, ssh.SSHTarget]) -> Iterator[ssh.SSHConnection]:
    c = ssh.wait_for_ssh(server[1], 10)
    yield c
    c.close()


# --------------------------------------------------------------------------- commands


def test_run_quotes_argv_and_keeps_streams_apart(conn: ssh.SSHConnection):
    hostile = ["it's", "$HOME", "a b", "; rm -rf ~", "`id`", "*"]
    r = conn.run(["printf", "%s\\n", *hostile], timeout=10)
    assert r.stdout.decode().splitlines() == hostile
    r = conn.run("echo out; echo err >&2; exit 0", timeout=10)
    assert (r.returncode, r.stdout, r.stderr) == (0, b"out\n", b"err\n")


def test_big_outputs_on_both_streams_and_stdin_do_not_deadlock(conn: ssh.SSHConnection):
    r = conn.run("head -c 8000000 /dev/zero; head -c 6000000 /dev/zero >&2", timeout=30)
    assert (len(r.stdout), len(r.stderr)) == (8_000_000, 6_000_000)
    payload = os.urandom(6_000_000)
    r = conn.run(["sh", "-c", "cat; cat /dev/null >&2"], timeout=30, input=payload)
    assert r.stdout == payload
    assert conn.run(["true"], timeout=10, input=payload).returncode == 0  # input left unread


def test_nonzero_exit_raises_with_stderr_tail(conn: ssh.SSHConnection):
    with pytest.raises(ssh.RemoteCommandError) as err:
        conn.run(["sh", "-c", "echo first >&2; echo 'no such thing' >&2; exit 3"], timeout=10)
    e = err.value
    assert (e.returncode, e.stderr_tail) == (3, "first\nno such thing\n")
    assert isinstance(e, BackendError) and e.reason == "remote_command_failed"
    assert "exited with status 3: no such thing" in str(e)
    r = conn.run(["sh", "-c", "exit 5"], timeout=10, check=False)
    assert r.returncode == 5


def test_command_timeout_raises_and_kills_the_command(conn: ssh.SSHConnection):
    started = time.monotonic()
    with pytest.raises(ssh.SSHTimeout) as err:
        conn.run(["sleep", "77"], timeout=0.5)
    assert time.monotonic() - started < 10  # not the command's own 30-77 s
    assert isinstance(err.value, DeadlineExceeded) and err.value.reason == "timeout"
    time.sleep(0.1)
    assert "sleep 77" not in conn.run(["ps", "-eo", "args"], timeout=10).text
    assert conn.is_alive()


def test_detached_child_holding_stdout_does_not_hang_run(conn: ssh.SSHConnection):
    started = time.monotonic()
    assert conn.run("sleep 30 & echo started", timeout=10).text == "started\n"
    assert time.monotonic() - started < 10  # not the command's own 30-77 s


def test_concurrent_commands_on_one_connection(conn: ssh.SSHConnection):
    results: list[str] = []

    def work(i: int) -> None:
        results.append(conn.run(["echo", str(i)], timeout=10).text.strip())

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results, key=int) == [str(i) for i in range(8)]


# --------------------------------------------------------------------------- trust


def test_wrong_pinned_host_key_is_rejected_at_once(server: tuple[str, ssh.SSHTarget]):
    _, good = server
    other_key = ssh.generate_keypair()[1]
    bad = ssh.SSHTarget(good.host, good.port, good.username, good.private_key_pem, other_key)
    started = time.monotonic()
    with pytest.raises(ssh.HostKeyMismatch):
        ssh.wait_for_ssh(bad, 10)  # never retried
    assert time.monotonic() - started < 10  # not the command's own 30-77 s
    unpinned = ssh.SSHTarget(good.host, good.port, good.username, good.private_key_pem, None)
    with ssh.SSHConnection.open(unpinned, timeout=10) as c:
        assert c.run(["true"], timeout=10).returncode == 0


def test_wrong_private_key_is_refused(server: tuple[str, ssh.SSHTarget]):
    _, good = server
    stranger = ssh.SSHTarget(good.host, good.port, good.username, ssh.generate_keypair()[0],
                             good.host_key)  # fmt: skip
    with pytest.raises(ssh.SSHAuthenticationFailed):
        ssh.SSHConnection.open(stranger, timeout=10)


def test_generate_keypair_format():
    pem, pub = ssh.generate_keypair("job-42")
    assert pem.startswith("-----BEGIN OPENSSH PRIVATE KEY-----")
    kind, data, comment = pub.split()
    assert (kind, comment) == ("ssh-ed25519", "job-42") and data.startswith("AAAA")
    assert "PRIVATE" not in repr(ssh.SSHTarget("h", 22, "u", pem))


# --------------------------------------------------------------------------- failures


def test_unreachable_within_deadline(keypair: tuple[str, str]):
    nowhere = ssh.SSHTarget("127.77.254.250", 2, "nobody", keypair[0], None)
    started = time.monotonic()
    with pytest.raises(ssh.SSHUnreachable) as err:
        ssh.wait_for_ssh(nowhere, 0.6)
    assert 0.2 < time.monotonic() - started < 10  # retried until the deadline, not for ever
    assert err.value.reason == "ssh_unreachable"


def test_killed_sandbox_gives_connection_lost_then_unreachable(
    backend: SandboxBackend, server: tuple[str, ssh.SSHTarget], conn: ssh.SSHConnection
):
    server_id, target = server
    caught: list[BaseException] = []

    def long_command() -> None:
        try:
            conn.run(["sleep", "60"], timeout=30)
        except BaseException as e:  # noqa: BLE001 - handed to the test thread
            caught.append(e)

    t = threading.Thread(target=long_command)
    t.start()
    time.sleep(0.2)
    started = time.monotonic()
    backend.delete_server(server_id)
    t.join(10)
    assert not t.is_alive() and time.monotonic() - started < 10
    assert len(caught) == 1 and isinstance(caught[0], ssh.ConnectionLost), caught
    assert caught[0].reason == "server_lost"
    assert backend.get_server(server_id).state is ServerState.DELETED
    with pytest.raises(ssh.ConnectionLost):
        conn.run(["true"], timeout=5)
    with pytest.raises(ssh.SSHUnreachable):
        ssh.wait_for_ssh(target, 0.3)


# --------------------------------------------------------------------------- SFTP


def test_sftp_put_read_stat(conn: ssh.SSHConnection, tmp_path: Path):
    conn.put_bytes(b"line1\nline2\n", "log.txt", 0o600)
    st = conn.stat("log.txt")
    assert st is not None and st.st_size == 12 and st.st_mode & 0o777 == 0o600
    assert conn.read_file_from("log.txt", 6, 100) == b"line2\n"
    assert conn.read_file_from("log.txt", 12, 100) == b""
    assert conn.read_file_from("log.txt", 0, 5) == b"line1"
    assert conn.stat("missing") is None and not conn.exists("missing")
    with pytest.raises(FileNotFoundError):
        conn.read_file_from("missing", 0, 10)

    blob = os.urandom(3_000_000)
    local = tmp_path / "blob"
    local.write_bytes(blob)
    conn.run(["mkdir", "-p", "sub/dir"], timeout=10)
    conn.put_file(local, "sub/dir/blob", 0o755)
    assert conn.read_file_from("sub/dir/blob", 1000, 2_000_000) == blob[1000:2_001_000]
    assert conn.read_file_from("sub/dir/blob", 2_999_000, 1 << 20) == blob[2_999_000:]
    assert conn.run(["sha256sum", "sub/dir/blob"], timeout=10).text.split()[0] == (
        __import__("hashlib").sha256(blob).hexdigest()
    )
    with pytest.raises(ssh.SSHError):
        conn.put_bytes(b"x", "/etc/stackml-forbidden", 0o644)


def test_read_follows_a_growing_file(conn: ssh.SSHConnection):
    conn.run("for i in $(seq 1 3000); do echo line-$i; done > grow.log", timeout=10)
    offset, chunks = 0, []
    conn.run("for i in $(seq 3001 6000); do echo line-$i; done >> grow.log", timeout=10)
    while data := conn.read_file_from("grow.log", offset, 7000):
        chunks.append(data)
        offset += len(data)
    lines = b"".join(chunks).decode().splitlines()
    assert lines[0] == "line-1" and lines[-1] == "line-6000" and len(lines) == 6000


# --------------------------------------------------------------------------- the cache


def test_connection_cache_reuses_and_drops(server: tuple[str, ssh.SSHTarget]):
    _, target = server
    a = ssh.connection(target, timeout=10)
    assert ssh.connection(target, timeout=10) is a
    ssh.drop(target)
    assert not a.is_alive()
    b = ssh.connection(target, timeout=10)
    assert b is not a and b.run(["true"], timeout=10).returncode == 0
    ssh.close_all()
    assert not b.is_alive()


def test_cache_is_fork_safe(server: tuple[str, ssh.SSHTarget]):
    _, target = server
    parent = ssh.connection(target, timeout=10)
    pid = os.fork()
    if pid == 0:  # child: must not reuse (or close) the parent's transport
        code = 1
        try:
            child = ssh.connection(target, timeout=10)
            ok = child is not parent and child.run(["true"], timeout=10).returncode == 0
            ssh.close_all()
            code = 0 if ok else 2
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert parent.is_alive() and parent.run(["echo", "still"], timeout=10).text == "still\n"
    assert ssh.connection(target, timeout=10) is parent
