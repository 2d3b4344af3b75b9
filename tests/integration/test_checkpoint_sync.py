"""The runner's checkpoint sync and restore (workers/vm/runner.py) against the real store gateway
(service/api/store.py over HTTP, a LocalStore behind it) with the grants the provision step
makes: new and changed files go up, only from a directory that has been quiet; links and what
was synced already do not; a restore fetches every file byte for byte and is not uploaded
again; a grant that does not cover the prefix is one line in the log, never an exception."""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from werkzeug.serving import make_server

from service.api.store import create_gateway_app
from service.backends.interfaces import Access
from service.backends.storage.local import LocalStore
from service.config import Settings
from tests.envutil import free_port
from workers.steps.provision import sign
from workers.vm import runner

PREFIX = "projects/p/checkpoints/job-1/"


@pytest.fixture
def store(tmp_path: Path) -> Iterator[LocalStore]:
    port = free_port()
    st = LocalStore(tmp_path / "store", f"http://127.0.0.1:{port}", b"k" * 32)
    server = make_server("127.0.0.1", port, create_gateway_app(Settings(), store=st), threaded=True)
    t = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    t.start()
    yield st
    server.shutdown()
    t.join(timeout=10)


def job_dir(root: Path) -> Path:
    (root / "checkpoints").mkdir(parents=True)
    (root / "log").write_bytes(b"")
    return root


def sync_of(store: LocalStore, job: Path, prefix: str = PREFIX) -> runner._CheckpointSync:
    g = store.grant(prefix, Access.WRITE, 600)
    return runner._CheckpointSync(str(job), {"url_prefix": g.url_prefix, "query": g.query})


def aged(path: Path, seconds: float = 5.0) -> None:
    """As if written `seconds` ago (the directory is quiet)."""
    t = time.time() - seconds
    os.utime(path, (t, t))


def recording(sync: runner._CheckpointSync) -> list[str]:
    """The keys the sync's passes upload, in order (appended as each is sent)."""
    order: list[str] = []
    put = sync.uploader.put

    def recorded(key: str, path: str | int, offset: int, length: int) -> str:
        order.append(key)
        return put(key, path, offset, length)

    sync.uploader.put = recorded  # type: ignore[method-assign]
    return order


def stored(store: LocalStore) -> dict[str, bytes]:
    return {o.key[len(PREFIX) :]: store.get(o.key) for o in store.list(PREFIX)}


def test_sync_uploads_a_quiet_directory_once_and_changes_after(
    store: LocalStore, tmp_path: Path
) -> None:
    job = job_dir(tmp_path / "job")
    ck = job / "checkpoints"
    (ck / "nested" / "deeper").mkdir(parents=True)
    files = {
        "checkpoint": b"model_checkpoint_path: ckpt-1\n",
        "nested/deeper/ckpt-1.data": os.urandom(300_000),
        "name with spaces.index": b"\x00\x01",
    }
    for rel, body in files.items():
        (ck / rel).write_bytes(body)
        aged(ck / rel)
    (ck / "link").symlink_to("/etc/hostname")
    sync = sync_of(store, job)

    (ck / "fresh").write_bytes(b"being written")  # just now: the directory is not quiet
    assert sync.run_pass(final=False) is None and stored(store) == {}
    aged(ck / "fresh")
    files["fresh"] = b"being written"
    assert sync.run_pass(final=False) == 4
    assert stored(store) == files  # the link is not a checkpoint
    assert sync.run_pass(final=False) == 0  # nothing changed: nothing sent

    (ck / "checkpoint").write_bytes(b"model_checkpoint_path: ckpt-2\n")
    (ck / "ckpt-2.data").write_bytes(b"two")
    assert sync.run_pass(final=True) == 2  # the final pass does not wait for quiet
    assert stored(store)["checkpoint"] == b"model_checkpoint_path: ckpt-2\n"
    assert stored(store)["ckpt-2.data"] == b"two"
    # what was sent is remembered across a runner restart on the same server
    assert sync_of(store, job).run_pass(final=True) == 0
    assert (job / "log").read_bytes() == b""


def test_a_save_during_a_long_pass_never_leaves_an_index_naming_data_the_store_lacks(
    store: LocalStore, tmp_path: Path
) -> None:
    """The trainer saves its next checkpoint while a pass is still sending the last one's data
    (a large upload outlasts the quiet): the new index, renamed into place as TensorFlow does,
    is not sent by that pass; the store keeps the old index until the next pass has sent the
    new data first."""
    job = job_dir(tmp_path / "job")
    ck = job / "checkpoints"
    (ck / "ckpt-1.data").write_bytes(b"one" * 1000)
    (ck / "checkpoint").write_bytes(b"model_checkpoint_path: ckpt-1\n")
    for f in ("ckpt-1.data", "checkpoint"):
        aged(ck / f, 5.0 if f != "checkpoint" else 4.0)  # the index written after its data
    sync = sync_of(store, job)
    order = recording(sync)
    put = sync.uploader.put
    saved: list[bool] = []

    def save_meanwhile(key: str, path: str | int, offset: int, length: int) -> str:
        etag = put(key, path, offset, length)
        if key == "ckpt-1.data" and not saved:  # the next save, while this pass goes on
            saved.append(True)
            (ck / "ckpt-2.data").write_bytes(b"two" * 1000)
            tmp = ck / "checkpoint.tmp"
            tmp.write_bytes(b"model_checkpoint_path: ckpt-2\n")  # same size as the old one
            os.replace(tmp, ck / "checkpoint")
        return etag

    sync.uploader.put = save_meanwhile  # type: ignore[method-assign]
    assert sync.run_pass(final=False) is None  # stopped at the index that changed
    assert saved and order == ["ckpt-1.data"]
    assert "checkpoint" not in stored(store)  # no index naming ckpt-2, whose data is not there
    for f in ("ckpt-2.data", "checkpoint"):
        aged(ck / f, 3.0 if f != "checkpoint" else 2.0)
    assert sync.run_pass(final=False) == 2
    assert order == ["ckpt-1.data", "ckpt-2.data", "checkpoint"]
    assert stored(store)["checkpoint"] == b"model_checkpoint_path: ckpt-2\n"
    assert (job / "log").read_bytes() == b""


def test_restore_fetches_every_file_and_the_sync_does_not_send_them_again(
    store: LocalStore, tmp_path: Path
) -> None:
    bodies = {"checkpoint": b"ckpt-7", "w/ckpt-7.data": os.urandom(70_000)}
    for rel, body in bodies.items():
        store.put(PREFIX + rel, body)
    read = store.grant(PREFIX, Access.READ, 600)
    items = [
        {
            "name": o.key[len(PREFIX) :],
            "url": sign(read.url_prefix, read.query, o.key[len(PREFIX) :]),
            "size": o.size,
            "md5": o.etag,
        }
        for o in store.list(PREFIX)
    ]
    job = job_dir(tmp_path / "next-server")
    assert runner._restore_checkpoints(str(job), items) == 2
    got = {
        str(p.relative_to(job / "checkpoints")): p.read_bytes()
        for p in (job / "checkpoints").rglob("*")
        if p.is_file()
    }
    assert got == bodies
    assert sync_of(store, job).run_pass(final=True) == 0

    bad = [{**items[0], "name": "../../escape"}]
    with pytest.raises(runner.RunnerError, match="must be relative"):
        runner._restore_checkpoints(str(job_dir(tmp_path / "evil")), bad)
    wrong = [{**items[0], "md5": "0" * 32}]
    with pytest.raises(runner.RunnerError, match="md5"):
        runner._restore_checkpoints(str(job_dir(tmp_path / "torn")), wrong)


def test_a_refused_upload_is_one_log_line_and_the_next_pass_retries(
    store: LocalStore, tmp_path: Path
) -> None:
    job = job_dir(tmp_path / "job")
    (job / "checkpoints" / "ckpt").write_bytes(b"x")
    sync = sync_of(store, job, prefix="projects/other/checkpoints/job-1/")
    g = store.grant(PREFIX, Access.WRITE, 600)
    # a grant on another prefix, used for this one: the gateway refuses the signature
    sync.uploader = runner._Uploader(g.url_prefix.replace("/p/", "/q/"), g.query)
    assert sync.run_pass(final=True) == 0
    assert sync.run_pass(final=True) == 0
    lines = (job / "log").read_text().splitlines()
    assert len(lines) == 1 and lines[0].startswith("stackml-runner: checkpoint sync failed:")
    assert "403" in lines[0] or "401" in lines[0], lines
    sync.uploader = runner._Uploader(g.url_prefix, g.query)
    assert sync.run_pass(final=True) == 1
    assert stored(store) == {"ckpt": b"x"}
    assert json.loads((job / runner.SYNCED).read_text())["ckpt"][0] == 1


def test_a_pass_uploads_the_files_in_the_order_they_were_written(
    store: LocalStore, tmp_path: Path
) -> None:
    """The index a trainer writes last goes up last: a pass cut short after any upload leaves
    no index in the store naming data that is not there (names sort the other way here)."""
    job = job_dir(tmp_path / "job")
    ckpt = job / "checkpoints"
    (ckpt / "weights").mkdir()
    t = time.time() - 10
    for i, name in enumerate(["weights/w-2.bin", "weights/w-1.bin", "checkpoint"]):
        (ckpt / name).write_bytes(name.encode())
        os.utime(ckpt / name, (t + i, t + i))
    sync = sync_of(store, job)
    order = recording(sync)
    assert sync.run_pass(final=False) == 3
    assert order == ["weights/w-2.bin", "weights/w-1.bin", "checkpoint"]
    assert store.get(PREFIX + "checkpoint") == b"checkpoint"


def test_files_written_in_one_clock_tick_go_up_larger_first(
    store: LocalStore, tmp_path: Path
) -> None:
    """Files a trainer writes within one kernel clock tick share their mtime (CI saw a step
    counter sent before the weights it names, both written in the same tick): of those the
    larger go up first, so the small file that names the others (a step counter, TensorFlow's
    `checkpoint` index) goes last, whatever the names."""
    job = job_dir(tmp_path / "job")
    ckpt = job / "checkpoints"
    (ckpt / "weights").mkdir()
    t = time.time() - 10
    files = {"step": b"2", "weights/w-2.bin": bytes(4096), "ckpt-2.index": bytes(300)}
    for name, body in files.items():
        (ckpt / name).write_bytes(body)
        os.utime(ckpt / name, ns=(int(t * 1e9), int(t * 1e9)))  # one tick
    sync = sync_of(store, job)
    order = recording(sync)
    assert sync.run_pass(final=False) == 3
    assert order == ["weights/w-2.bin", "ckpt-2.index", "step"]
    assert stored(store) == files


def test_an_evaluators_feed_fetches_what_changed_and_moves_the_index_in_last(
    store: LocalStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The side-car evaluator's runner (`_CheckpointFeed`) against the gateway with the read
    grant the poll step signs: the files of the feed land in checkpoints/ byte for byte, the
    large first (TensorFlow's small `checkpoint` index last); an unchanged feed fetches
    nothing, a changed file is fetched again; a feed being written is read again later; a
    file whose MD5 does not match is refused."""
    import hashlib

    bodies = {"ckpt-1.data-00000-of-00001": os.urandom(50_000), "ckpt-1.index": b"i" * 300}
    bodies["checkpoint"] = b'model_checkpoint_path: "ckpt-1"\n'
    for name, body in bodies.items():
        store.put(PREFIX + name, body)
    grant = store.grant(PREFIX, Access.READ, 600)

    def feed_of(names: dict[str, bytes]) -> bytes:
        return json.dumps(
            [
                {
                    "name": n,
                    "url": sign(grant.url_prefix, grant.query, n),
                    "size": len(b),
                    "md5": hashlib.md5(b).hexdigest(),
                }
                for n, b in sorted(names.items())
            ]
        ).encode()

    job = job_dir(tmp_path / "job")
    feed = runner._CheckpointFeed(str(job))
    assert feed.run_pass() == 0  # no feed yet
    moved: list[str] = []
    real_replace = os.replace

    def recorded(src: str, dst: str) -> None:
        if Path(dst).parent == job / "checkpoints":  # (not a fetch's own .part -> aside)
            moved.append(Path(dst).name)
        real_replace(src, dst)

    monkeypatch.setattr(runner.os, "replace", recorded)
    (job / runner.FEED).write_bytes(feed_of(bodies))
    assert feed.run_pass() == 3
    assert moved == ["ckpt-1.data-00000-of-00001", "ckpt-1.index", "checkpoint"]
    for name, body in bodies.items():
        assert (job / "checkpoints" / name).read_bytes() == body
    assert feed.run_pass() == 0  # the same feed: nothing more
    bodies["checkpoint"] = b'model_checkpoint_path: "ckpt-2"\n'
    store.put(PREFIX + "checkpoint", bodies["checkpoint"])
    (job / runner.FEED).write_bytes(b'[{"name": "chec')  # being written
    os.utime(job / runner.FEED, ns=(1, 1))
    assert feed.run_pass() == 0
    (job / runner.FEED).write_bytes(feed_of(bodies))
    assert feed.run_pass() == 1  # only what changed
    assert (job / "checkpoints" / "checkpoint").read_bytes() == bodies["checkpoint"]
    forged = json.loads(feed_of({"ckpt-1.index": b"x" * 300}))
    (job / runner.FEED).write_bytes(json.dumps(forged).encode())
    with pytest.raises(runner.RunnerError):
        feed.run_pass()  # its bytes do not have the MD5 the feed names
