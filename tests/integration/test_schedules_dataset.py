"""Schedules that rebuild a dataset before their job, on a real PostgreSQL (migrated to head):
a slot starts a new version of the dataset and waits (`building`) with the build task
enqueued; the job starts once the version is READY, exactly once when firers race, training
on the version's train/ prefix; a FAILED version or one that takes too long fails the slot
with a sentence; Forbid skips a slot while an earlier one is still rebuilding, Replace makes
the earlier one give way."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import select

from service.backends import registry as backends
from service.config import Settings
from service.db import datasets as ds_repo
from service.db import registry as models_repo
from service.db import schedules as repo
from service.db.models import DatasetVersion, Job, ScheduleRun
from service.db.session import session_scope
from service.domain import schedules as dom
from service.queue import ALLOCATE, BUILD_DATASET
from tests.integration.test_schedules_firing import TEMPLATE, Sent
from tests.integration.test_schedules_firing import settings as settings  # the fixture
from workers.steps import schedules as firing

# near the real time: a slot's row is recorded at the real time, and DATASET_WAIT counts from it
SLOT = datetime.now(UTC).replace(second=0, microsecond=0) + timedelta(minutes=1)
NOW = SLOT + timedelta(seconds=30)


def _dataset(settings: Settings, name: str = "fb") -> None:
    """Dataset `name` of model m in p1 with a READY version 1."""
    store = backends.store(settings, project_id="p1")
    with session_scope(settings.db_url) as s:
        models_repo.ensure_model(s, "p1", "m", "test")
        dv = ds_repo.start_build(
            s, "p1", name, ds_repo.BuildSpec(model="m"), store=store, by="test",
            now=NOW - timedelta(days=1),
        )  # fmt: skip
        assert ds_repo.finish(s, dv, manifest={"rows": 10})


def _schedule(settings: Settings, concurrency: dom.Concurrency, name: str = "loop") -> str:
    with session_scope(settings.db_url) as s:
        sch = repo.create_schedule(
            s, "p1", name=name, cron="* * * * *", timezone="UTC", job=TEMPLATE,
            concurrency=concurrency, catchup=dom.Catchup.NONE, max_catchup=10, paused=False,
            by="test", dataset="fb", now=NOW - timedelta(seconds=40),
        )  # fmt: skip
        return sch.id


def _runs(settings: Settings, sid: str) -> list[ScheduleRun]:
    with session_scope(settings.db_url) as s:
        rows = s.scalars(
            select(ScheduleRun)
            .where(ScheduleRun.schedule_id == sid)
            .order_by(ScheduleRun.fire_time)
        )
        out = list(rows)
        s.expunge_all()
        return out


def _finish_version(settings: Settings, version_id: int, failure: str | None = None) -> str:
    with session_scope(settings.db_url) as s:
        dv = s.get(DatasetVersion, version_id)
        assert dv is not None
        assert ds_repo.finish(s, dv, manifest=None if failure else {"rows": 12}, failure=failure)
        return dv.prefix_uri


def test_a_slot_rebuilds_first_and_its_job_starts_once_on_the_new_version(
    settings: Settings,
) -> None:
    _dataset(settings)
    sid = _schedule(settings, dom.Concurrency.FORBID)
    sent = Sent()
    report = firing.run(NOW, settings=settings, enqueue=sent)
    assert [f.outcome for f in report.slots] == ["building"], report.slots
    (run,) = _runs(settings, sid)
    assert (run.outcome, run.dataset_version, run.job_id) == ("building", 2, None)
    assert "version 2" in run.reason
    assert sent.calls == [(BUILD_DATASET, str(run.dataset_version_id))]
    # still building: nothing moves, nothing is enqueued
    firing.run(NOW + timedelta(seconds=10), settings=settings, enqueue=sent)
    assert _runs(settings, sid)[0].outcome == "building"
    assert len(sent.calls) == 1

    assert run.dataset_version_id is not None
    prefix = _finish_version(settings, run.dataset_version_id)
    # four firers race over the READY version: one job
    barrier = threading.Barrier(4)
    errors: list[BaseException] = []

    def go() -> None:
        try:
            barrier.wait(30)
            firing.run(NOW + timedelta(seconds=20), settings=settings, enqueue=sent)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=go) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    (run,) = _runs(settings, sid)
    assert run.outcome == "started" and run.job_id, run.reason
    with session_scope(settings.db_url) as s:
        jobs = list(s.scalars(select(Job)))
        assert [j.id for j in jobs] == [run.job_id]
        assert jobs[0].spec["inputs"]["data_uri"] == f"{prefix}train/"
        assert jobs[0].spec["labels"]["stackml.slot"] == f"{SLOT:%Y-%m-%dT%H:%M:%SZ}"
    assert sent.calls.count((ALLOCATE, run.job_id)) == 1
    assert len(sent.calls) == 2

    # Forbid: the next slot finds the job live and is skipped, rebuilding nothing
    firing.run(NOW + timedelta(minutes=1), settings=settings, enqueue=sent)
    runs = _runs(settings, sid)
    assert [r.outcome for r in runs] == ["started", "skipped"]
    assert run.job_id in runs[1].reason and runs[1].dataset_version is None
    with session_scope(settings.db_url) as s:
        versions = s.scalars(select(DatasetVersion.version).order_by(DatasetVersion.version))
        assert list(versions) == [1, 2]


def test_forbid_skips_while_rebuilding_and_replace_makes_the_earlier_slot_give_way(
    settings: Settings,
) -> None:
    _dataset(settings)
    forbid = _schedule(settings, dom.Concurrency.FORBID, "forbid")
    replace = _schedule(settings, dom.Concurrency.REPLACE, "replace")
    sent = Sent()
    firing.run(NOW, settings=settings, enqueue=sent)
    firing.run(NOW + timedelta(minutes=1), settings=settings, enqueue=sent)
    f = _runs(settings, forbid)
    assert [r.outcome for r in f] == ["building", "skipped"]
    assert "rebuilding its dataset" in f[1].reason
    r = _runs(settings, replace)
    assert [x.outcome for x in r] == ["skipped", "building"]
    assert "replaced by the slot at" in r[0].reason
    # the replaced slot's version finishing starts nothing; the replacing one's does
    assert r[0].dataset_version_id is not None and r[1].dataset_version_id is not None
    _finish_version(settings, r[0].dataset_version_id)
    _finish_version(settings, r[1].dataset_version_id)
    firing.run(NOW + timedelta(minutes=1, seconds=10), settings=settings, enqueue=sent)
    r = _runs(settings, replace)
    assert [x.outcome for x in r] == ["skipped", "started"]
    with session_scope(settings.db_url) as s:
        assert list(s.scalars(select(Job.id))) == [r[1].job_id]


def test_a_failed_or_endless_build_fails_the_slot_with_a_sentence(settings: Settings) -> None:
    _dataset(settings)
    failing = _schedule(settings, dom.Concurrency.ALLOW, "failing")
    sent = Sent()
    firing.run(NOW, settings=settings, enqueue=sent)
    (run,) = _runs(settings, failing)
    assert run.dataset_version_id is not None
    _finish_version(settings, run.dataset_version_id, failure="no labelled rows in the window")
    firing.run(NOW + timedelta(seconds=10), settings=settings, enqueue=sent)
    (run,) = _runs(settings, failing)
    assert run.outcome == "failed" and run.job_id is None
    assert run.reason == "dataset 'fb' version 2 failed: no labelled rows in the window"

    endless = _schedule(settings, dom.Concurrency.ALLOW, "endless")
    firing.run(NOW + timedelta(minutes=1), settings=settings, enqueue=sent)
    (run,) = _runs(settings, endless)
    assert run.outcome == "building"
    late: Any = run.recorded_at.replace(tzinfo=UTC) + firing.DATASET_WAIT + timedelta(seconds=1)
    firing.after_build(run.id, late, settings=settings, enqueue=sent)  # no new slot fires
    (run,) = _runs(settings, endless)
    assert run.outcome == "failed"
    assert "was still building after 3600 s" in run.reason
    with session_scope(settings.db_url) as s:
        assert list(s.scalars(select(Job.id))) == []
