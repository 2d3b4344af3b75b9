"""Export's check of the runner's upload report against the store (`export.unverified`)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from service.backends.interfaces import ObjectInfo
from service.backends.storage.local import LocalStore
from workers.steps.export import unverified

PREFIX = "projects/p1/models/job-1/"


class LaggingListing(LocalStore):
    """A store whose container listing has not caught up with some writes yet (what a busy
    Swift does: listings are updated after the object write returned)."""

    hidden: frozenset[str] = frozenset()
    heads = 0  # objects asked about one by one (not as part of a listing)
    _listing = False

    def list(self, prefix: str) -> list[ObjectInfo]:
        self._listing = True
        try:
            return [o for o in super().list(prefix) if o.key not in self.hidden]
        finally:
            self._listing = False

    def info(self, key: str) -> ObjectInfo | None:
        self.heads += not self._listing
        return super().info(key)


@pytest.fixture
def store(tmp_path: Path) -> LaggingListing:
    return LaggingListing(tmp_path / "store", base_url="http://127.0.0.1:1/", signing_key=b"k" * 32)


def report(**files: bytes) -> list[dict[str, object]]:
    return [
        {"key": k, "size": len(v), "etag": hashlib.md5(v).hexdigest()} for k, v in files.items()
    ]


def test_all_listed_verifies_with_one_listing(store: LaggingListing) -> None:
    store.put(PREFIX + "saved_model.pb", b"graph")
    store.put(PREFIX + "variables/v.index", b"idx")
    assert unverified(store, PREFIX, report(**{"saved_model.pb": b"graph"})) is None
    objs = report(**{"saved_model.pb": b"graph", "variables/v.index": b"idx"})
    assert unverified(store, PREFIX, objs) is None
    assert store.heads == 0  # nothing asked object by object


def test_an_object_the_listing_lags_behind_is_asked_about_itself(store: LaggingListing) -> None:
    store.put(PREFIX + "saved_model.pb", b"graph")
    store.hidden = frozenset({PREFIX + "saved_model.pb"})
    assert unverified(store, PREFIX, report(**{"saved_model.pb": b"graph"})) is None
    assert store.heads == 1


def test_missing_or_different_objects_do_not_verify(store: LaggingListing) -> None:
    store.put(PREFIX + "saved_model.pb", b"graph")
    assert unverified(store, PREFIX, report(**{"other.pb": b"graph"})) == "other.pb"
    assert unverified(store, PREFIX, report(**{"saved_model.pb": b"graph!"})) == "saved_model.pb"
    wrong_size = [{"key": "saved_model.pb", "size": 99, "etag": hashlib.md5(b"graph").hexdigest()}]
    assert unverified(store, PREFIX, wrong_size) == "saved_model.pb"
