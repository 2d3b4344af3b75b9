"""Schedules, the pure part: cron expressions in a time zone, which slots are due given the
last one handled and now, and what a slot does given the schedule's concurrency policy.

A *slot* is one fire time of a schedule, an instant in UTC. The firing (workers/steps/
schedules.py) records each slot it handles as a row with the unique key (schedule_id,
fire_time): that key, not this module, makes a slot fire at most once. This module only says
which slots are due, the same way for every caller (forward iteration from a known instant, so
two firers compute the same instants).

Time zones and daylight saving time (the rules of Vixie cron):
- a wall-clock time that does not exist (the hour skipped in spring) fires at the first
  instant after the gap (croniter's behaviour: 02:30 on the spring-forward day fires at 03:00);
- a wall-clock time that happens twice (the hour repeated in autumn) fires once, at its first
  occurrence, unless the hour field is a wildcard (`*`, `*/n`): `0 * * * *` fires every real
  hour, twice at the repeated 02:00, while `30 2 * * *` fires once.
"""

from __future__ import annotations

import functools
import zoneinfo
from collections import deque
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Any

from croniter import croniter

MAX_CRON_LEN = 200
MAX_CATCHUP = 100
DEFAULT_MAX_CATCHUP = 10
NEXT_SHOWN = 5
# a forward scan over missed slots stops counting here (a minutely schedule down for a year
# would otherwise cost half a million steps): `missed` then says "at least this many"
MAX_SCAN = 2000
MACROS = {
    "@yearly": "0 0 1 1 *",
    "@annually": "0 0 1 1 *",
    "@monthly": "0 0 1 * *",
    "@weekly": "0 0 * * 0",
    "@daily": "0 0 * * *",
    "@midnight": "0 0 * * *",
    "@hourly": "0 * * * *",
}


class Concurrency(StrEnum):
    FORBID = "Forbid"  # a slot whose previous run is still live is skipped
    ALLOW = "Allow"  # every slot starts a job
    REPLACE = "Replace"  # the live run is cancelled, then the slot's job starts


class Catchup(StrEnum):
    NONE = "none"  # of the slots missed while nothing fired, only the latest fires
    ALL = "all"  # every missed slot fires, the latest `max_catchup` of them


class Outcome(StrEnum):
    STARTED = "started"  # a job was created for the slot
    SKIPPED = "skipped"  # the slot fired nothing (reason says why)
    FAILED = "failed"  # the job could not be created (reason says why)
    BUILDING = "building"  # its dataset is being rebuilt; the job starts when it is READY


class BadSchedule(ValueError):
    """A cron expression or time zone that cannot be used; the message is a sentence."""


def normalise_cron(expr: str) -> str:
    """The 5-field expression a macro stands for, or `expr` with its spaces collapsed;
    BadSchedule when it is not a 5-field cron expression that ever fires."""
    if not isinstance(expr, str):
        raise BadSchedule("must be a string")
    text = " ".join(expr.split())
    if len(text) > MAX_CRON_LEN:
        raise BadSchedule(f"must be at most {MAX_CRON_LEN} characters")
    if text.startswith("@"):
        if text.lower() not in MACROS:
            raise BadSchedule(f"unknown macro {text[:20]!r}; known: {', '.join(MACROS)}")
        return MACROS[text.lower()]
    fields = text.split(" ") if text else []
    if len(fields) != 5:
        raise BadSchedule(
            "must have 5 fields (minute hour day-of-month month day-of-week), "
            f"not {len(fields)}; seconds are not supported"
        )
    try:
        ok = croniter.is_valid(text)
    except Exception:  # noqa: BLE001 - croniter raises many kinds for odd input
        ok = False
    if not ok:
        raise BadSchedule(f"{text!r} is not a valid cron expression")
    try:  # an expression that never fires (30 February) is refused too
        croniter(text, datetime(2000, 1, 1, tzinfo=UTC)).get_next(datetime)
    except Exception as e:
        raise BadSchedule(f"{text!r} never fires") from e
    return text


@functools.cache
def _zones() -> frozenset[str]:
    return frozenset(zoneinfo.available_timezones())


def zone(name: str) -> zoneinfo.ZoneInfo:
    """The IANA time zone `name` (e.g. Europe/Berlin, UTC); BadSchedule when unknown."""
    if not isinstance(name, str) or name not in _zones():
        shown = name[:64] if isinstance(name, str) else type(name).__name__
        raise BadSchedule(f"unknown time zone {shown!r}; use an IANA name such as Europe/Berlin")
    try:
        return zoneinfo.ZoneInfo(name)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError, OSError) as e:
        raise BadSchedule(f"unknown time zone {name[:64]!r}") from e


def _aware(dt: datetime) -> datetime:
    """SQLite drops the zone of stored values: they are UTC."""
    return dt.replace(tzinfo=UTC) if dt.tzinfo is None else dt.astimezone(UTC)


def _hour_is_wildcard(cron: str) -> bool:
    return cron.split(" ")[1].startswith("*")


def _kept(cron: str, tz: zoneinfo.ZoneInfo, slot: datetime) -> bool:
    """False for the second occurrence of a repeated wall-clock time (autumn), unless the
    hour field is a wildcard."""
    return slot.astimezone(tz).fold == 0 or _hour_is_wildcard(cron)


def _forward(cron: str, tz: zoneinfo.ZoneInfo, after: datetime) -> Any:
    """Slots strictly after `after`, in UTC, ascending (an endless generator)."""
    # croniter works in whole seconds and yields times strictly after its start
    it = croniter(cron, _aware(after).astimezone(tz))
    while True:
        slot = it.get_next(datetime).astimezone(UTC)
        if _kept(cron, tz, slot):
            yield slot


def next_fire_times(
    cron: str, tz_name: str, after: datetime, n: int = NEXT_SHOWN
) -> list[datetime]:
    """The next `n` slots strictly after `after` (UTC)."""
    gen = _forward(cron, zone(tz_name), after)
    return [next(gen) for _ in range(n)]


def next_fire_time(cron: str, tz_name: str, after: datetime) -> datetime:
    return next_fire_times(cron, tz_name, after, 1)[0]


@dataclass(frozen=True)
class Plan:
    """What one pass does for one schedule: fire these slots (ascending), pass over `missed`
    earlier ones (counted up to MAX_SCAN: `missed_capped` says there were at least that many),
    and remember `through` as handled (None: nothing is due)."""

    fire: list[datetime] = field(default_factory=list)
    missed: int = 0
    missed_capped: bool = False
    through: datetime | None = None


def plan(
    cron: str,
    tz_name: str,
    *,
    after: datetime,
    now: datetime,
    catchup: Catchup,
    max_catchup: int = DEFAULT_MAX_CATCHUP,
) -> Plan:
    """The slots due at `now` for a schedule whose slots up to `after` are handled: every slot
    in (after, now]. catchup=none fires the latest of them (the others are missed: the platform
    was down, or no beat ran, across their fire times); catchup=all fires the latest
    `max_catchup` of them (the earlier ones are missed)."""
    tz = zone(tz_name)
    after, now = _aware(after), _aware(now)
    keep = 1 if catchup is Catchup.NONE else max(1, min(max_catchup, MAX_CATCHUP))
    window: deque[datetime] = deque(maxlen=keep)
    count = 0
    gen = _forward(cron, tz, after)
    for slot in gen:
        if slot > now:
            break
        window.append(slot)
        count += 1
        if count >= MAX_SCAN:
            return _plan_far_behind(cron, tz, now, keep)
    if not window:
        return Plan()
    return Plan(fire=list(window), missed=count - len(window), through=window[-1])


def _plan_far_behind(cron: str, tz: zoneinfo.ZoneInfo, now: datetime, keep: int) -> Plan:
    """More than MAX_SCAN slots are due: the latest `keep` are found backwards from `now`,
    then their instants are recomputed forwards (the one way every caller computes slots)."""
    it = croniter(cron, (now + timedelta(seconds=1)).astimezone(tz))
    earliest = now
    for _ in range(keep + 2):  # a repeated hour's dropped slot may sit among them
        earliest = it.get_prev(datetime).astimezone(UTC)
    window: deque[datetime] = deque(maxlen=keep)
    for slot in _forward(cron, tz, earliest - timedelta(seconds=1)):
        if slot > now:
            break
        window.append(slot)
    return Plan(fire=list(window), missed=MAX_SCAN, missed_capped=True, through=window[-1])


# -- concurrency ---------------------------------------------------------------------------


class Action(StrEnum):
    START = "start"
    SKIP = "skip"
    REPLACE = "replace"  # cancel `cancel`, then start


@dataclass(frozen=True)
class Decision:
    action: Action
    reason: str = ""
    cancel: tuple[str, ...] = ()


def decide(concurrency: Concurrency, live: list[str]) -> Decision:
    """What a slot does, given the schedule's jobs that are not finished (`live`, job ids)."""
    if not live:
        return Decision(Action.START)
    shown = ", ".join(live[:5]) + (f" and {len(live) - 5} more" if len(live) > 5 else "")
    if concurrency is Concurrency.FORBID:
        return Decision(
            Action.SKIP, f"concurrency Forbid: the previous run is still live ({shown})"
        )
    if concurrency is Concurrency.REPLACE:
        return Decision(
            Action.REPLACE, f"concurrency Replace: cancelled the live run ({shown})", tuple(live)
        )
    return Decision(Action.START)


# labels every fired job carries: which schedule, which slot (findable with ?label=)
SCHEDULE_LABEL = "stackml.schedule"
SLOT_LABEL = "stackml.slot"


def fired_spec(template: dict[str, Any], schedule_id: str, slot: datetime) -> dict[str, Any]:
    """The job spec a slot submits: the template, with the schedule and slot as labels."""
    labels = dict(template.get("labels") or {})
    labels[SCHEDULE_LABEL] = schedule_id
    labels[SLOT_LABEL] = _aware(slot).strftime("%Y-%m-%dT%H:%M:%SZ")
    return {**template, "labels": labels}


def on_dataset(template: dict[str, Any], data_uri: str, holdout_uri: str) -> dict[str, Any]:
    """The job spec of a slot that rebuilt its dataset: the template training on the new
    version (`inputs.data_uri`), and a gate that names no holdout scored on the version's
    holdout (rows no version of the dataset trains on: the split is by request id)."""
    spec = {**template, "inputs": {**(template.get("inputs") or {}), "data_uri": data_uri}}
    output = template.get("output") or {}
    gate = output.get("gate")
    if isinstance(gate, dict) and not gate.get("holdout_uri"):
        spec["output"] = {**output, "gate": {**gate, "holdout_uri": holdout_uri}}
    return spec
