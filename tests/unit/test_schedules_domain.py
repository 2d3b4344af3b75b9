"""The pure slot logic of schedules (service/domain/schedules.py): cron and time zone checks,
due slots with catchup and its cap, daylight saving time, concurrency decisions."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from service.domain import schedules as dom
from service.domain.schedules import Action, BadSchedule, Catchup, Concurrency


def utc(*a: int) -> datetime:
    return datetime(*a, tzinfo=UTC)


@pytest.mark.parametrize(
    ("expr", "want"),
    [
        ("*/5 * * * *", "*/5 * * * *"),
        ("  0   3 * * 1-5 ", "0 3 * * 1-5"),
        ("@daily", "0 0 * * *"),
        ("@HOURLY", "0 * * * *"),
    ],
)
def test_cron_expressions_accepted(expr: str, want: str) -> None:
    assert dom.normalise_cron(expr) == want


@pytest.mark.parametrize(
    ("expr", "says"),
    [
        ("* * * * * *", "5 fields"),
        ("", "5 fields"),
        ("61 * * * *", "not a valid"),
        ("a b c d e", "not a valid"),
        ("@reboot", "unknown macro"),
        ("0 0 30 2 *", "never fires"),
        ("H * * * *", "not a valid"),
        ("1 " * 150, "at most"),
    ],
)
def test_bad_cron_expressions_refused(expr: str, says: str) -> None:
    with pytest.raises(BadSchedule, match=says):
        dom.normalise_cron(expr)


@pytest.mark.parametrize("name", ["Europe", "../etc/passwd", "", "Mars/Base", "UTC\x00"])
def test_unknown_time_zones_refused(name: str) -> None:
    with pytest.raises(BadSchedule, match="time zone"):
        dom.zone(name)


def test_next_fire_times_in_a_time_zone() -> None:
    got = dom.next_fire_times("0 9 * * *", "America/New_York", utc(2026, 1, 1, 12), 2)
    assert got == [utc(2026, 1, 1, 14), utc(2026, 1, 2, 14)]  # 09:00 EST = 14:00 UTC


def test_spring_forward_a_missing_time_fires_once_after_the_gap() -> None:
    # Europe/Berlin 2026-03-29: 02:00 -> 03:00; 02:30 does not exist that day
    got = dom.next_fire_times("30 2 * * *", "Europe/Berlin", utc(2026, 3, 27, 12), 3)
    assert got == [utc(2026, 3, 28, 1, 30), utc(2026, 3, 29, 1, 0), utc(2026, 3, 30, 0, 30)]


def test_fall_back_a_fixed_time_fires_once() -> None:
    # Europe/Berlin 2026-10-25: 03:00 -> 02:00; 02:30 happens twice: fires at the first
    got = dom.next_fire_times("30 2 * * *", "Europe/Berlin", utc(2026, 10, 24, 12), 2)
    assert got == [utc(2026, 10, 25, 0, 30), utc(2026, 10, 26, 1, 30)]


def test_fall_back_a_wildcard_hour_fires_every_real_hour() -> None:
    got = dom.next_fire_times("0 * * * *", "Europe/Berlin", utc(2026, 10, 24, 23, 30), 4)
    assert got == [utc(2026, 10, 25, h) for h in range(0, 4)]


def test_plan_nothing_due() -> None:
    p = dom.plan(
        "0 * * * *",
        "UTC",
        after=utc(2026, 1, 1, 10),
        now=utc(2026, 1, 1, 10, 59),
        catchup=Catchup.NONE,
    )
    assert p == dom.Plan()


def test_plan_one_slot_due_exactly_at_now() -> None:
    p = dom.plan(
        "0 * * * *", "UTC", after=utc(2026, 1, 1, 10), now=utc(2026, 1, 1, 11), catchup=Catchup.NONE
    )
    assert p.fire == [utc(2026, 1, 1, 11)] and p.missed == 0 and p.through == utc(2026, 1, 1, 11)


def test_plan_catchup_none_fires_the_latest_missed_slot_only() -> None:
    p = dom.plan(
        "0 * * * *",
        "UTC",
        after=utc(2026, 1, 1, 0),
        now=utc(2026, 1, 1, 5, 30),
        catchup=Catchup.NONE,
    )
    assert p.fire == [utc(2026, 1, 1, 5)]
    assert p.missed == 4
    assert p.through == utc(2026, 1, 1, 5)


def test_plan_catchup_all_fires_every_missed_slot_up_to_the_cap() -> None:
    p = dom.plan(
        "0 * * * *",
        "UTC",
        after=utc(2026, 1, 1, 0),
        now=utc(2026, 1, 1, 5, 30),
        catchup=Catchup.ALL,
        max_catchup=10,
    )
    assert p.fire == [utc(2026, 1, 1, h) for h in range(1, 6)] and p.missed == 0
    capped = dom.plan(
        "0 * * * *",
        "UTC",
        after=utc(2026, 1, 1, 0),
        now=utc(2026, 1, 1, 5, 30),
        catchup=Catchup.ALL,
        max_catchup=2,
    )
    assert capped.fire == [utc(2026, 1, 1, 4), utc(2026, 1, 1, 5)]  # the latest two
    assert capped.missed == 3
    assert capped.through == utc(2026, 1, 1, 5)


def test_plan_far_behind_is_bounded_and_matches_forward_slots() -> None:
    # a minutely schedule down for 30 days: 43200 slots; the plan does not walk them all
    now = utc(2026, 2, 1, 0, 0, 30)
    p = dom.plan(
        "* * * * *",
        "Europe/Berlin",
        after=now - timedelta(days=30),
        now=now,
        catchup=Catchup.ALL,
        max_catchup=3,
    )
    assert p.fire == [utc(2026, 1, 31, 23, 58), utc(2026, 1, 31, 23, 59), utc(2026, 2, 1, 0, 0)]
    assert p.missed_capped and p.missed == dom.MAX_SCAN
    assert p.through == utc(2026, 2, 1)


def test_plan_across_fall_back_with_catchup_all() -> None:
    p = dom.plan(
        "30 2 * * *",
        "Europe/Berlin",
        after=utc(2026, 10, 24, 12),
        now=utc(2026, 10, 25, 12),
        catchup=Catchup.ALL,
    )
    assert p.fire == [utc(2026, 10, 25, 0, 30)]  # not again at 01:30 UTC (02:30 CET)


def test_decide_each_policy() -> None:
    assert dom.decide(Concurrency.FORBID, []).action is Action.START
    skip = dom.decide(Concurrency.FORBID, ["job-1"])
    assert skip.action is Action.SKIP and "job-1" in skip.reason and "Forbid" in skip.reason
    assert dom.decide(Concurrency.ALLOW, ["job-1"]).action is Action.START
    rep = dom.decide(Concurrency.REPLACE, ["job-1", "job-2"])
    assert rep.action is Action.REPLACE and rep.cancel == ("job-1", "job-2")
    assert dom.decide(Concurrency.REPLACE, []).action is Action.START


def test_fired_spec_labels_the_job_with_its_schedule_and_slot() -> None:
    tpl = {"name": "n", "labels": {"team": "x"}}
    out = dom.fired_spec(tpl, "sch-1", utc(2026, 1, 1, 3))
    assert out["labels"] == {
        "team": "x",
        "stackml.schedule": "sch-1",
        "stackml.slot": "2026-01-01T03:00:00Z",
    }
    assert tpl["labels"] == {"team": "x"}
