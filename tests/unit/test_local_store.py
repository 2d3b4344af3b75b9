"""The local object store and its signed-URL endpoint, /v1/store."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path
from urllib.parse import parse_qs, quote, urlsplit

import pytest

from service.backends.interfaces import Access
from service.backends.storage.local import LocalStore, sign
from service.domain.errors import GrantDenied, StoreError

KEY = b"k" * 32


@pytest.fixture
def local(tmp_path: Path) -> LocalStore:
    return LocalStore(tmp_path / "store", base_url="http://127.0.0.1:8080/", signing_key=KEY)


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


# -- objects ------------------------------------------------------------------------------


def test_put_get_info(local):
    info = local.put("a/b/c.txt", b"hello")
    assert (info.key, info.size, info.etag) == ("a/b/c.txt", 5, md5(b"hello"))
    assert local.get("a/b/c.txt") == b"hello"
    assert local.info("a/b/c.txt") == info
    assert local.uri("a/b/c.txt") == "local://a/b/c.txt"
    assert local.key_of("local://a/b/c.txt") == "a/b/c.txt"
    with pytest.raises(KeyError):
        local.get("a/b/missing")
    with pytest.raises(KeyError):
        local.get("a/b")  # a prefix, not an object
    assert local.info("a/b") is None


def test_overwrite_and_put_file(local, tmp_path):
    local.put("x", b"one")
    src = tmp_path / "src.bin"
    src.write_bytes(b"two!" * 1000)
    info = local.put_file("x", str(src))
    assert info.etag == md5(src.read_bytes())
    assert local.get("x") == src.read_bytes()
    assert local.info("x") == info
    assert src.exists()  # put_file copies


def test_etag_is_recomputed_when_the_sidecar_is_stale(local):
    local.put("k", b"data")
    local.path("k").write_bytes(b"changed behind our back")
    assert local.info("k").etag == md5(b"changed behind our back")


def test_no_temporary_files_remain(local):
    local.put("a/b", b"x")
    with pytest.raises(StoreError):
        local.put_stream("a/c", _Reader(b"body"), expected_md5="0" * 32)
    assert local.info("a/c") is None
    assert list((local.root / ".stackml" / "tmp").iterdir()) == []


def test_list_is_sorted_and_prefix_based(local):
    for k in ("p/b/2", "p/a/1", "p/ab", "q/1", "p/b/1"):
        local.put(k, k.encode())
    assert [i.key for i in local.list("p/")] == ["p/a/1", "p/ab", "p/b/1", "p/b/2"]
    assert [i.key for i in local.list("p/a")] == ["p/a/1", "p/ab"]
    assert [i.key for i in local.list("p/b/")] == ["p/b/1", "p/b/2"]
    assert [i.key for i in local.list("")] == ["p/a/1", "p/ab", "p/b/1", "p/b/2", "q/1"]
    assert local.list("nothing/") == []


def test_delete_is_idempotent_and_prunes(local):
    local.put("d/e/f", b"x")
    local.delete("d/e/f")
    local.delete("d/e/f")
    local.delete("never/was")
    assert local.list("") == []
    assert not (local.root / "d").exists()


def test_key_and_prefix_collision_is_a_store_error(local):
    local.put("a/b", b"x")
    with pytest.raises(StoreError):
        local.put("a/b/c", b"y")


@pytest.mark.parametrize(
    "key",
    [
        "",
        "/abs",
        "a/../b",
        "..",
        "a/./b",
        "a//b",
        "a/b/",
        "nul\x00",
        "tab\tname",
        "new\nline",
        ".stackml/tmp/x",
        "back\\slash",
        "x" * 2000,
    ],
)
def test_bad_keys_are_rejected(local, key):
    with pytest.raises(ValueError):
        local.put(key, b"x")
    with pytest.raises(ValueError):
        local.path(key)


# -- grants -------------------------------------------------------------------------------


def test_grant_shape_and_verify(local):
    g = local.grant("projects/p/models/j/", Access.WRITE, 60)
    assert g.url_prefix == "http://127.0.0.1:8080/v1/store/projects/p/models/j/"
    q = {k: v[0] for k, v in parse_qs(g.query).items()}
    assert set(q) == {"temp_url_sig", "temp_url_expires", "temp_url_prefix"}
    assert q["temp_url_prefix"] == g.prefix
    assert int(q["temp_url_expires"]) == g.expires_at
    assert abs(g.expires_at - time.time() - 60) < 5
    assert q["temp_url_sig"] == sign(KEY, "PUT", g.expires_at, g.prefix)
    local.verify(
        "PUT",
        "projects/p/models/j/saved_model.pb",
        q["temp_url_sig"],
        q["temp_url_expires"],
        g.prefix,
    )
    local.verify("HEAD", "projects/p/models/j/x", q["temp_url_sig"], g.expires_at, g.prefix)
    for method, key in (
        ("GET", "projects/p/models/j/x"),
        ("PUT", "projects/p/other"),
        ("PUT", "projects/p/models/j/../k/x"),
    ):
        with pytest.raises(GrantDenied):
            local.verify(method, key, q["temp_url_sig"], g.expires_at, g.prefix)


def test_grant_needs_a_prefix_and_ttl(local):
    with pytest.raises(ValueError):
        local.grant("", Access.READ, 60)
    with pytest.raises(ValueError):
        local.grant("a/", Access.READ, 0)


# -- /v1/store over HTTP ------------------------------------------------------------------


def path_of(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.path}?{parts.query}"


def test_signed_get_and_put(client, store, error_of):
    store.put("projects/local/data/x y.csv", b"1,2\n")
    read = store.grant("projects/local/data/", Access.READ, 60)
    url = LocalStore.object_url(read, "x y.csv")
    assert "x%20y.csv?" in url
    resp = client.get(path_of(url))
    assert resp.status_code == 200 and resp.data == b"1,2\n"
    assert resp.headers["ETag"].strip('"') == md5(b"1,2\n")
    head = client.head(path_of(url))
    assert head.status_code == 200 and head.headers["Content-Length"] == "4"
    error_of(client.get(path_of(LocalStore.object_url(read, "missing"))), 404, "not_found")

    write = store.grant("projects/local/models/job-1/", Access.WRITE, 60)
    body = b"\x00model bytes" * 1000
    put = client.put(path_of(LocalStore.object_url(write, "variables/v.data")), data=body)
    assert put.status_code == 201
    assert put.headers["ETag"].strip('"') == md5(body)
    assert store.get("projects/local/models/job-1/variables/v.data") == body
    # a write grant may HEAD what it wrote, as in Swift
    assert client.head(path_of(LocalStore.object_url(write, "variables/v.data"))).status_code == 200


def test_put_with_matching_and_mismatching_etag(client, store, error_of):
    write = store.grant("projects/local/m/", Access.WRITE, 60)
    url = path_of(LocalStore.object_url(write, "f"))
    assert client.put(url, data=b"abc", headers={"Etag": md5(b"abc")}).status_code == 201
    error_of(client.put(url, data=b"abd", headers={"Etag": md5(b"abc")}), 422)
    assert store.get("projects/local/m/f") == b"abc"


def test_expired_grant_is_401(client, store, error_of):
    store.put("projects/local/a", b"x")
    expired = int(time.time()) - 1
    sig = sign(store._signing_key, "GET", expired, "projects/local/")
    url = (
        f"/v1/store/projects/local/a?temp_url_sig={sig}&temp_url_expires={expired}"
        "&temp_url_prefix=projects/local/"
    )
    err = error_of(client.get(url), 401, "grant_denied")
    assert "expired" in err["message"]


def test_tampered_and_misused_signatures_are_401(client, store, error_of):
    store.put("projects/local/data/a", b"x")
    store.put("projects/local/secret", b"s")
    read = store.grant("projects/local/data/", Access.READ, 60)
    good = path_of(LocalStore.object_url(read, "a"))
    assert client.get(good).status_code == 200
    q = {k: v[0] for k, v in parse_qs(read.query).items()}
    sig = q["temp_url_sig"]
    tampered = good.replace(sig, ("0" if sig[0] != "0" else "1") + sig[1:])
    widened = good.replace(
        "temp_url_prefix=projects%2Flocal%2Fdata%2F", "temp_url_prefix=projects%2Flocal%2F"
    )
    later = good.replace(
        f"temp_url_expires={read.expires_at}", f"temp_url_expires={read.expires_at + 3600}"
    )
    outside = f"/v1/store/projects/local/secret?{read.query}"
    dotdot = f"/v1/store/projects/local/data/%2e%2e/secret?{read.query}"
    for url in (
        tampered,
        widened,
        later,
        outside,
        dotdot,
        "/v1/store/projects/local/data/a",
        good.replace(f"temp_url_sig={sig}", "temp_url_sig=\u00e9"),
    ):
        error_of(client.get(url), 401, "grant_denied")
    error_of(client.put(good, data=b"overwrite"), 401, "grant_denied")  # read can't PUT
    assert store.get("projects/local/data/a") == b"x"


def test_write_grant_cannot_read(client, store, error_of):
    store.put("projects/local/m/x", b"x")
    write = store.grant("projects/local/m/", Access.WRITE, 60)
    error_of(client.get(path_of(LocalStore.object_url(write, "x"))), 401, "grant_denied")


def test_store_urls_need_no_auth_and_quote_keys(client, store):
    store.put("projects/local/d/ü +.txt", b"u")
    read = store.grant("projects/local/d/", Access.READ, 60)
    url = LocalStore.object_url(read, "ü +.txt")
    assert quote("ü +.txt") in url
    assert client.get(path_of(url)).data == b"u"


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data = data

    def read(self, n: int = -1) -> bytes:
        out, self.data = self.data, b""
        return out
