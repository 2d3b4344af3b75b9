"""Sampled request/response logging of online predictions, off the request path.

The proxy (service/api/predict.py) hands each sampled exchange to `ServingLog.record`, which
only appends to a bounded in-memory buffer (a lock, a deque, a counter: it never waits on the
store and never allocates past `buffer_bytes`). A background thread takes the records out in
batches (every `batch_records` records or `batch_seconds` seconds), turns each into one JSON
line and writes one object per (project, model, hour) to the store:

    <project prefix>serving-logs/<model>/<yyyy>/<mm>/<dd>/<hh>/<batch id>.jsonl

Each line: request_id, time (ISO, UTC), model, version, endpoint, caller (a hash of the caller
key, never the key), status, latency_ms, request and response (the JSON body when it parses,
else the text; cut past `max_body_bytes` with `*_truncated: true`).

When the buffer is full (the store is slow, or down) new records are dropped and counted;
a batch the store refuses is dropped and counted too (never retried: a store that keeps
failing must not pile up memory). `stats()` gives the counters (exported by /metrics).
`close(deadline)` flushes what is buffered within a deadline, at shutdown.
"""

from __future__ import annotations

import atexit
import json
import logging
import random
import threading
import time
import uuid
import weakref
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from service.backends.interfaces import ObjectStore

log = logging.getLogger("stackml.serving_log")

LOG_EVERY = 60.0  # seconds between two warnings about drops or store failures
RECORD_OVERHEAD = 512  # bytes a record costs besides its bodies (fields, tuple, deque slot)


@dataclass(frozen=True)
class Record:
    """One sampled exchange, as the request path leaves it (raw bytes: the writer encodes)."""

    project_id: str
    model: str
    version: int | None
    endpoint: str | None
    request_id: str
    at: float  # time.time()
    caller: str  # a hash of the caller key
    status: int
    latency_ms: float
    request: bytes
    response: bytes
    request_truncated: bool = False
    response_truncated: bool = False

    def size(self) -> int:
        return RECORD_OVERHEAD + len(self.request) + len(self.response)


@dataclass
class Counters:
    sampled: int = 0  # records accepted into the buffer
    written: int = 0  # records in batches the store accepted
    batches: int = 0  # objects written
    dropped_full: int = 0  # records refused because the buffer was full
    dropped_store: int = 0  # records of batches the store refused
    dropped_shutdown: int = 0  # records still buffered when the shutdown deadline passed
    store_errors: int = 0  # failed writes


class ServingLog:
    """One per API app. `store_for(project)` gives the project's store (and its prefix)."""

    def __init__(
        self,
        store_for: Callable[[str], ObjectStore],
        *,
        buffer_bytes: int = 64 * 1024 * 1024,
        batch_records: int = 500,
        batch_seconds: float = 5.0,
        max_body_bytes: int = 64 * 1024,
        flush_seconds: float = 10.0,
    ) -> None:
        self._store_for = store_for
        self.buffer_bytes = buffer_bytes
        self.batch_records = max(1, batch_records)
        self.batch_seconds = batch_seconds
        self.max_body_bytes = max_body_bytes
        self.flush_seconds = flush_seconds
        self._buf: deque[Record] = deque()
        self._buf_bytes = 0
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._closing = False
        self._thread: threading.Thread | None = None
        self._counters = Counters()
        self._warned_at = -LOG_EVERY
        self._rng = random.Random()

    # -- the request path (never blocks on the store) -------------------------------------

    def sampled(self, rate: float) -> bool:
        """Whether this request is logged, at `rate` (0..1)."""
        if rate <= 0:
            return False
        return rate >= 1 or self._rng.random() < rate

    def cut(self, body: bytes) -> tuple[bytes, bool]:
        """The part of a body the log keeps, and whether it was cut."""
        if len(body) <= self.max_body_bytes:
            return body, False
        return body[: self.max_body_bytes], True

    def record(self, rec: Record) -> bool:
        """Buffer `rec` for the writer; False (and counted) when the buffer is full."""
        size = rec.size()
        with self._lock:
            if self._closing or self._buf_bytes + size > self.buffer_bytes:
                self._counters.dropped_full += 1
                self._warn_drops()
                return False
            self._buf.append(rec)
            self._buf_bytes += size
            self._counters.sampled += 1
            if len(self._buf) >= self.batch_records:
                self._wake.notify()
            if self._thread is None:
                self._start()
        return True

    def _start(self) -> None:  # under the lock
        self._thread = threading.Thread(target=self._run, name="stackml-serving-log", daemon=True)
        self._thread.start()
        _register_exit(self)

    def _warn_drops(self) -> None:  # under the lock
        now = time.monotonic()
        if now - self._warned_at >= LOG_EVERY:
            self._warned_at = now
            log.warning(
                "serving log: buffer full (%d bytes held); dropping sampled records "
                "(%d dropped so far): the store is slow or down",
                self._buf_bytes,
                self._counters.dropped_full,
            )

    # -- the writer thread ------------------------------------------------------------------

    def _take(self, limit: int) -> list[Record]:  # under the lock
        batch: list[Record] = []
        while self._buf and len(batch) < limit:
            rec = self._buf.popleft()
            self._buf_bytes -= rec.size()
            batch.append(rec)
        return batch

    def _run(self) -> None:
        while True:
            with self._lock:
                deadline = time.monotonic() + self.batch_seconds
                while not self._closing and len(self._buf) < self.batch_records:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self._wake.wait(left)
                closing = self._closing
                batch = self._take(self.batch_records)
            if batch:
                self._write(batch)
            if closing:
                with self._lock:
                    if not self._buf:
                        return

    def _write(self, batch: list[Record]) -> None:
        groups: dict[tuple[str, str, str], list[Record]] = {}
        for rec in batch:
            hour = datetime.fromtimestamp(rec.at, UTC).strftime("%Y/%m/%d/%H")
            groups.setdefault((rec.project_id, rec.model, hour), []).append(rec)
        for (project, model, hour), recs in groups.items():
            data = b"".join(self._line(r) for r in recs)
            batch_id = f"{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{uuid.uuid4().hex[:12]}"
            try:
                store = self._store_for(project)
                key = f"{store.project_prefix(project)}serving-logs/{model}/{hour}/{batch_id}.jsonl"
                store.put(key, data)
            except Exception as e:  # noqa: BLE001 - any store failure: drop and count
                with self._lock:
                    self._counters.store_errors += 1
                    self._counters.dropped_store += len(recs)
                    now = time.monotonic()
                    warn = now - self._warned_at >= LOG_EVERY
                    if warn:
                        self._warned_at = now
                if warn:
                    log.warning(
                        "serving log: the store refused a batch of %d records (dropped): %s",
                        len(recs),
                        e,
                    )
                continue
            with self._lock:
                self._counters.batches += 1
                self._counters.written += len(recs)

    def _line(self, rec: Record) -> bytes:
        out: dict[str, Any] = {
            "request_id": rec.request_id,
            "time": datetime.fromtimestamp(rec.at, UTC).isoformat(timespec="milliseconds"),
            "model": rec.model,
            "version": rec.version,
            "endpoint": rec.endpoint,
            "caller": rec.caller,
            "status": rec.status,
            "latency_ms": round(rec.latency_ms, 3),
        }
        out["request"] = _decode(rec.request)
        out["response"] = _decode(rec.response)
        if rec.request_truncated:
            out["request_truncated"] = True
        if rec.response_truncated:
            out["response_truncated"] = True
        return json.dumps(out, separators=(",", ":"), ensure_ascii=False).encode() + b"\n"

    # -- shutdown and counters --------------------------------------------------------------

    def close(self, deadline: float | None = None) -> None:
        """Write what is buffered, waiting at most `deadline` seconds (the setting's by
        default); what is left then is dropped and counted."""
        wait = self.flush_seconds if deadline is None else deadline
        with self._lock:
            self._closing = True
            self._wake.notify_all()
            thread = self._thread
        if thread is not None:
            thread.join(wait)
        with self._lock:
            left = len(self._buf)
            if left:
                self._counters.dropped_shutdown += left
                self._buf.clear()
                self._buf_bytes = 0
        if left:
            log.warning("serving log: %d records not written before the shutdown deadline", left)

    def stats(self) -> dict[str, int]:
        with self._lock:
            c = self._counters
            return {
                "sampled": c.sampled,
                "written": c.written,
                "batches": c.batches,
                "dropped_full": c.dropped_full,
                "dropped_store": c.dropped_store,
                "dropped_shutdown": c.dropped_shutdown,
                "store_errors": c.store_errors,
                "buffered_records": len(self._buf),
                "buffered_bytes": self._buf_bytes,
            }


# (metric name, stats key, help) of the counters /metrics exports
COUNTERS = (
    ("stackml_serving_log_sampled", "sampled", "Sampled predictions accepted into the buffer"),
    ("stackml_serving_log_written", "written", "Sampled predictions written to the store"),
    ("stackml_serving_log_batches", "batches", "JSONL objects written to the store"),
    (
        "stackml_serving_log_dropped_full",
        "dropped_full",
        "Sampled predictions dropped because the buffer was full (a slow or dead store)",
    ),
    (
        "stackml_serving_log_dropped_store",
        "dropped_store",
        "Sampled predictions dropped because the store refused their batch",
    ),
    (
        "stackml_serving_log_dropped_shutdown",
        "dropped_shutdown",
        "Sampled predictions still buffered when the shutdown flush deadline passed",
    ),
    ("stackml_serving_log_store_errors", "store_errors", "Batch writes the store refused"),
)
GAUGES = (
    ("stackml_serving_log_buffered_records", "buffered_records", "Records waiting in the buffer"),
    ("stackml_serving_log_buffered_bytes", "buffered_bytes", "Bytes the buffer holds now"),
)


class StatsCollector:
    """A prometheus_client collector of one API process's serving log (its counters)."""

    def __init__(self, get: Callable[[], ServingLog | None]) -> None:
        self._get = get

    def collect(self) -> Any:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        slog = self._get()
        stats = slog.stats() if slog is not None else {}
        for name, key, text in COUNTERS:
            yield CounterMetricFamily(name, f"{text} (this API process)", value=stats.get(key, 0))
        for name, key, text in GAUGES:
            yield GaugeMetricFamily(name, f"{text} (this API process)", value=stats.get(key, 0))


def _decode(body: bytes) -> Any:
    """A body as the log line holds it: its JSON when it parses whole, else its text."""
    if not body:
        return None
    try:
        return json.loads(body)
    except ValueError:
        return body.decode("utf-8", errors="replace")


_LIVE: weakref.WeakSet[ServingLog] = weakref.WeakSet()
_EXIT_HOOKED = False
_EXIT_LOCK = threading.Lock()


def _register_exit(slog: ServingLog) -> None:
    global _EXIT_HOOKED
    _LIVE.add(slog)
    with _EXIT_LOCK:
        if not _EXIT_HOOKED:
            atexit.register(_flush_all)
            _EXIT_HOOKED = True


def _flush_all() -> None:
    for slog in list(_LIVE):
        slog.close()


__all__ = ["Record", "ServingLog", "StatsCollector"]
