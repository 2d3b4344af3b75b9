"""The emulator's durable state: one JSON document in the state dir, changed under a lock.

Servers, keypairs, ports, floating IPs, security groups (+ rules) and injected faults live in
`<state_dir>/state.json`; a transaction holds a thread lock and an flock on `state.lock` (so
`cleanup()` in another process is safe), re-reads the file when another process changed it, and
writes it back atomically when the document changed.
"""

from __future__ import annotations

import contextlib
import copy
import fcntl
import json
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

SCHEMA = 1
COLLECTIONS = (
    "servers",
    "keypairs",
    "ports",
    "floatingips",
    "security_groups",
    "security_group_rules",
    "faults",
)

State = dict[str, Any]


def empty_state() -> State:
    return {"schema": SCHEMA, **{c: {} for c in COLLECTIONS}, "calls": {}}


class StateStore:
    def __init__(self, state_dir: Path) -> None:
        self.dir = Path(state_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.path = self.dir / "state.json"
        self.lock_path = self.dir / "state.lock"
        self._lock = threading.RLock()
        self._work: State | None = None
        self._data: State | None = None
        self._stamp: tuple[int, int, int] | None = None

    def _file_stamp(self) -> tuple[int, int, int] | None:
        try:
            st = self.path.stat()
        except FileNotFoundError:
            return None
        return st.st_ino, st.st_mtime_ns, st.st_size

    def _load(self) -> State:
        stamp = self._file_stamp()
        if self._data is not None and stamp == self._stamp:
            return self._data
        if stamp is None:
            data = empty_state()
        else:
            data = json.loads(self.path.read_text())
            for c in (*COLLECTIONS, "calls"):
                data.setdefault(c, {})
        self._data, self._stamp = data, stamp
        return data

    def _save(self, data: State) -> None:
        tmp = self.path.with_name(f".state.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
        os.replace(tmp, self.path)
        self._data, self._stamp = data, self._file_stamp()

    @contextlib.contextmanager
    def tx(self) -> Iterator[State]:
        """The state, to read and change; saved when the block ends without an exception."""
        with self._lock:
            if self._work is not None:  # nested: the outer transaction's document
                yield self._work
                return
            # one flock per process (a second descriptor on the file would block on the first)
            fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                current = self._load()
                self._work = copy.deepcopy(current)
                yield self._work
                if self._work != current:
                    self._save(self._work)
            finally:
                self._work = None
                os.close(fd)

    def read(self) -> State:
        """A snapshot (a copy: changing it changes nothing)."""
        with self.tx() as st:
            return copy.deepcopy(st)
