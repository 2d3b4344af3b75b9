"""repo.append_log on SQLite: a metric the database cannot hold (SQLite's 64-bit INTEGER
overflows, as a 20-digit step did) costs the log nothing, and later lines are still read."""

from __future__ import annotations

from pathlib import Path

import pytest

from service.db import jobs as repo
from service.db.migrate import upgrade
from service.db.session import session_scope
from service.domain.metrics import MetricPoint, ParsedLine
from service.domain.spec import JobSpec

SPEC = JobSpec.model_validate(
    {"name": "x", "trainer": {"package_uri": "local://p/x.tar.gz", "module": "t"}}
)


def test_a_point_sqlite_cannot_hold_is_skipped_and_the_bytes_are_stored(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    upgrade(url)
    with session_scope(url) as s:
        job_id = repo.create_job(s, "p", SPEC).id
    # a parser that lets a 20-digit step through (the database is the last line of defence)
    monkeypatch.setattr(
        repo,
        "inspect_metric_line",
        lambda raw: ParsedLine((MetricPoint("loss", 1.0, 10**20, None),)),
    )
    line = b'{"stackml_metric": 1, "step": 100000000000000000000, "loss": 1}\n'
    with session_scope(url) as s:
        assert repo.append_log(s, job_id, 0, line) == len(line)
    monkeypatch.undo()
    with session_scope(url) as s:
        assert repo.read_log(s, job_id)[0] == line
        assert repo.metrics(s, job_id) == {}
        assert "too large" in repo.events(s, job_id)[-1].message
        more = b'{"stackml_metric": 1, "step": 2, "loss": 0.5}\n'
        assert repo.append_log(s, job_id, len(line), more) == len(line) + len(more)
    with session_scope(url) as s:
        assert repo.latest_metrics(s, job_id) == {"loss": 0.5}
