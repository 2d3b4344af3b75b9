"""Index the serving log (the `stackml.index_serving_logs` task, sent by beat every 30 s):
read new serving-log objects from the store into `logged_predictions`, the table feedback
is joined with (live metrics, datasets).

A pass takes the models whose endpoint is live (or was deleted within two hours), least
recently listed first, at most MAX_MODELS of them; for each it lists the hour prefixes
`serving-logs/<model>/<yyyy>/<mm>/<dd>/<hh>/` from its cursor (minus LATE_MARGIN, for a
batch written after its hour ended) to the hour now, at most MAX_HOURS of them, and reads
the objects it has not read, at most MAX_OBJECTS per pass in all. Each object is one
transaction: its serving_log_objects row (unique (model_id, key), inserted ON CONFLICT DO
NOTHING) and its predictions (unique (model_id, request_id)) commit together or not at all.
Two passes at once read an object at most twice and index it once (the second insert of its
row waits for the first transaction and does nothing); a pass killed mid-way rolls back
and the next one does the object again. The cursor moves only past hours read completely.

The objects' lines are untrusted data (a project's store area): a line that is not a
successful prediction of this model with a request id, a time and instances is skipped and
counted, never an error. The pass also re-drives dataset builds whose message was lost.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from service import queue
from service.backends.interfaces import ObjectInfo, ObjectStore
from service.config import Settings, get_settings
from service.db import serving_index as repo
from service.db.models import utcnow
from service.db.session import session_scope
from service.domain import feedback as dom
from service.domain.errors import StoreError, TransientBackendError
from workers import jobctx

log = logging.getLogger("stackml.worker.serving_index")

TASK = "stackml.index_serving_logs"
INTERVAL = 30.0  # seconds between passes (beat)
MAX_MODELS = 50  # models looked at per pass
MAX_HOURS = 48  # hour prefixes listed per model per pass
MAX_OBJECTS = 200  # objects read per pass
MAX_OBJECT_BYTES = 128 * 1024 * 1024  # an object larger is recorded as skipped, not read
MAX_ROW_BYTES = 1024 * 1024  # a logged request's instances and predictions, as JSON
LATE_MARGIN = timedelta(hours=1)
BUILD_REDRIVE_AFTER = timedelta(seconds=120)
MAX_VERSION = 2**31 - 1
MAX_KEY = 1024  # serving_log_objects.key (the writer's keys are far shorter)


@dataclass
class Report:
    objects: int = 0  # objects indexed by this pass
    predictions: int = 0  # new logged predictions
    skipped_lines: int = 0
    lost_races: int = 0  # objects another pass had indexed
    redriven: list[int] = field(default_factory=list)


def run(
    now: datetime | None = None,
    *,
    settings: Settings | None = None,
    store_for: Any = None,
    enqueue: Any = None,
) -> Report:
    """One pass. `store_for(project, trust_id)` and `enqueue(task, id)` default to the
    workers' (tests pass their own)."""
    cfg = settings or get_settings()
    get_store = store_for or jobctx.store
    send = enqueue or _enqueue_quietly
    now = now or utcnow()
    report = Report()
    with session_scope(cfg.db_url) as s:
        targets = repo.targets(s, now, MAX_MODELS)
    budget = MAX_OBJECTS
    for t in targets:
        if budget <= 0:
            break
        try:
            budget -= _index_model(cfg, t, get_store, now, budget, report)
        except TransientBackendError as e:
            log.warning("serving log of model %s: the store is not answering: %s", t.model_id, e)
        except Exception:
            log.exception("serving log of model %s: index pass failed (retried)", t.model_id)
    with session_scope(cfg.db_url) as s:
        report.redriven = repo.stalled_builds(s, now, BUILD_REDRIVE_AFTER, 50)
    for vid in report.redriven:
        send(queue.BUILD_DATASET, str(vid))
    return report


def _enqueue_quietly(task: str, item: str) -> None:
    try:
        queue.enqueue(task, item)
    except Exception as e:  # noqa: BLE001 - a lost message is re-driven by the next pass
        log.warning("could not enqueue %s for %s (re-driven later): %s", task, item, e)


def _index_model(
    cfg: Settings, t: repo.Target, get_store: Any, now: datetime, budget: int, report: Report
) -> int:
    """Index one model's new objects; how many objects were read."""
    if t.trust_id is None and _needs_trust(cfg):
        return 0  # per-project tenancy: its store is reachable only through a live trust
    store: ObjectStore = get_store(t.project_id, t.trust_id)
    base = f"{store.project_prefix(t.project_id)}serving-logs/{t.name}/"
    start = (t.listed_through - LATE_MARGIN) if t.listed_through else t.since
    hours = dom.hour_prefixes(_aware(start), now, MAX_HOURS)
    read = 0
    through: datetime | None = None
    for h in hours:
        listed = sorted(store.list(base + dom.hour_path(h)), key=lambda o: o.key)
        objs = [o for o in listed if o.key.endswith(".jsonl") and len(o.key) <= MAX_KEY]
        with session_scope(cfg.db_url) as s:
            known = repo.known_keys(s, t.model_id, [o.key for o in objs])
        todo = [o for o in objs if o.key not in known]
        left = budget - read
        done = True
        for obj in todo[:left]:
            if not _index_object(cfg, store, t, obj, report):
                done = False
                break
            read += 1
        if not done or len(todo) > left:
            through = h  # this hour is not done: the next pass lists it again
            break
        through = min(h + timedelta(hours=1), now)
    if through is not None:
        with session_scope(cfg.db_url) as s:
            repo.set_cursor(s, t.model_id, t.project_id, through)
    return read


def _needs_trust(cfg: Settings) -> bool:
    from service import trusts

    return trusts.enabled(cfg)


def _aware(dt: datetime) -> datetime:
    return dt if dt.tzinfo is not None else dt.replace(tzinfo=UTC)


def _index_object(
    cfg: Settings, store: ObjectStore, t: repo.Target, obj: ObjectInfo, report: Report
) -> bool:
    """Index one object; False when it could not be read now (the next pass tries again)."""
    note = ""
    rows: list[dict[str, Any]] = []
    lines = skipped = 0
    if obj.size > MAX_OBJECT_BYTES:
        note = f"not read: {obj.size} bytes is over {MAX_OBJECT_BYTES}"
    else:
        try:
            data = store.get(obj.key)
        except TransientBackendError:
            raise
        except StoreError as e:
            log.warning("serving log object %s cannot be read (retried): %s", obj.key, e)
            return False
        rows, lines, skipped = parse_object(data, t)
    with session_scope(cfg.db_url) as s:
        oid = repo.claim_object(s, t.project_id, t.model_id, obj.key)
        if oid is None:
            report.lost_races += 1
            return True
        for r in rows:
            r["source_id"] = oid
        added = repo.add_predictions(s, rows)
        repo.finish_object(s, oid, lines=lines, indexed=added, skipped=skipped, note=note)
    report.objects += 1
    report.predictions += added
    report.skipped_lines += skipped
    return True


def parse_object(data: bytes, t: repo.Target) -> tuple[list[dict[str, Any]], int, int]:
    """The logged_predictions rows of one object's lines, the number of lines, and how many
    were skipped."""
    rows: dict[str, dict[str, Any]] = {}
    lines = skipped = 0
    for raw in data.split(b"\n"):
        if not raw.strip():
            continue
        lines += 1
        row = parse_line(raw, t)
        if row is None or row["request_id"] in rows:
            skipped += 1
            continue
        rows[row["request_id"]] = row
    return list(rows.values()), lines, skipped


def parse_line(raw: bytes, t: repo.Target) -> dict[str, Any] | None:
    """One line as a logged_predictions row, or None when it is not a usable prediction."""
    try:
        rec = json.loads(raw)
    except (ValueError, RecursionError):
        return None
    if not isinstance(rec, dict) or rec.get("model") != t.name:
        return None
    rid = rec.get("request_id")
    if dom.check_request_id(rid) is not None:
        return None
    status = rec.get("status")
    if not isinstance(status, int) or isinstance(status, bool) or not 200 <= status < 300:
        return None
    version = rec.get("version")
    if version is not None and (
        not isinstance(version, int) or isinstance(version, bool) or not 1 <= version <= MAX_VERSION
    ):
        return None
    at_raw = rec.get("time")
    if not isinstance(at_raw, str):
        return None
    try:
        at = datetime.fromisoformat(at_raw.replace("Z", "+00:00"))
        at = _aware(at).astimezone(UTC)
    except (ValueError, OverflowError):
        return None
    if rec.get("request_truncated"):
        return None
    instances = dom.instances_of(rec.get("request"))
    if instances is None:
        return None
    predictions = None if rec.get("response_truncated") else dom.predictions_of(rec.get("response"))
    if predictions is not None and len(predictions) != len(instances):
        predictions = None
    if len(json.dumps([instances, predictions])) > MAX_ROW_BYTES:
        return None
    return {
        "project_id": t.project_id,
        "model_id": t.model_id,
        "request_id": rid,
        "version": version,
        "at": at,
        "instances": instances,
        "predictions": predictions,
    }


__all__ = ["INTERVAL", "TASK", "Report", "parse_line", "parse_object", "run"]
