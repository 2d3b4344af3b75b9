"""Production entry points make the data dir private as `stackml up` does: gunicorn's
`service.wsgi` and a celery worker or beat started directly (docs/operations.md). And a worker
lowers its CPU priority by `worker_nice` when it starts (before its pool forks), so that on a
host it shares with the API requests are answered first; beat does not."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from service.config import Settings

ROOT = Path(__file__).resolve().parents[2]

# prints the process umask after the entry point ran, whether the app is a Flask app, its routes
WSGI = """
import json, os
os.umask(0o022)  # whatever the test process had: the entry point must set it
import service.wsgi as w
from flask import Flask
flask_app = w.{attr}
rules = sorted(r.rule for r in flask_app.url_map.iter_rules())
print(json.dumps([oct(os.umask(0o022)), isinstance(flask_app, Flask), rules]))
"""
SIGNAL = """
import os
os.umask(0o022)
import celery.signals as sig, workers.celery_app
sig.{signal}.send(sender=None)
print(oct(os.umask(0o022)))
"""


# the niceness before and after the signal
NICENESS = """
import json, os
import celery.signals as sig, workers.celery_app
before = os.nice(0)
sig.{signal}.send(sender=None)
print(json.dumps([before, os.nice(0)]))
"""


def _run(code: str, data_dir: Path, **settings: str) -> str:
    env = {k: v for k, v in os.environ.items() if k != "STACKML_WORKER_NICE"} | {
        "STACKML_DATA_DIR": str(data_dir),
        "STACKML_DATABASE_URL": f"sqlite:///{data_dir}/stackml.db",
        **{f"STACKML_{k.upper()}": v for k, v in settings.items()},
    }
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout.strip()


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.parametrize("attr", ["app", "gateway"])
def test_wsgi_entry_point_makes_a_new_data_dir_private(tmp_path: Path, attr: str) -> None:
    data_dir = tmp_path / "data"
    umask, is_flask, rules = json.loads(_run(WSGI.format(attr=attr), data_dir))
    assert umask == "0o77"
    assert is_flask is True
    assert _mode(data_dir) == 0o700
    if attr == "gateway":  # the gateway serves the signed store routes and nothing else
        assert all(r.startswith("/v1/store") or r.startswith("/static") for r in rules)


def test_wsgi_entry_point_tightens_a_loose_data_dir_and_database(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    data_dir.mkdir(mode=0o755)
    os.chmod(data_dir, 0o755)
    db = data_dir / "stackml.db"
    db.write_bytes(b"")
    os.chmod(db, 0o644)
    _run(WSGI.format(attr="app"), data_dir)
    assert _mode(data_dir) == 0o700
    assert _mode(db) == 0o600


@pytest.mark.parametrize("signal", ["worker_init", "beat_init"])
def test_celery_worker_and_beat_make_the_data_dir_private(tmp_path: Path, signal: str) -> None:
    data_dir = tmp_path / "data"
    data_dir.mkdir(mode=0o755)
    os.chmod(data_dir, 0o755)
    assert _run(SIGNAL.format(signal=signal), data_dir) == "0o77"
    assert _mode(data_dir) == 0o700


@pytest.mark.parametrize(("nice", "by"), [(None, 10), ("3", 3), ("0", 0)])
def test_a_worker_lowers_its_priority_by_worker_nice(
    tmp_path: Path, nice: str | None, by: int
) -> None:
    settings = {} if nice is None else {"worker_nice": nice}
    before, after = json.loads(_run(NICENESS.format(signal="worker_init"), tmp_path, **settings))
    assert after == min(19, before + by)  # (the kernel caps niceness at 19)


def test_beat_keeps_its_priority(tmp_path: Path) -> None:
    out = _run(NICENESS.format(signal="beat_init"), tmp_path, worker_nice="10")
    before, after = json.loads(out)
    assert after == before


@pytest.mark.parametrize("bad", [-1, 20])
def test_worker_nice_out_of_range_is_refused(bad: int) -> None:
    with pytest.raises(ValidationError, match="worker_nice"):
        Settings(worker_nice=bad)
