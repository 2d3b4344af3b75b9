"""bench_burst's account of the CPU each Celery task costs a worker pool process.

bench/bench_burst.py puts this directory on the worker processes' PYTHONPATH and names a
directory in BENCH_TASK_CPU_DIR; Python imports this module at start-up (site), and in a Celery
worker it records, per task name, the pool process's CPU time of each task run (all threads: a
step's SSH transport and lease heartbeat count with it) from task_prerun to task_postrun, in
ms, written to <dir>/<pid>.json every 50 tasks and when the pool process ends. Anything else that
starts with this path (the API, the beat) is left alone. Nothing of stackml imports it.
With BENCH_TASK_PROFILE set (to a task name, or `all`) it also runs those tasks under cProfile
and writes the pool process's profile to <dir>/<pid>.prof (`python -m pstats`).
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

_DIR = os.environ.get("BENCH_TASK_CPU_DIR")

if _DIR and "celery" in " ".join(sys.argv[:3]) and "worker" in sys.argv:
    from celery import signals

    _stats: dict[str, list[float]] = {}  # task name -> each task's CPU ms
    _started: dict[str, float] = {}
    _done = [0]
    _which = os.environ.get("BENCH_TASK_PROFILE")
    _profile = None
    if _which:
        import cProfile

        _profile = cProfile.Profile(time.process_time)  # CPU, all threads: as the account

    def _profiled(name: str) -> bool:
        return _profile is not None and _which in ("all", name)

    def _write() -> None:
        if _profile is not None:
            _profile.dump_stats(os.path.join(_DIR, f"{os.getpid()}.prof"))
        if _stats:
            path = os.path.join(_DIR, f"{os.getpid()}.json")
            with open(path + ".tmp", "w") as f:
                json.dump(_stats, f)
            os.replace(path + ".tmp", path)

    @signals.task_prerun.connect
    def _pre(task_id: str | None = None, task: Any = None, **_: Any) -> None:
        if task_id is not None:
            _started[task_id] = time.process_time()
        if _profile is not None and task is not None and _profiled(task.name):
            _profile.enable()

    @signals.task_postrun.connect
    def _post(task_id: str | None = None, task: Any = None, **_: Any) -> None:
        if _profile is not None and task is not None and _profiled(task.name):
            _profile.disable()
        t0 = _started.pop(task_id or "", None)
        if t0 is None or task is None:
            return
        _stats.setdefault(task.name, []).append(round((time.process_time() - t0) * 1000, 2))
        _done[0] += 1
        if _done[0] % 50 == 0:
            _write()

    @signals.worker_process_shutdown.connect
    def _shutdown(**_: Any) -> None:
        _write()
