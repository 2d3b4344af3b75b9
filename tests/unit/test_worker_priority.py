"""A Celery worker lowers its CPU priority by `worker_nice` when it starts (before its pool
forks), so that on a host it shares with the API requests are answered first; beat does not."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from service.config import Settings

ROOT = Path(__file__).resolve().parents[2]

# the niceness before and after the signal, in a fresh process
SIGNAL = """
import json, os
import celery.signals as sig, workers.celery_app
before = os.nice(0)
sig.{signal}.send(sender=None)
print(json.dumps([before, os.nice(0)]))
"""


def _niceness(signal: str, data_dir: Path, nice: str | None) -> tuple[int, int]:
    env = {k: v for k, v in os.environ.items() if k != "STACKML_WORKER_NICE"} | {
        "STACKML_DATA_DIR": str(data_dir),
        "STACKML_DATABASE_URL": f"sqlite:///{data_dir}/stackml.db",
    }
    if nice is not None:
        env["STACKML_WORKER_NICE"] = nice
    out = subprocess.run(
        [sys.executable, "-c", SIGNAL.format(signal=signal)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    before, after = json.loads(out.stdout.strip().splitlines()[-1])
    return before, after


@pytest.mark.parametrize(("nice", "by"), [(None, 10), ("3", 3), ("0", 0)])
def test_a_worker_lowers_its_priority_by_worker_nice(
    tmp_path: Path, nice: str | None, by: int
) -> None:
    before, after = _niceness("worker_init", tmp_path, nice)
    assert after == min(19, before + by)  # (the kernel caps niceness at 19)


def test_beat_keeps_its_priority(tmp_path: Path) -> None:
    before, after = _niceness("beat_init", tmp_path, "10")
    assert after == before


@pytest.mark.parametrize("bad", [-1, 20])
def test_worker_nice_out_of_range_is_refused(bad: int) -> None:
    with pytest.raises(ValidationError, match="worker_nice"):
        Settings(worker_nice=bad)
