"""Where a run's CPU went, by part: the control plane (API, workers, beat, PostgreSQL, Redis),
the bench's own client threads, and the rest of the machine (the emulated cloud: the sandboxes'
sshd, the runner and trainer on them, the sandbox backend's tools).

Read from /proc (psutil) at the start and the end of a run:
- a topology service's part is the user + system CPU of every process in its session (each
  service is started in a session of its own, tests/topology.py);
- a Celery worker's children that exited (the sandbox backend's `ip`, `useradd`, a sandbox's
  sshd and what ran under it) are charged to the emulated cloud, not to the worker: on
  OpenStack they run on Nova's hosts;
- PostgreSQL's part is every `postgres` process plus what the postmaster reaped (backends that
  exited); Redis's part is its server process;
- the rest is the machine's busy time (/proc/stat) less all of the above.

The figures are CPU seconds, not wall time: they say how many jobs a second the control plane
could carry on the cores it has, whatever else shares them here.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass

import psutil


def _busy() -> float:
    """The machine's busy CPU seconds since boot (every core), from /proc/stat."""
    t = psutil.cpu_times()
    return t.user + t.nice + t.system + getattr(t, "irq", 0.0) + getattr(t, "softirq", 0.0)


def _own(p: psutil.Process) -> tuple[float, float]:
    """(own CPU, reaped children's CPU) of a process; (0, 0) once it is gone."""
    try:
        t = p.cpu_times()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return 0.0, 0.0
    return t.user + t.system, t.children_user + t.children_system


def _session(sid: int) -> list[psutil.Process]:
    out = []
    for p in psutil.process_iter():
        try:
            if os.getsid(p.pid) == sid:
                out.append(p)
        except OSError:
            continue
    return out


def _named(name: str) -> list[psutil.Process]:
    out = []
    for p in psutil.process_iter(["name"]):
        if (p.info["name"] or "").startswith(name):
            out.append(p)
    return out


@dataclass
class Snapshot:
    busy: float
    parts: dict[str, dict[int, float]]  # part -> pid -> CPU seconds charged to it so far


class CpuAccount:
    """`start()` then `stop()` around a run; `per_job(n)` the CPU milliseconds a job cost each
    part. `services` maps a part's name to its session leaders' pids (the topology's services);
    the bench's own process is its own part ("clients")."""

    def __init__(self, services: dict[str, list[int]]) -> None:
        self.services = services
        self.first: Snapshot | None = None
        self.last: Snapshot | None = None

    def _snap(self) -> Snapshot:
        parts: dict[str, dict[int, float]] = {}
        for part, sids in self.services.items():
            parts[part] = {p.pid: _own(p)[0] for sid in sids for p in _session(sid)}
        parts["postgresql"] = {p.pid: sum(_own(p)) for p in _named("postgres")}
        parts["redis"] = {p.pid: _own(p)[0] for p in _named("redis-server")}
        me = psutil.Process()
        parts["clients"] = {me.pid: _own(me)[0]}
        return Snapshot(_busy(), parts)

    def start(self) -> None:
        self.first = self._snap()

    def stop(self) -> None:
        self.last = self._snap()

    def seconds(self) -> dict[str, float]:
        """CPU seconds each part used between start and stop, and "cloud" for the rest."""
        assert self.first is not None and self.last is not None
        out: dict[str, float] = {}
        for part, now in self.last.parts.items():
            before = self.first.parts.get(part, {})
            out[part] = sum(max(0.0, t - before.get(pid, 0.0)) for pid, t in now.items())
        busy = self.last.busy - self.first.busy
        out["cloud"] = max(0.0, busy - sum(out.values()))
        out["machine"] = busy
        return out

    def per_job(self, jobs: int, control: Iterable[str]) -> dict[str, float]:
        """CPU milliseconds per job of each part, "control_plane" their sum over `control`."""
        secs = self.seconds()
        out = {k: round(v * 1000 / jobs, 1) for k, v in secs.items()}
        out["control_plane"] = round(sum(secs[k] for k in control) * 1000 / jobs, 1)
        return out
