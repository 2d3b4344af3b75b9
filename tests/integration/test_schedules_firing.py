"""Schedules firing on a real PostgreSQL (migrated to head): firers racing over the same slots
in threads, each with its own connections and transactions, fire every due slot exactly once
(one schedule_runs row and one job per slot), lose none, and create no job for a slot they
lost. The second race takes the schedule row lock away, so the slot row's unique key alone
decides: what a beat holding stale state (restarted, or a second beat) meets."""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from service.config import Settings
from service.db import schedules as repo
from service.db.migrate import upgrade
from service.db.models import Job, Schedule, ScheduleRun
from service.db.session import session_scope
from service.domain import schedules as dom
from service.queue import ALLOCATE
from tests.pgutil import temp_database
from workers.steps import schedules as firing

NOW = datetime(2026, 12, 4, 12, 0, 30, tzinfo=UTC)
TEMPLATE = {
    "name": "retrain",
    "trainer": {"package_uri": "local://projects/p1/staging/t.tar.gz", "module": "trainer.task"},
}


@pytest.fixture
def settings(tmp_path: Path) -> Iterator[Settings]:
    with temp_database("schedules") as url:
        upgrade(url)
        yield Settings(
            database_url=url,
            data_dir=tmp_path,
            secret_key="schedules-test",
            auth="noauth",
            compute="sandbox",
            store="local",
        )


class Sent:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.calls: list[tuple[str, str]] = []

    def __call__(self, task: str, job_id: str) -> None:
        with self.lock:
            self.calls.append((task, job_id))


def _schedules(url: str, n: int, **kw: Any) -> list[str]:
    ids = []
    with session_scope(url) as s:
        for i in range(n):
            sch = repo.create_schedule(
                s,
                "p1",
                name=f"every-minute-{i}",
                cron="* * * * *",
                timezone="Europe/Berlin",
                job=TEMPLATE,
                by="test",
                paused=False,
                now=NOW - timedelta(minutes=30, seconds=10),  # down across 30 slots
                **kw,
            )
            ids.append(sch.id)
    return ids


def _race(threads: int, target: Any) -> list[BaseException]:
    barrier = threading.Barrier(threads)
    errors: list[BaseException] = []

    def go() -> None:
        try:
            barrier.wait(timeout=30)
            target()
        except BaseException as e:  # noqa: BLE001 - reported by the test
            errors.append(e)

    pool = [threading.Thread(target=go) for _ in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in pool), "a firer did not finish in 120 s"
    return errors


def _check_exactly_once(url: str, ids: list[str], want_slots: list[datetime], sent: Sent) -> None:
    with session_scope(url) as s:
        runs = list(s.scalars(select(ScheduleRun).where(ScheduleRun.schedule_id.in_(ids))))
        jobs = list(s.scalars(select(Job)))
        for sid in ids:
            got = sorted(dom._aware(r.fire_time) for r in runs if r.schedule_id == sid)
            assert got == want_slots, sid  # every slot once: none twice, none lost
        assert all(r.outcome == "started" and r.job_id for r in runs)
        assert sorted(r.job_id for r in runs) == sorted(j.id for j in jobs)  # no stray job
        slots = Counter(
            (j.spec["labels"]["stackml.schedule"], j.spec["labels"]["stackml.slot"]) for j in jobs
        )
        assert set(slots.values()) == {1}
        assert all(j.state == "QUEUED" for j in jobs)
        for sid in ids:
            sch = s.get(Schedule, sid)
            assert dom._aware(sch.handled_until) == want_slots[-1]
            assert dom._aware(sch.next_fire_at) == want_slots[-1] + timedelta(minutes=1)
    assert sorted(sent.calls) == sorted((ALLOCATE, j.id) for j in jobs)


def test_racing_firing_passes_fire_each_slot_once(settings: Settings) -> None:
    ids = _schedules(
        settings.db_url,
        6,
        concurrency=dom.Concurrency.ALLOW,
        catchup=dom.Catchup.ALL,
        max_catchup=5,
    )
    sent = Sent()
    reports: list[firing.Report] = []

    def passes() -> None:
        for _ in range(3):
            reports.append(firing.run(NOW, settings=settings, enqueue=sent))

    assert _race(6, passes) == []
    want = [datetime(2026, 12, 4, 11, m, tzinfo=UTC) for m in range(56, 60)] + [
        datetime(2026, 12, 4, 12, 0, tzinfo=UTC)
    ]
    _check_exactly_once(settings.db_url, ids, want, sent)
    assert sum(len(r.started()) for r in reports) == 6 * 5
    [first] = [r for sid in ids[:1] for r in _runs(settings.db_url, sid)][-1:]
    assert first.missed == 25  # 30 slots while down, the latest 5 fired


def _runs(url: str, sid: str) -> list[ScheduleRun]:
    with session_scope(url) as s:
        return list(
            s.scalars(
                select(ScheduleRun)
                .where(ScheduleRun.schedule_id == sid)
                .order_by(ScheduleRun.fire_time.desc())
            )
        )


def test_without_the_row_lock_the_slot_key_alone_fires_once(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    ids = _schedules(
        settings.db_url,
        3,
        concurrency=dom.Concurrency.ALLOW,
        catchup=dom.Catchup.ALL,
        max_catchup=5,
    )

    def unlocked(s: Any, schedule_id: str) -> Schedule | None:
        return s.get(Schedule, schedule_id)  # stale state, no lock: as a beat restarted

    monkeypatch.setattr(firing.repo, "lock_for_firing", unlocked)
    sent = Sent()
    reports: list[firing.Report] = []

    def fire_all() -> None:
        for sid in ids:
            reports.append(firing.fire(sid, NOW, settings=settings, enqueue=sent))

    assert _race(5, fire_all) == []
    want = [datetime(2026, 12, 4, 11, m, tzinfo=UTC) for m in range(56, 60)] + [
        datetime(2026, 12, 4, 12, 0, tzinfo=UTC)
    ]
    _check_exactly_once(settings.db_url, ids, want, sent)
    started = sum(len(r.started()) for r in reports)
    assert started == 3 * 5
    # at least some firers met a slot another had claimed (else the race did not happen)
    assert sum(r.lost_races for r in reports) > 0


def test_forbid_across_racing_firers_starts_one_run(settings: Settings) -> None:
    [sid] = _schedules(
        settings.db_url,
        1,
        concurrency=dom.Concurrency.FORBID,
        catchup=dom.Catchup.ALL,
        max_catchup=5,
    )
    sent = Sent()
    assert _race(4, lambda: firing.run(NOW, settings=settings, enqueue=sent)) == []
    runs = _runs(settings.db_url, sid)
    assert len(runs) == 5
    assert [r.outcome for r in runs].count("started") == 1
    assert all("Forbid" in r.reason for r in runs if r.outcome == "skipped")
    assert len(sent.calls) == 1
