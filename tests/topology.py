"""The production topology of docs/operations.md as processes, for the scale-out test and
bench/bench_burst.py: gunicorn API processes on one port, Celery worker processes, one beat and
(with isolated sandboxes) the store gateway. Each is a devcloud.process.Service: its own process
group and console log `<run_dir>/<name>.log`, stopped group and all."""

from __future__ import annotations

import sys
from pathlib import Path
from types import TracebackType

from devcloud.process import Service, http_ok
from service.config import REPO_ROOT

PY = sys.executable


def api_argv(app: str, bind: str, processes: int, *extra: str) -> list[str]:
    """gunicorn serving `app` (service.wsgi:app or :gateway) with 8 threads a process."""
    return [
        PY, "-m", "gunicorn", app, "-b", bind, "-w", str(processes), "-k", "gthread",
        "--threads", "8", "--graceful-timeout", "5", *extra,
    ]  # fmt: skip


def worker_argv(name: str, concurrency: int = 2) -> list[str]:
    return [
        PY, "-m", "celery", "-A", "workers.celery_app:app", "worker",
        f"--concurrency={concurrency}", "--pool=prefork", "-n", f"{name}@%h",
        "--without-gossip", "--without-mingle", "--loglevel=INFO",
    ]  # fmt: skip


def beat_argv(schedule: Path) -> list[str]:
    return [
        PY, "-m", "celery", "-A", "workers.celery_app:app", "beat",
        "--schedule", str(schedule), "--loglevel=WARNING",
    ]  # fmt: skip


class Topology:
    """Processes started by `start`, all stopped on exit (the first failure to stop raised
    once every one was tried)."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self.services: list[Service] = []

    def start(self, name: str, argv: list[str], env: dict[str, str]) -> Service:
        svc = Service(name, self.run_dir)
        self.services.append(svc)
        svc.start(argv, env=env, cwd=REPO_ROOT)
        return svc

    def wait_api(self, api: Service, url: str, deadline_s: float = 60) -> None:
        """Until GET /readyz answers 2xx; fails at once when any process exited."""

        def ready() -> bool:
            dead = [s.name for s in self.services if not s.running()]
            if dead:
                raise AssertionError(f"{dead} exited at start; see {self.run_dir}")
            return http_ok(f"{url}/readyz", timeout=5)

        api.wait_ready(ready, deadline_s)

    def __enter__(self) -> Topology:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        errors: list[Exception] = []
        for svc in reversed(self.services):
            try:
                svc.stop()
            except Exception as e:  # noqa: BLE001 - stop the others, then raise the first
                errors.append(e)
        if errors and exc is None:
            raise errors[0]
