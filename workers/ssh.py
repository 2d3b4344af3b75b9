"""SSH to job servers (paramiko): commands with deadlines, SFTP, a per-process connection cache.

    target = SSHTarget(host, port, username, private_key_pem, host_key)
    conn = wait_for_ssh(target, deadline_s=30)        # first contact: retries until sshd answers
    conn.makedirs(".stackml/job")
    conn.put_bytes(data, ".stackml/job/job.json", 0o600)
    later = connection(target, timeout=60)            # reuses the live transport in this process

Every wait has a timeout and every failure is a typed error rooted in BackendError:
SSHUnreachable (cannot connect), HostKeyMismatch, SSHTimeout, ConnectionLost (the transport
died under us), RemoteCommandError (the command exited non-zero, or was killed by a signal).
Missing remote files raise FileNotFoundError from the SFTP helpers (stat() returns None).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import io
import logging
import os
import select
import shlex
import socket
import stat
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, cast

import paramiko
from paramiko.common import cMSG_CHANNEL_REQUEST
from paramiko.message import Message

from service.domain.errors import BackendError, DeadlineExceeded
from service.domain.states import FailureReason

log = logging.getLogger("stackml.ssh")

EOF_GRACE = 0.5  # after exit-status, how long to wait for EOF (a detached child may hold stdout)
AUTH_RETRY_WINDOW = 5.0  # sshd may answer before the job's key is in place: retry auth this long
CHUNK = 65536
# a command's stdout and stderr are kept up to this many bytes each (their tails): what a
# server prints (a runner rewritten by the trainer, say) never grows a worker's memory unbounded
MAX_OUTPUT = 32 << 20
TAIL = 2000


# --------------------------------------------------------------------------- errors


class SSHError(BackendError):
    """Something went wrong talking SSH to a server."""

    code = "ssh_error"
    reason: str = FailureReason.SSH_ERROR


class SSHUnreachable(SSHError):
    """No SSH session could be established (refused, no route, no banner, auth refused)."""

    reason: str = FailureReason.SSH_UNREACHABLE


class SSHAuthenticationFailed(SSHUnreachable):
    """sshd answered but refused the job's key."""


class HostKeyMismatch(SSHError):
    """The server presented a host key other than the pinned one: not the server we booted."""

    reason: str = FailureReason.HOST_KEY_MISMATCH


class SSHTimeout(SSHError, DeadlineExceeded):
    """An SSH operation ran past its timeout (the server may be frozen or partitioned)."""

    reason: str = FailureReason.TIMEOUT


class ConnectionLost(SSHError):
    """The transport died under an operation: the server vanished or was killed."""

    reason: str = FailureReason.SERVER_LOST


class RemoteCommandError(SSHError):
    """A remote command exited non-zero (returncode -1: it was killed by a signal)."""

    reason: str = FailureReason.REMOTE_COMMAND_FAILED

    def __init__(
        self, returncode: int, command: str, stderr_tail: str, stdout_tail: str = ""
    ) -> None:
        self.returncode = returncode
        self.command = command
        self.stderr_tail = stderr_tail
        self.stdout_tail = stdout_tail
        shown = command if len(command) <= 120 else command[:117] + "..."
        if returncode == -1:
            what = "was killed by a signal (out of memory, or killed)"
        else:
            what = f"exited with status {returncode}"
        last = stderr_tail.strip().splitlines()[-1:] or stdout_tail.strip().splitlines()[-1:]
        message = f"remote command `{shown}` {what}" + (f": {last[0]}" if last else "")
        super().__init__(
            message, details={"returncode": returncode, "stderr_tail": stderr_tail[-500:]}
        )


# --------------------------------------------------------------------------- records


@dataclass(frozen=True)
class SSHTarget:
    host: str
    port: int
    username: str
    private_key_pem: str
    host_key: str | None = None  # "ssh-ed25519 AAAA..." to pin; None: trust on first use

    def __repr__(self) -> str:  # never print the private key
        return f"SSHTarget({self.username}@{self.host}:{self.port})"

    @property
    def key_fingerprint(self) -> str:
        return hashlib.sha256(self.private_key_pem.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class CommandResult:
    returncode: int
    stdout: bytes
    stderr: bytes

    @property
    def text(self) -> str:
        return self.stdout.decode(errors="replace")

    def checked(self, command: str) -> CommandResult:
        """This result, or RemoteCommandError (with the output's tails) when `command` failed."""
        if self.returncode != 0:
            raise RemoteCommandError(
                self.returncode,
                command,
                self.stderr[-TAIL:].decode(errors="replace"),
                self.stdout[-TAIL:].decode(errors="replace"),
            )
        return self


@dataclass(frozen=True)
class RemoteStat:
    st_size: int
    st_mode: int
    st_mtime: float
    st_uid: int
    st_gid: int


# --------------------------------------------------------------------------- keys


def generate_keypair(comment: str = "stackml") -> tuple[str, str]:
    """A fresh ed25519 key pair: (OpenSSH-format private PEM, "ssh-ed25519 AAAA... comment")."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    ).decode()
    public = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    return pem, f"{public.decode()} {comment}".strip()


def _load_private_key(pem: str) -> paramiko.PKey:
    for cls in (paramiko.Ed25519Key, paramiko.ECDSAKey, paramiko.RSAKey):
        try:
            return cast(paramiko.PKey, cls.from_private_key(io.StringIO(pem)))
        except (paramiko.SSHException, ValueError):
            continue
    raise SSHError(
        "the job's private key is not an ed25519, ECDSA or RSA key", reason=FailureReason.BAD_KEY
    )


def _parse_host_key(line: str) -> paramiko.PKey:
    try:
        kind, data = line.split()[:2]
        return paramiko.PKey.from_type_string(kind, base64.b64decode(data))
    except (ValueError, paramiko.SSHException, TypeError) as e:
        raise SSHError(
            f"cannot parse the pinned host key {line[:40]!r}", reason=FailureReason.BAD_KEY
        ) from e


# --------------------------------------------------------------------------- logging


_quiet_lock = threading.Lock()
_quiet_depth = 0
_quiet_saved = logging.NOTSET


@contextlib.contextmanager
def _quiet_paramiko() -> Iterator[None]:
    """Silence paramiko's tracebacks for the failed attempts of a retry loop."""
    global _quiet_depth, _quiet_saved
    logger = logging.getLogger("paramiko")
    with _quiet_lock:
        if _quiet_depth == 0:
            _quiet_saved = logger.level
            logger.setLevel(logging.CRITICAL + 1)
        _quiet_depth += 1
    try:
        yield
    finally:
        with _quiet_lock:
            _quiet_depth -= 1
            if _quiet_depth == 0:
                logger.setLevel(_quiet_saved)


# --------------------------------------------------------------------------- connection


class SSHConnection:
    """One authenticated SSH transport; commands each get a channel, SFTP shares one client.

    Safe to use from several threads (channels are independent; SFTP calls are serialised).
    """

    def __init__(self, target: SSHTarget, client: paramiko.SSHClient, timeout: float) -> None:
        self.target = target
        self.client = client
        transport = client.get_transport()
        if transport is None:
            raise SSHUnreachable(f"{target}: no transport after connecting")
        self.transport: paramiko.Transport = transport
        self.timeout = timeout  # default for SFTP operations
        self._pid = os.getpid()
        self._sftp: paramiko.SFTPClient | None = None
        self._sftp_lock = threading.Lock()

    @classmethod
    def open(cls, target: SSHTarget, timeout: float = 30.0) -> SSHConnection:
        """Connect once (no retries); see wait_for_ssh for first contact with a booting server."""
        pkey = _load_private_key(target.private_key_pem)
        where = f"{target.username}@{target.host}:{target.port}"
        try:
            sock = socket.create_connection((target.host, target.port), timeout=timeout)
        except OSError as e:  # refused, unreachable, timed out
            raise SSHUnreachable(f"cannot connect to {where}: {e}") from e
        # paramiko never sets it: without it every exchange waits out Nagle + delayed ACK
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock = _QuickAck(sock)  # type: ignore[assignment]
        client = paramiko.SSHClient()
        if target.host_key:
            name = target.host if target.port == 22 else f"[{target.host}]:{target.port}"
            key = _parse_host_key(target.host_key)
            client.get_host_keys().add(name, key.get_name(), key)
            client.set_missing_host_key_policy(paramiko.RejectPolicy())
        else:
            client.set_missing_host_key_policy(paramiko.AutoAddPolicy())
        try:
            client.connect(
                target.host,
                port=target.port,
                username=target.username,
                pkey=pkey,
                sock=sock,
                timeout=timeout,
                banner_timeout=timeout,
                auth_timeout=timeout,
                channel_timeout=timeout,
                allow_agent=False,
                look_for_keys=False,
            )
        except paramiko.BadHostKeyException as e:
            client.close()
            raise HostKeyMismatch(
                f"{where} presented a {e.key.get_name()} host key other than the pinned one"
            ) from e
        except paramiko.AuthenticationException as e:
            client.close()
            raise SSHAuthenticationFailed(f"{where} refused the key: {e}") from e
        except paramiko.SSHException as e:  # includes "Server ... not found in known_hosts"
            client.close()
            if "not found in known_hosts" in str(e):
                raise HostKeyMismatch(f"{where}: no pinned host key matches: {e}") from e
            raise SSHUnreachable(f"SSH handshake with {where} failed: {e}") from e
        except (OSError, EOFError) as e:
            client.close()
            raise SSHUnreachable(f"SSH handshake with {where} failed: {e!r}") from e
        return cls(target, client, timeout)

    # ---- state

    def is_alive(self) -> bool:
        return os.getpid() == self._pid and self.transport.is_active()

    def _lost(self) -> bool:
        t = cast(Any, self.transport)
        return not t.is_active() or t.saved_exception is not None

    def _check_usable(self) -> None:
        if os.getpid() != self._pid:
            raise ConnectionLost(f"{self.target}: this connection belongs to another process")
        if not self.transport.is_active():
            raise ConnectionLost(f"{self.target}: the SSH connection is closed")

    def _failure(self, what: str, e: BaseException) -> SSHError:
        if isinstance(e, SSHError):
            return e
        if isinstance(e, (socket.timeout, TimeoutError)):
            return SSHTimeout(f"{self.target}: {what} timed out")
        if self._lost():
            return ConnectionLost(f"{self.target}: connection lost during {what}: {e!r}")
        return SSHError(f"{self.target}: {what} failed: {e!r}")

    # ---- commands

    def run(
        self,
        argv: list[str] | str,
        timeout: float,
        input: bytes | None = None,
        check: bool = True,
    ) -> CommandResult:
        """Run a command; argv lists are quoted (a str is passed to the remote shell as is)."""
        command = argv if isinstance(argv, str) else shlex.join(argv)
        deadline = time.monotonic() + timeout
        self._check_usable()
        try:
            chan = self.transport.open_session(timeout=timeout)
        except (paramiko.SSHException, EOFError, OSError) as e:
            raise self._failure("opening a channel", e) from e
        try:
            self._request(chan, "exec", command, deadline)
            out, err = self._collect(chan, input, deadline, command)
            status = chan.exit_status
        except SSHTimeout:
            self._signal(chan, "KILL")  # sshd kills the command's process group
            raise
        except SSHError:
            raise
        except (OSError, EOFError, paramiko.SSHException) as e:
            raise self._failure(f"running `{command[:80]}`", e) from e
        finally:
            with contextlib.suppress(Exception):
                chan.close()
        if status == -1 and self._lost_soon():
            raise ConnectionLost(
                f"{self.target}: connection lost while `{command[:80]}` ran (the server went away)"
            )
        result = CommandResult(status, bytes(out), bytes(err))
        return result.checked(command) if check else result

    def _lost_soon(self) -> bool:
        """A channel closed without an exit status: the transport died, or a signal killed the
        command. Paramiko closes channels a moment before it marks the transport dead."""
        end = time.monotonic() + 0.2
        while True:
            if self._lost():
                return True
            if time.monotonic() > end:
                return False
            time.sleep(0.005)

    def _request(self, chan: paramiko.Channel, kind: str, arg: str, deadline: float) -> None:
        """Channel.exec_command/invoke_subsystem with a deadline (paramiko's wait forever)."""
        c = cast(Any, chan)
        m = Message()
        m.add_byte(cMSG_CHANNEL_REQUEST)
        m.add_int(c.remote_chanid)
        m.add_string(kind)
        m.add_boolean(True)
        m.add_string(arg)
        c._event_pending()
        c.transport._send_user_message(m)
        if not c.event.wait(max(0.0, deadline - time.monotonic())):
            raise SSHTimeout(f"{self.target}: no answer to the {kind} request")
        if not c.event_ready:
            if self._lost_soon():
                raise ConnectionLost(f"{self.target}: connection lost before {kind} started")
            raise SSHError(f"{self.target}: the server refused the {kind} request")

    def _signal(self, chan: paramiko.Channel, name: str) -> None:
        c = cast(Any, chan)
        with contextlib.suppress(Exception):
            m = Message()
            m.add_byte(cMSG_CHANNEL_REQUEST)
            m.add_int(c.remote_chanid)
            m.add_string("signal")
            m.add_boolean(False)
            m.add_string(name)
            c.transport._send_user_message(m)

    def _collect(
        self, chan: paramiko.Channel, input: bytes | None, deadline: float, command: str
    ) -> tuple[bytearray, bytearray]:
        """Feed stdin and drain stdout and stderr together (a full window on one of them would
        stall the other) until EOF + exit status, under the deadline."""
        out, err = bytearray(), bytearray()
        pending = memoryview(input) if input else None
        if pending is None:
            chan.shutdown_write()
        fd = chan.fileno()
        status_at: float | None = None
        while True:
            while chan.recv_ready():
                out += chan.recv(CHUNK)
                _keep_tail(out)
            while chan.recv_stderr_ready():
                err += chan.recv_stderr(CHUNK)
                _keep_tail(err)
            if pending is not None:
                try:
                    while len(pending) and chan.send_ready():
                        pending = pending[chan.send(bytes(pending[:32768])) :]
                    if not len(pending):
                        chan.shutdown_write()
                        pending = None
                except OSError:
                    # the channel closed under us: the command exited without reading all of
                    # its input (fine), or the transport died (told by the exit status below)
                    pending = None
            now = time.monotonic()
            if chan.eof_received:
                # data precedes EOF on the wire: all of it is here; the status is due now
                if not chan.status_event.wait(max(0.0, deadline - now)):
                    raise SSHTimeout(f"{self.target}: `{command[:80]}` sent EOF but no status")
                break
            if chan.status_event.is_set():
                if chan.closed:
                    break
                # exited, but its output is still open: in flight, or held by a detached child
                status_at = status_at or now
                if now - status_at >= EOF_GRACE:
                    break
            if now >= deadline:
                raise SSHTimeout(f"{self.target}: `{command[:80]}` did not finish in time")
            if pending is not None:
                wait = 0.002  # window space does not wake select
            elif status_at is not None:
                wait = EOF_GRACE
            else:
                wait = 0.1  # the exit status does not wake select either
            select.select([fd], [], [], min(wait, deadline - now))
        while chan.recv_ready():
            out += chan.recv(CHUNK)
            _keep_tail(out)
        while chan.recv_stderr_ready():
            err += chan.recv_stderr(CHUNK)
            _keep_tail(err)
        return out, err

    # ---- SFTP

    def _sftp_client(self, timeout: float) -> paramiko.SFTPClient:
        if self._sftp is not None and not self._sftp.sock.closed:
            self._sftp.sock.settimeout(timeout)
            return self._sftp
        self._check_usable()
        deadline = time.monotonic() + timeout
        chan = self.transport.open_session(timeout=timeout)
        try:
            self._request(chan, "subsystem", "sftp", deadline)
            chan.settimeout(timeout)
            self._sftp = paramiko.SFTPClient(chan)
        except BaseException:
            chan.close()
            raise
        return self._sftp

    @contextlib.contextmanager
    def _sftp_op(self, what: str, timeout: float | None) -> Iterator[paramiko.SFTPClient]:
        t = self.timeout if timeout is None else timeout
        with self._sftp_lock:
            try:
                yield self._sftp_client(t)
            except FileNotFoundError:
                raise
            except SSHError:
                raise
            except (OSError, EOFError, paramiko.SSHException) as e:
                raise self._failure(what, e) from e

    def put_bytes(
        self, data: bytes, remote: str, mode: int = 0o644, *, timeout: float | None = None
    ) -> None:
        """Write `remote` atomically (temp file + rename) with `mode`."""
        tmp = f"{remote}.tmp-{os.getpid()}-{threading.get_ident()}"
        with self._sftp_op(f"writing {remote}", timeout) as sftp:
            try:
                with sftp.open(tmp, "wb") as fh:
                    fh.set_pipelined(True)
                    fh.write(data)
                sftp.chmod(tmp, mode)
                sftp.posix_rename(tmp, remote)
            except BaseException:
                _discard(sftp, tmp)
                raise

    def makedirs(self, remote: str, mode: int = 0o755, *, timeout: float | None = None) -> None:
        """`mkdir -p remote` over SFTP (no remote process started)."""
        parts = [p for p in remote.split("/") if p not in ("", ".")]
        root = "/" if remote.startswith("/") else ""
        with self._sftp_op(f"creating {remote}", timeout) as sftp:
            for i in range(len(parts)):
                path = root + "/".join(parts[: i + 1])
                try:
                    sftp.mkdir(path, mode)
                except OSError as e:
                    a = sftp.stat(path)  # FileNotFoundError when a parent is not a directory
                    if not stat.S_ISDIR(a.st_mode or 0):
                        raise NotADirectoryError(f"{path} exists and is not a directory") from e

    def put_file(
        self,
        local: str | os.PathLike[str],
        remote: str,
        mode: int = 0o644,
        *,
        timeout: float | None = None,
    ) -> None:
        """Upload a local file atomically (temp file + rename) with `mode`."""
        tmp = f"{remote}.tmp-{os.getpid()}-{threading.get_ident()}"
        with self._sftp_op(f"uploading {remote}", timeout) as sftp:
            try:
                sftp.put(os.fspath(local), tmp, confirm=True)
                sftp.chmod(tmp, mode)
                sftp.posix_rename(tmp, remote)
            except BaseException:
                _discard(sftp, tmp)
                raise

    def read_file_from(
        self,
        remote: str,
        offset: int = 0,
        max_bytes: int = 1 << 20,
        *,
        timeout: float | None = None,
    ) -> bytes:
        """Up to `max_bytes` of `remote` from `offset` (b"" at or past its end); reads only what
        the file held when asked, so a growing log never makes the prefetcher run past EOF."""
        with self._sftp_op(f"reading {remote}", timeout) as sftp, sftp.open(remote, "rb") as fh:
            size = fh.stat().st_size or 0
            end = min(size, offset + max_bytes)
            if end <= offset:
                return b""
            n = end - offset
            if n <= fh.MAX_REQUEST_SIZE:
                fh.seek(offset)
                return bytes(fh.read(n))
            try:
                return b"".join(fh.readv([(offset, n)]))
            except EOFError:  # truncated meanwhile: read what is left, one request at a time
                fh.seek(offset)
                chunks = []
                while n > 0 and (chunk := fh.read(min(n, fh.MAX_REQUEST_SIZE))):
                    chunks.append(chunk)
                    n -= len(chunk)
                return b"".join(chunks)

    def stat(self, remote: str, *, timeout: float | None = None) -> RemoteStat | None:
        """The remote file's attributes, None when it does not exist."""
        try:
            with self._sftp_op(f"stat {remote}", timeout) as sftp:
                a = sftp.stat(remote)
        except FileNotFoundError:
            return None
        return RemoteStat(
            st_size=a.st_size or 0,
            st_mode=a.st_mode or 0,
            st_mtime=float(a.st_mtime or 0),
            st_uid=a.st_uid or 0,
            st_gid=a.st_gid or 0,
        )

    def exists(self, remote: str, *, timeout: float | None = None) -> bool:
        return self.stat(remote, timeout=timeout) is not None

    # ---- lifetime

    def close(self) -> None:
        if os.getpid() != self._pid:
            return  # the parent's transport: closing it here would corrupt the parent's stream
        with contextlib.suppress(Exception):
            if self._sftp is not None:
                self._sftp.close()
        self._sftp = None
        with contextlib.suppress(Exception):
            self.client.close()

    def __enter__(self) -> SSHConnection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "alive" if self.is_alive() else "closed"
        return (
            f"<SSHConnection {self.target.username}@{self.target.host}:{self.target.port} {state}>"
        )


class _QuickAck:
    """The connection's socket, acknowledging what it receives at once (TCP_QUICKACK after
    every read) for its first QUICKACK_READS reads. sshd sets TCP_NODELAY only when it starts a
    session's command: before that, its answer to the first channel open waits (Nagle) for the
    ACK of what it sent right after authentication, which Linux delays ~40 ms -- every new
    connection's first command took 45 ms instead of 3."""

    QUICKACK_READS = 64

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._left = self.QUICKACK_READS

    def recv(self, n: int) -> bytes:
        data = self._sock.recv(n)
        if self._left > 0:
            self._left -= 1
            with contextlib.suppress(OSError):
                self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)
        return data

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)


def _discard(sftp: paramiko.SFTPClient, path: str) -> None:
    with contextlib.suppress(OSError, EOFError, paramiko.SSHException):
        sftp.remove(path)


def wait_for_ssh(
    target: SSHTarget, deadline_s: float, *, attempt_timeout: float = 10.0
) -> SSHConnection:
    """Connect to a (maybe still booting) server, retrying until `deadline_s` runs out.

    Retries refused/unreachable/timed-out connects and missing banners; retries a refused key
    for AUTH_RETRY_WINDOW only; a host key mismatch fails at once. The connection is cached.
    """
    deadline = time.monotonic() + deadline_s
    delay = 0.02
    auth_failed_since: float | None = None
    last: SSHError | None = None
    with _quiet_paramiko():
        while True:
            remaining = deadline - time.monotonic()
            try:
                conn = SSHConnection.open(target, timeout=max(0.1, min(attempt_timeout, remaining)))
                _remember(conn)
                return conn
            except HostKeyMismatch:
                raise
            except SSHAuthenticationFailed as e:
                last = e
                now = time.monotonic()
                auth_failed_since = auth_failed_since or now
                if now - auth_failed_since > AUTH_RETRY_WINDOW:
                    raise
            except SSHUnreachable as e:
                last = e
            if time.monotonic() + delay >= deadline:
                raise SSHUnreachable(
                    f"{target} did not accept SSH within {deadline_s:.0f}s: {last}"
                ) from last
            time.sleep(delay)
            delay = min(delay * 1.5, 1.0)


# --------------------------------------------------------------------------- the cache


RECONNECT_WINDOW = 5.0
_CacheKey = tuple[str, int, str, str, str]
_cache: dict[_CacheKey, SSHConnection] = {}
_cache_lock = threading.Lock()
_cache_pid = os.getpid()


def _key(target: SSHTarget) -> _CacheKey:
    return (target.host, target.port, target.username, target.key_fingerprint,
            target.host_key or "")  # fmt: skip


def _forget_after_fork() -> None:
    """In a forked child the parent's transports are not ours: drop them without closing."""
    global _cache_lock, _cache_pid
    _cache_lock = threading.Lock()
    _cache.clear()
    _cache_pid = os.getpid()


os.register_at_fork(after_in_child=_forget_after_fork)


def _check_pid() -> None:
    if os.getpid() != _cache_pid:
        _forget_after_fork()


def _remember(conn: SSHConnection) -> None:
    _check_pid()
    with _cache_lock:
        old = _cache.get(_key(conn.target))
        _cache[_key(conn.target)] = conn
    if old is not None and old is not conn:
        old.close()


def connection(target: SSHTarget, timeout: float = 30.0) -> SSHConnection:
    """A live connection to `target`, reused across calls in this process. A new connect is
    retried for a few seconds (RECONNECT_WINDOW): a loaded sshd may drop a handshake or refuse a
    key once, which must not fail a job that was running fine."""
    _check_pid()
    key = _key(target)
    with _cache_lock:
        conn = _cache.get(key)
        if conn is not None and conn.is_alive():
            conn.timeout = timeout
            return conn
        _cache.pop(key, None)
    if conn is not None:
        conn.close()
    window = min(timeout, RECONNECT_WINDOW)
    conn = wait_for_ssh(target, window, attempt_timeout=timeout)
    conn.timeout = timeout
    return conn


def drop(target: SSHTarget) -> None:
    """Forget (and close) the cached connection to `target`, e.g. after an error."""
    _check_pid()
    with _cache_lock:
        conn = _cache.pop(_key(target), None)
    if conn is not None:
        conn.close()


def close_all() -> None:
    """Close every cached connection of this process (safe to call in a forked child)."""
    _check_pid()
    with _cache_lock:
        conns = list(_cache.values())
        _cache.clear()
    for conn in conns:
        conn.close()


def drop_host(host: str, port: int) -> None:
    """Forget (and close) every cached connection to host:port (its server was deleted)."""
    _check_pid()
    with _cache_lock:
        keys = [k for k in _cache if k[0] == host and k[1] == port]
        conns = [_cache.pop(k) for k in keys]
    for conn in conns:
        conn.close()


def _keep_tail(buf: bytearray) -> None:
    """Drop the head of a command's output past MAX_OUTPUT bytes (the tail, with its last
    line, is what callers read)."""
    if len(buf) > MAX_OUTPUT:
        del buf[: len(buf) - MAX_OUTPUT]
