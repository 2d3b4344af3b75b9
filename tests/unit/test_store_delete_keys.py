"""ObjectStore.delete_keys on the local store: exactly the keys given, nothing beside them
(what a failed export uses instead of deleting its whole prefix)."""

from __future__ import annotations

from pathlib import Path

import pytest

from service.backends.storage.local import LocalStore

P = "projects/p/models/shared/"


@pytest.fixture
def local(tmp_path: Path) -> LocalStore:
    store = LocalStore(tmp_path / "store", base_url="http://127.0.0.1:8080", signing_key=b"k" * 32)
    for key in ("mine/saved_model.pb", "mine/variables/v.data", "theirs/saved_model.pb", "x.pb"):
        store.put(P + key, key.encode())
    return store


def keys(store: LocalStore) -> list[str]:
    return [i.key[len(P) :] for i in store.list(P)]


def test_deletes_exactly_the_keys_given(local: LocalStore) -> None:
    mine = [P + "mine/saved_model.pb", P + "mine/variables/v.data", P + "mine/never-written"]
    assert local.delete_keys(mine, within=P) == 2
    assert keys(local) == ["theirs/saved_model.pb", "x.pb"]
    assert not (local.root / P / "mine").exists()  # empty directories go too
    assert local.delete_keys(mine, within=P) == 0  # idempotent
    assert keys(local) == ["theirs/saved_model.pb", "x.pb"]
    assert local.delete_keys([]) == 0


def test_a_key_outside_within_deletes_nothing(local: LocalStore) -> None:
    with pytest.raises(ValueError, match="outside"):
        local.delete_keys([P + "x.pb", "projects/p/staging/pkg.tgz"], within=P)
    with pytest.raises(ValueError):
        local.delete_keys([P + "x.pb", P + "../escape"])
    with pytest.raises(TypeError):
        local.delete_keys(P + "x.pb")  # one key, not a collection of them
    assert keys(local) == [
        "mine/saved_model.pb",
        "mine/variables/v.data",
        "theirs/saved_model.pb",
        "x.pb",
    ]


def test_a_prefix_is_not_an_object(local: LocalStore) -> None:
    """A key naming a directory deletes nothing under it (unlike delete_prefix)."""
    assert local.delete_keys([P + "mine"]) == 0
    with pytest.raises(ValueError):
        local.delete_keys([P + "mine/"])  # not a key at all
    assert len(keys(local)) == 4
