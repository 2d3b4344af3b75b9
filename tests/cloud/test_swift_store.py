"""SwiftStore and the runner's export against real Swift (Keystone auth, TempURL, SLO)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from devcloud.cloud import DevCloud
from service.backends.interfaces import Access, Grant, ObjectInfo
from service.backends.storage.swift import SEGMENTS_DIR, SwiftStore, slo_etag
from service.domain.errors import StoreError

RUNNER = Path(__file__).resolve().parents[2] / "workers" / "vm" / "runner.py"
SEGMENT = 64 * 1024
TIMEOUT = 30


def md5(data: bytes) -> str:
    return hashlib.md5(data, usedforsecurity=False).hexdigest()


@pytest.fixture(scope="module")
def store(devcloud: DevCloud) -> SwiftStore:
    return SwiftStore(devcloud.connection("devcloud-stackml"), segment_bytes=SEGMENT)


@pytest.fixture
def prefix(store: SwiftStore) -> Iterator[str]:
    """A fresh project's container, emptied afterwards."""
    p = store.project_prefix(f"t{uuid.uuid4().hex[:10]}")
    yield p
    store.delete_prefix(p)


def signed(grant: Grant, rel: str) -> str:
    from urllib.parse import quote

    return f"{grant.url_prefix}{quote(rel)}?{grant.query}"


# -- the store ----------------------------------------------------------------------------


def test_round_trip_list_delete(store: SwiftStore, prefix: str) -> None:
    info = store.put(prefix + "a/one.txt", b"hello")
    assert info == ObjectInfo(prefix + "a/one.txt", 5, md5(b"hello"))
    store.put(prefix + "a/two.txt", b"world!")
    store.put(prefix + "b/three.txt", b"")
    assert store.get(prefix + "a/one.txt") == b"hello"
    assert [o.key for o in store.list(prefix + "a/")] == [
        prefix + "a/one.txt",
        prefix + "a/two.txt",
    ]
    assert {o.key: (o.size, o.etag) for o in store.list(prefix)} == {
        prefix + "a/one.txt": (5, md5(b"hello")),
        prefix + "a/two.txt": (6, md5(b"world!")),
        prefix + "b/three.txt": (0, md5(b"")),
    }
    store.delete(prefix + "a/one.txt")
    store.delete(prefix + "a/one.txt")  # idempotent
    store.delete(prefix + "never/was.txt")
    with pytest.raises(KeyError):
        store.get(prefix + "a/one.txt")
    assert [o.key for o in store.list(prefix + "a/")] == [prefix + "a/two.txt"]
    assert store.list(store.project_prefix("no-such-project")) == []


def test_keys_are_container_and_path(store: SwiftStore) -> None:
    assert store.project_prefix("p1") == "stackml-p1/"
    assert store.uri("stackml-p1/models/x/") == "swift://stackml-p1/models/x/"
    for bad in ("nocontainer", "c/../x", "c//x", "/c/x", "c/x\n"):
        with pytest.raises(ValueError):
            store.put(bad, b"x")


def test_large_objects_are_slos_with_swift_etags(
    store: SwiftStore, prefix: str, tmp_path: Path
) -> None:
    data = os.urandom(SEGMENT * 2 + 123)
    seg_md5s = [md5(data[i : i + SEGMENT]) for i in range(0, len(data), SEGMENT)]
    info = store.put(prefix + "big.bin", data)
    assert info.size == len(data)
    assert info.etag == slo_etag(seg_md5s) != md5(data)
    head = requests.head(
        f"{store.endpoint}/{prefix}big.bin",
        headers={"X-Auth-Token": store.session.get_token()},
        timeout=TIMEOUT,
    )
    assert head.headers["X-Static-Large-Object"].lower() == "true"
    assert head.headers["Etag"].strip('"') == info.etag
    assert store.list(prefix) == [info]  # the listing reports the SLO etag and full size
    assert store.get(prefix + "big.bin") == data
    segs_container = prefix.rstrip("/") + "_segments/"
    assert len(store.list(segs_container)) == 3

    # overwrite from a file: the old version's segments go
    path = tmp_path / "big2"
    data2 = os.urandom(SEGMENT * 3 + 1)
    path.write_bytes(data2)
    info2 = store.put_file(prefix + "big.bin", str(path))
    assert info2.etag == slo_etag(
        [md5(data2[i : i + SEGMENT]) for i in range(0, len(data2), SEGMENT)]
    )
    assert store.get(prefix + "big.bin") == data2
    assert len(store.list(segs_container)) == 4

    store.delete(prefix + "big.bin")
    assert store.list(prefix) == []
    assert store.list(segs_container) == []  # deleting an SLO deletes its segments


def test_delete_keys_deletes_exactly_those_keys(store: SwiftStore, prefix: str) -> None:
    """What a failed export removes: the objects its run wrote (an SLO with its segments, the
    runner's own segment objects), never a neighbour under the same prefix."""
    m = prefix + "models/shared/"
    store.put(m + "mine/a.pb", b"a")
    big = store.put(m + "mine/big.bin", os.urandom(SEGMENT * 2 + 1))
    runner_seg = m + f"{SEGMENTS_DIR}/mine/x.bin/00000000"
    store.put(runner_seg, b"segment")
    store.put(m + "theirs/a.pb", b"theirs")
    segs_container = prefix.rstrip("/") + "_segments/"
    assert len(store.list(segs_container)) == 3
    mine = [m + "mine/a.pb", big.key, runner_seg, m + "mine/never-written"]
    with pytest.raises(ValueError, match="outside"):
        store.delete_keys([*mine, prefix + "staging/pkg.tgz"], within=m)
    assert len(list(store._list(m))) == 4  # nothing went
    assert store.delete_keys(mine, within=m) == 3
    assert [o.key for o in store._list(m)] == [m + "theirs/a.pb"]
    assert store.list(segs_container) == []  # the SLO took its segments
    assert store.delete_keys(mine, within=m) == 0  # idempotent


# -- grants -------------------------------------------------------------------------------


def test_read_grant_reads_and_cannot_write(store: SwiftStore, prefix: str) -> None:
    store.put(prefix + "data/x.csv", b"1,2\n")
    grant = store.grant(prefix + "data/", Access.READ, 60)
    assert grant.url_prefix.startswith(store.endpoint)
    assert "temp_url_prefix=data%2F" in grant.query
    r = requests.get(signed(grant, "x.csv"), timeout=TIMEOUT)
    assert r.status_code == 200 and r.content == b"1,2\n"
    assert requests.head(signed(grant, "x.csv"), timeout=TIMEOUT).status_code == 200
    r = requests.put(signed(grant, "y.csv"), data=b"evil", timeout=TIMEOUT)
    assert r.status_code == 401
    r = requests.delete(signed(grant, "x.csv"), timeout=TIMEOUT)
    assert r.status_code == 401
    # a single-object grant (how a trainer package is fetched)
    one = store.grant(prefix + "data/x.csv", Access.READ, 60)
    assert requests.get(signed(one, ""), timeout=TIMEOUT).content == b"1,2\n"


def test_write_grant_stays_inside_its_prefix(store: SwiftStore, prefix: str) -> None:
    grant = store.grant(prefix + "models/job-a/", Access.WRITE, 60)
    assert grant.segment_bytes == SEGMENT
    r = requests.put(signed(grant, "saved_model.pb"), data=b"model", timeout=TIMEOUT)
    assert r.status_code == 201 and r.headers["Etag"].strip('"') == md5(b"model")
    assert store.get(prefix + "models/job-a/saved_model.pb") == b"model"
    # the same signature on a neighbour's prefix, another container, or another prefix claim
    base, _, _ = grant.url_prefix.partition("/models/job-a/")
    for url in (
        f"{base}/models/job-b/saved_model.pb?{grant.query}",
        f"{base}/models/job-a-evil?{grant.query}",
        f"{store.endpoint}/stackml-other/models/job-a/x?{grant.query}",
        f"{base}/models/x?{grant.query.replace('job-a', 'x')}",
    ):
        r = requests.put(url, data=b"evil", timeout=TIMEOUT)
        assert r.status_code == 401, url
    # a write grant does not read
    assert requests.get(signed(grant, "saved_model.pb"), timeout=TIMEOUT).status_code == 401
    assert [o.key for o in store.list(prefix)] == [prefix + "models/job-a/saved_model.pb"]


def test_grant_cannot_be_used_after_it_expires(store: SwiftStore, prefix: str) -> None:
    grant = store.grant(prefix + "models/", Access.WRITE, 1)
    time.sleep(max(0.0, grant.expires_at - time.time()) + 1.1)
    r = requests.put(signed(grant, "late.bin"), data=b"late", timeout=TIMEOUT)
    assert r.status_code == 401
    assert store.list(prefix) == []


def test_tampered_signature_is_refused(store: SwiftStore, prefix: str) -> None:
    grant = store.grant(prefix + "m/", Access.WRITE, 60)
    sig = grant.query.split("temp_url_sig=")[1].split("&")[0]
    bad = grant.query.replace(sig, sig[:-1] + ("0" if sig[-1] != "0" else "1"))
    r = requests.put(f"{grant.url_prefix}x?{bad}", data=b"x", timeout=TIMEOUT)
    assert r.status_code == 401
    later = grant.query.replace(
        f"temp_url_expires={grant.expires_at}", f"temp_url_expires={grant.expires_at + 3600}"
    )
    assert (
        requests.put(f"{grant.url_prefix}x?{later}", data=b"x", timeout=TIMEOUT).status_code == 401
    )


def test_configured_temp_url_key_is_set_on_the_account(devcloud: DevCloud, prefix: str) -> None:
    conn = devcloud.connection("devcloud-stackml")
    key = uuid.uuid4().hex
    configured = SwiftStore(conn, temp_url_key=key)
    grant = configured.grant(prefix + "k/", Access.WRITE, 60)
    assert configured.temp_url_key() == key
    assert requests.put(signed(grant, "a"), data=b"a", timeout=TIMEOUT).status_code == 201
    # a second store (another worker) signs with the same key: both grants work
    again = SwiftStore(devcloud.connection("devcloud-stackml"), temp_url_key=key)
    grant2 = again.grant(prefix + "k/", Access.READ, 60)
    assert requests.get(signed(grant2, "a"), timeout=TIMEOUT).content == b"a"


# -- the runner's export ------------------------------------------------------------------


def run_export(job_dir: Path, grant: Grant) -> subprocess.CompletedProcess[str]:
    doc = {
        "url_prefix": grant.url_prefix,
        "query": grant.query,
        "segment_bytes": grant.segment_bytes,
    }
    return subprocess.run(
        [sys.executable, str(RUNNER), "export", str(job_dir)],
        input=json.dumps(doc),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def export_ok(job_dir: Path, grant: Grant) -> list[dict[str, Any]]:
    proc = run_export(job_dir, grant)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["ok"] is True
    objects: list[dict[str, Any]] = result["objects"]
    return objects


def complete_and_verify(store: SwiftStore, prefix: str, objects: list[dict[str, Any]]) -> None:
    """What the worker's export step does after the runner: join SLO segments into manifests,
    then compare the store's listing with the runner's report (StoreError/AssertionError)."""
    for obj in objects:
        if obj.get("segments"):
            segs = [ObjectInfo(prefix + s["key"], s["size"], s["etag"]) for s in obj["segments"]]
            store.put_manifest(prefix + obj["key"], segs, expected_etag=obj["etag"])
    stored = {o.key: o for o in store.list(prefix)}
    for obj in objects:
        got = stored.get(prefix + obj["key"])
        assert got is not None, f"{obj['key']} is missing"
        assert (got.etag, got.size) == (obj["etag"], obj["size"]), f"{obj['key']} differs"


def make_model(job_dir: Path) -> dict[str, bytes]:
    files = {
        "saved_model.pb": os.urandom(1000),
        "fingerprint.pb": b"",
        "variables/variables.data-00000-of-00001": os.urandom(SEGMENT * 3 + 77),
        "variables/variables.index": os.urandom(SEGMENT),  # exactly one segment: not split
        "assets/vocab.txt": b"a\nb\n",
    }
    for rel, data in files.items():
        p = job_dir / "model" / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
    return files


def test_runner_exports_an_slo_that_the_store_lists_with_the_same_etag(
    store: SwiftStore, prefix: str, tmp_path: Path
) -> None:
    files = make_model(tmp_path)
    target = prefix + "models/job-1/"
    objects = export_ok(tmp_path, store.grant(target, Access.WRITE, 600))
    by_key = {o["key"]: o for o in objects}
    assert set(by_key) == set(files)
    big = by_key["variables/variables.data-00000-of-00001"]
    assert [s["size"] for s in big["segments"]] == [SEGMENT, SEGMENT, SEGMENT, 77]
    assert all(s["key"].startswith(f"{SEGMENTS_DIR}/variables/") for s in big["segments"])
    assert big["etag"] == slo_etag([s["etag"] for s in big["segments"]])
    assert "segments" not in by_key["variables/variables.index"]
    assert by_key["saved_model.pb"]["etag"] == md5(files["saved_model.pb"])

    complete_and_verify(store, target, objects)
    # the model reads back whole; the listing hides the runner's segment objects
    for rel, data in files.items():
        assert store.get(target + rel) == data
    assert sorted(o.key for o in store.list(target)) == sorted(target + k for k in files)
    # deleting the model takes the segments too
    for o in store.list(target):
        store.delete(o.key)
    assert list(store._list(target)) == []


def test_runner_exports_plain_objects_without_segmenting(
    devcloud: DevCloud, prefix: str, tmp_path: Path
) -> None:
    plain = SwiftStore(devcloud.connection("devcloud-stackml"), segment_bytes=0)
    files = make_model(tmp_path)
    target = prefix + "models/job-plain/"
    objects = export_ok(tmp_path, plain.grant(target, Access.WRITE, 600))
    assert not any("segments" in o for o in objects)
    assert {o["key"]: o["etag"] for o in objects} == {k: md5(v) for k, v in files.items()}
    complete_and_verify(plain, target, objects)


def test_a_segment_corrupted_after_upload_is_detected(
    store: SwiftStore, prefix: str, tmp_path: Path
) -> None:
    make_model(tmp_path)
    target = prefix + "models/job-2/"
    objects = export_ok(tmp_path, store.grant(target, Access.WRITE, 600))
    big = next(o for o in objects if o.get("segments"))
    seg = big["segments"][1]
    # the stored segment changes (bit rot, a racing writer) before the manifest is made
    store.put(target + seg["key"], os.urandom(seg["size"]))
    with pytest.raises(StoreError) as exc:
        complete_and_verify(store, target, objects)
    assert exc.value.reason == "upload_failed"
    assert "segment differs" in str(exc.value)
    assert store.info(target + big["key"]) is None  # no manifest was written


def test_a_wrong_etag_from_the_runner_is_detected(
    store: SwiftStore, prefix: str, tmp_path: Path
) -> None:
    make_model(tmp_path)
    target = prefix + "models/job-3/"
    objects = export_ok(tmp_path, store.grant(target, Access.WRITE, 600))
    # a runner that misreports: the SLO's etag, then a plain object's etag
    slo = next(o for o in objects if o.get("segments"))
    with pytest.raises(StoreError):
        complete_and_verify(store, target, [{**slo, "etag": "0" * 32}])
    seg_wrong = {
        **slo,
        "segments": [{**slo["segments"][0], "etag": "0" * 32}, *slo["segments"][1:]],
    }
    with pytest.raises(StoreError):
        complete_and_verify(
            store,
            target,
            [{**seg_wrong, "etag": slo_etag([s["etag"] for s in seg_wrong["segments"]])}],
        )
    plain = next(o for o in objects if not o.get("segments") and o["size"] > 0)
    with pytest.raises(AssertionError, match="differs"):
        complete_and_verify(store, target, [{**plain, "etag": md5(b"something else")}])
    with pytest.raises(AssertionError, match="differs"):
        complete_and_verify(store, target, [{**plain, "size": plain["size"] + 1}])


def test_a_segment_changed_after_the_manifest_fails_the_read(
    store: SwiftStore, prefix: str
) -> None:
    data = os.urandom(SEGMENT * 2 + 5)
    store.put(prefix + "m.bin", data)
    manifest = requests.get(
        f"{store.endpoint}/{prefix}m.bin",
        params={"multipart-manifest": "get"},
        headers={"X-Auth-Token": store.session.get_token()},
        timeout=TIMEOUT,
    ).json()
    seg_key = manifest[0]["name"].lstrip("/")
    store.put(seg_key, os.urandom(SEGMENT))
    with pytest.raises(StoreError):
        store.get(prefix + "m.bin")


def test_runner_export_with_an_expired_grant_fails_with_401(
    store: SwiftStore, prefix: str, tmp_path: Path
) -> None:
    make_model(tmp_path)
    grant = store.grant(prefix + "models/job-4/", Access.WRITE, 1)
    time.sleep(max(0.0, grant.expires_at - time.time()) + 1.1)
    proc = run_export(tmp_path, grant)
    assert proc.returncode == 3
    assert "401" in proc.stderr
    assert list(store._list(prefix)) == []
