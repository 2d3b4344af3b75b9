"""Background service processes: started in their own session with a pidfile, waited on, stopped.

A pidfile holds the pid and the process's start time (from /proc), so a recycled pid is never
mistaken for the service; each service is its own process group, so stopping it also stops the
workers it forked.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from devcloud import DevCloudError

TERM_DEADLINE = 10.0
KILL_DEADLINE = 5.0


_given: set[int] = set()
_given_lock = threading.Lock()


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on now, for a server started a moment later.

    Drawn below the kernel's ephemeral range: a port the kernel hands out for `bind(0)` comes
    from the range its outgoing connections use too, and one of those can take it before the
    server binds it. Never the same port twice in one process."""
    low = _ephemeral_low()
    for _ in range(100):
        port = random.randrange(20000, low) if low > 21000 else 0
        with _given_lock, socket.socket() as s:
            if port in _given:
                continue
            try:
                s.bind((host, port))
            except OSError:
                continue
            port = int(s.getsockname()[1])
            _given.add(port)
            return port
    raise DevCloudError(f"no free port on {host}")


def port_taken(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) == 0


def _start_time(pid: int) -> str | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    if fields[0] == "Z":
        return None  # a zombie is gone as far as a service goes
    return fields[19]  # field 22 of stat: start time in clock ticks since boot


def _pgrp(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    return None if fields[0] == "Z" else int(fields[2])


def group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes in process group `pgid`."""
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and _pgrp(int(entry.name)) == pgid:
            out.append(int(entry.name))
    return out


def _reap(pid: int) -> None:
    # our own children (tests start the devcloud in-process) would otherwise stay zombies
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)


@dataclass(frozen=True)
class Service:
    """One named process of the devcloud: its pidfile and console log live in `run_dir`."""

    name: str
    run_dir: Path

    @property
    def pidfile(self) -> Path:
        return self.run_dir / f"{self.name}.pid"

    @property
    def log(self) -> Path:
        return self.run_dir / f"{self.name}.log"

    def pid(self) -> int | None:
        """The service's pid when it runs (the pidfile's process, same start time), else None."""
        try:
            pid_s, started = self.pidfile.read_text().split()
            pid = int(pid_s)
        except (OSError, ValueError):
            return None
        _reap(pid)
        return pid if _start_time(pid) == started else None

    def running(self) -> bool:
        return self.pid() is not None

    def start(self, argv: list[str], *, env: dict[str, str], cwd: Path) -> int:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        with open(self.log, "ab") as log:
            log.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} starting {argv[0]}\n".encode())
            try:
                proc = subprocess.Popen(
                    argv,
                    env=env,
                    cwd=cwd,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            except OSError as e:
                raise DevCloudError(f"cannot start {self.name} ({argv[0]}): {e}") from e
        started = _start_time(proc.pid) or "0"
        tmp = self.pidfile.with_suffix(".tmp")
        tmp.write_text(f"{proc.pid} {started}\n")
        os.replace(tmp, self.pidfile)
        return proc.pid

    def log_tail(self, n: int = 2000) -> str:
        try:
            data = self.log.read_bytes()
        except OSError:
            return ""
        return data[-n:].decode(errors="replace")

    def wait_ready(self, check: Callable[[], bool], deadline_s: float) -> None:
        """Until `check()`; fails fast if the process dies, DevCloudError at the deadline."""
        deadline = time.monotonic() + deadline_s
        while True:
            if not self.running():
                raise DevCloudError(
                    f"{self.name} exited during start-up; its console log ({self.log}) ends:\n"
                    f"{self.log_tail()}"
                )
            if check():
                return
            if time.monotonic() > deadline:
                raise DevCloudError(
                    f"{self.name} did not answer within {deadline_s:.0f}s; "
                    f"its console log ({self.log}) ends:\n{self.log_tail()}"
                )
            time.sleep(0.1)

    def stop(self, term_deadline: float = TERM_DEADLINE) -> bool:
        """SIGTERM the process group, SIGKILL what is left after the deadline; True if it ran."""
        pid = self.pid()
        if pid is None:
            self.pidfile.unlink(missing_ok=True)
            return False
        pgid = pid  # started with start_new_session: the leader's pid is the group id
        for sig, wait in ((signal.SIGTERM, term_deadline), (signal.SIGKILL, KILL_DEADLINE)):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pgid, sig)
            deadline = time.monotonic() + wait
            while time.monotonic() < deadline:
                _reap(pid)
                if not group_members(pgid):
                    self.pidfile.unlink(missing_ok=True)
                    return True
                time.sleep(0.05)
        left = group_members(pgid)
        raise DevCloudError(
            f"{self.name} (process group {pgid}) survived SIGKILL: pids {left}; "
            f"check `ps -o pid,stat,cmd -g {pgid}` (a process in D state waits on I/O)"
        )


def http_answers(url: str, timeout: float = 1.0) -> bool:
    """True when something answers HTTP at `url` (any status)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout):
            return True
    except urllib.error.HTTPError:
        return True
    except (urllib.error.URLError, OSError):
        return False


def http_ok(url: str, timeout: float = 1.0) -> bool:
    """True when `url` answers 2xx."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return 200 <= resp.status < 300
    except (urllib.error.URLError, OSError):
        return False
