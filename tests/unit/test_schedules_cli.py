"""`stackml schedules ...` against the real API (served on a loopback port, SQLite): create
from a job file, list, describe, pause, resume, runs (after a firing pass), delete; a bad
cron is one sentence and exit 1; `-o json` is the API's JSON.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

from click.testing import Result

from service.db.models import Schedule
from service.db.session import session_scope
from service.domain import schedules as dom
from workers.steps import schedules as firing

EVIL = "vision team"


def test_schedules_commands_end_to_end(
    run: Callable[..., Result], package_uri: str, spec, db_url: str, settings, tmp_path: Path
) -> None:
    job = spec(package_uri, labels={"team": EVIL})
    path = tmp_path / "job.json"
    path.write_text(json.dumps(job))

    res = run("schedules", "create", "nightly", "--cron", "61 * * * *", "--job", str(path))
    assert res.exit_code == 1, res.output
    assert "cron" in res.output and "not a valid cron expression" in res.output
    res = run("schedules", "create", "nightly", "--cron", "@hourly", "--job", str(tmp_path / "no"))
    assert res.exit_code == 2 and "cannot read" in res.output

    res = run(
        "schedules",
        "create",
        "nightly",
        "--cron",
        "*/10 * * * *",
        "--timezone",
        "Europe/Berlin",
        "--concurrency",
        "Allow",
        "--job",
        str(path),
    )
    assert res.exit_code == 0, res.output
    assert "created schedule nightly (sch-" in res.output and "next: " in res.output
    res = run(
        "schedules", "create", "again", "--cron", "@daily", "--job", "-", stdin=json.dumps(job)
    )
    assert res.exit_code == 0, res.output

    res = run("schedules", "list")
    assert res.exit_code == 0, res.output
    assert "nightly" in res.output and "*/10 * * * *" in res.output and "Allow/none" in res.output
    res = run("schedules", "describe", "nightly")
    assert res.exit_code == 0, res.output
    assert "cron */10 * * * * in Europe/Berlin" in res.output and "live jobs: none" in res.output
    assert "vision team" in res.output  # the job template
    res = run("schedules", "describe", "nightly", "-o", "json")
    sch = json.loads(res.output)
    assert sch["name"] == "nightly" and sch["job"]["labels"]["team"] == EVIL

    res = run("schedules", "runs", "nightly")
    assert res.exit_code == 0 and "no slots fired yet" in res.output
    with session_scope(db_url) as s:
        after = dom._aware(s.get(Schedule, sch["id"]).handled_until)
    slot = dom.next_fire_time("*/10 * * * *", "Europe/Berlin", after)
    # (the other schedule, "again", fires at midnight UTC too: a slot at midnight fires both)
    started = firing.run(slot, settings=settings, enqueue=lambda t, j: None).started()
    [fired] = [f for f in started if f.schedule_id == sch["id"]]
    res = run("schedules", "runs", "nightly")
    assert res.exit_code == 0, res.output
    assert "started" in res.output and fired.job_id in res.output
    res = run("schedules", "runs", sch["id"], "-o", "json")
    assert json.loads(res.output)["runs"][0]["job_id"] == fired.job_id

    res = run("schedules", "pause", "nightly")
    assert res.exit_code == 0 and "paused schedule nightly" in res.output
    # (the other schedule, "again", fires at midnight UTC: a run within 30 min of it sees that)
    later = firing.run(slot + timedelta(minutes=30), settings=settings).slots
    assert [f for f in later if f.schedule_id == sch["id"]] == []
    res = run("schedules", "resume", "nightly")
    assert res.exit_code == 0 and "resumed schedule nightly" in res.output

    res = run("schedules", "delete", "nightly")
    assert res.exit_code == 0, res.output
    res = run("schedules", "describe", "nightly")
    assert res.exit_code == 1 and "no schedule 'nightly'" in res.output
