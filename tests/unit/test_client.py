"""The REST client against the real Flask app served over HTTP on an ephemeral port."""

from __future__ import annotations

import gzip
import io
import socket
import tarfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from werkzeug.serving import make_server
from werkzeug.wrappers import Request, Response

from service.client import (
    APIError,
    APIUnavailable,
    StackMLClient,
    WaitTimeout,
    build_package,
    describe_error,
)
from service.db import jobs as repo
from service.db.session import session_scope
from service.domain.states import JobState, Phase

FAST = 0.02


class DrivingRecorder:
    """Stands in for service.queue.enqueue; `on_allocate(job_id)` plays the workers."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []
        self.fail = False
        self.on_allocate: Callable[[str], None] | None = None
        self.threads: list[threading.Thread] = []

    def __call__(self, task: str, job_id: str) -> None:
        self.calls.append((task, job_id))
        if task == "stackml.allocate" and self.on_allocate is not None:
            t = threading.Thread(target=self.on_allocate, args=(job_id,), daemon=True)
            t.start()
            self.threads.append(t)


@pytest.fixture
def enqueued() -> Iterator[DrivingRecorder]:
    rec = DrivingRecorder()
    yield rec
    for t in rec.threads:
        t.join(timeout=10)


@pytest.fixture
def api(api_url: str) -> Iterator[StackMLClient]:
    with StackMLClient(api_url, timeout=10) as c:
        yield c


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def drive(
    db_url: str,
    job_id: str,
    *,
    outcome: str = "SUCCEEDED",
    log: bytes = b"",
    pause: float = FAST,
) -> None:
    """Move a job through its lifecycle the way the workers would."""
    path = [JobState.ALLOCATING, JobState.PROVISIONING, JobState.RUNNING]
    prev = JobState.QUEUED
    for state in path:
        time.sleep(pause)
        with session_scope(db_url) as s:
            assert repo.transition(s, job_id, prev, state, f"now {state.value.lower()}")
        prev = state
    offset = 0
    for line in log.splitlines(keepends=True):
        time.sleep(pause)
        with session_scope(db_url) as s:
            offset = repo.append_log(s, job_id, offset, line)
    time.sleep(pause)
    with session_scope(db_url) as s:
        if outcome == "SUCCEEDED":
            repo.transition(s, job_id, prev, JobState.EXPORTING, "trainer exited 0")
            repo.transition(s, job_id, JobState.EXPORTING, JobState.SUCCEEDED, "model exported")
        else:
            failure = repo.Failure(Phase.TRAIN, "trainer_exit_nonzero", "the trainer exited 3")
            repo.transition(s, job_id, prev, JobState.FAILED, failure=failure)


TRAINER_LOG = (
    b"starting\n"
    b'{"stackml_metric": 1, "epoch": 1, "loss": 0.5}\n'
    b'{"stackml_metric": 1, "epoch": 2, "loss": 0.25}\n'
    b"done\n"
)


def make_trainer(root: Path) -> Path:
    pkg = root / "mytrainer"
    (pkg / "trainer").mkdir(parents=True)
    (pkg / "trainer" / "__init__.py").write_text("")
    (pkg / "trainer" / "task.py").write_text("print('hi')\n")
    (pkg / "trainer" / "__pycache__").mkdir()
    (pkg / "trainer" / "__pycache__" / "task.cpython-311.pyc").write_bytes(b"junk")
    (pkg / "trainer" / "old.pyc").write_bytes(b"junk")
    (pkg / ".git").mkdir()
    (pkg / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    return pkg


def members(data: bytes) -> list[str]:
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tf:
        return [m.name for m in tf]


# -- packages ----------------------------------------------------------------------------------


def test_build_package_is_deterministic_and_skips_caches(tmp_path: Path) -> None:
    pkg = make_trainer(tmp_path)
    first, second = io.BytesIO(), io.BytesIO()
    build_package(pkg, first)
    (pkg / "trainer" / "task.py").touch()  # a new mtime must not change the bytes
    build_package(pkg, second)
    assert first.getvalue() == second.getvalue()
    assert members(first.getvalue()) == ["trainer", "trainer/__init__.py", "trainer/task.py"]
    assert gzip.decompress(first.getvalue())  # a valid gzip stream


def test_stage_package_uploads_to_the_project_staging_area(
    api: StackMLClient, tmp_path: Path, store: Any
) -> None:
    staged = api.stage_package(make_trainer(tmp_path))
    assert staged["package_uri"].startswith("local://projects/local/staging/")
    assert staged["package_uri"].endswith("/mytrainer.tar.gz")
    assert len(staged["sha256"]) == 64 and staged["size"] > 0
    key = staged["package_uri"].removeprefix("local://")
    assert members(store.get(key)) == ["trainer", "trainer/__init__.py", "trainer/task.py"]


def test_upload_package_of_a_tarball(api: StackMLClient, tmp_path: Path, tarball: Any) -> None:
    path = tmp_path / "pkg.tar.gz"
    path.write_bytes(tarball({"trainer/__init__.py": b""}))
    staged = api.upload_package(path)
    assert staged["package_uri"].endswith("/pkg.tar.gz")


def test_upload_package_file_from_an_open_file(api: StackMLClient, tarball: Any) -> None:
    """What the dashboard's submit form does with a browser's upload."""
    body = tarball({"trainer/__init__.py": b""})
    staged = api.upload_package_file(io.BytesIO(body), "from-form.tar.gz")
    assert staged["package_uri"].endswith("/from-form.tar.gz")
    assert staged["size"] == len(body)


def test_upload_of_a_non_tarball_is_an_api_error(api: StackMLClient, tmp_path: Path) -> None:
    path = tmp_path / "pkg.tar.gz"
    path.write_bytes(b"not gzip at all")
    with pytest.raises(APIError) as ei:
        api.upload_package(path)
    assert ei.value.status == 422
    assert ei.value.code == "invalid_package"


# -- jobs --------------------------------------------------------------------------------------


def test_create_get_list_and_iter(api: StackMLClient, package_uri: str, spec: Any) -> None:
    created = [api.create_job(spec(package_uri, name=f"job{i}")) for i in range(3)]
    assert all(j["state"] == "QUEUED" for j in created)
    got = api.get_job(created[0]["id"])
    assert got["spec"]["trainer"]["args"] == ["--x=1"]
    page = api.list_jobs(limit=2)
    assert [j["id"] for j in page["jobs"]] == [created[2]["id"], created[1]["id"]]
    assert page["next"] == created[1]["id"]
    assert [j["id"] for j in api.iter_jobs(limit=1)] == [j["id"] for j in reversed(created)]
    assert len(api.list_jobs(labels={"team": "vision"})["jobs"]) == 3
    assert api.list_jobs(labels={"team": "nobody"})["jobs"] == []
    assert len(api.list_jobs(state="QUEUED")["jobs"]) == 3
    assert api.list_jobs(state=["RUNNING", "FAILED"])["jobs"] == []


def test_api_error_carries_the_error_body(api: StackMLClient) -> None:
    with pytest.raises(APIError) as ei:
        api.get_job("job-nope")
    err = ei.value
    assert (err.status, err.code) == (404, "not_found")
    assert err.request_id and err.request_id.startswith("req-")
    assert err.details == {"job_id": "job-nope"}
    text = describe_error(err)
    assert "job job-nope not found" in text and "not_found" in text and "\n" not in text


def test_invalid_spec_is_422_with_field_details(
    api: StackMLClient, package_uri: str, spec: Any
) -> None:
    with pytest.raises(APIError) as ei:
        api.create_job(spec(package_uri, name="bad name!"))
    assert ei.value.status == 422
    assert ei.value.code == "validation_failed"
    assert any(f["field"] == "name" for f in ei.value.details["fields"])


def test_connection_refused_is_api_unavailable() -> None:
    client = StackMLClient(f"http://127.0.0.1:{closed_port()}", timeout=2)
    with pytest.raises(APIUnavailable) as ei:
        client.list_jobs()
    message = str(ei.value)
    assert "connection refused" in message and "stackml up" in message
    assert "STACKML_URL" in message
    assert ei.value.__cause__ is not None  # chained


def test_base_url_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STACKML_URL", "http://example.invalid:9/")
    assert StackMLClient().base_url == "http://example.invalid:9"
    monkeypatch.delenv("STACKML_URL")
    assert StackMLClient().base_url == "http://127.0.0.1:8080"


def test_cancel_and_delete(api: StackMLClient, package_uri: str, spec: Any) -> None:
    job = api.create_job(spec(package_uri))
    cancelled = api.cancel_job(job["id"])
    assert cancelled["state"] == "CANCELLED"  # a QUEUED job is cancelled at once
    with pytest.raises(APIError) as ei:
        api.cancel_job(job["id"])
    assert ei.value.code == "job_terminal"
    api.delete_job(job["id"])
    with pytest.raises(APIError):
        api.get_job(job["id"])


def test_delete_of_a_running_job_is_refused(
    api: StackMLClient, package_uri: str, spec: Any
) -> None:
    job = api.create_job(spec(package_uri))
    with pytest.raises(APIError) as ei:
        api.delete_job(job["id"])
    assert (ei.value.status, ei.value.code) == (409, "job_not_terminal")


def test_logs_events_metrics(api: StackMLClient, package_uri: str, spec: Any, db_url: str) -> None:
    job = api.create_job(spec(package_uri))
    drive(db_url, job["id"], log=TRAINER_LOG, pause=0)
    data, nxt = api.logs(job["id"])
    assert data == TRAINER_LOG and nxt == len(TRAINER_LOG)
    tail, nxt2 = api.logs(job["id"], offset=9)
    assert tail == TRAINER_LOG[9:] and nxt2 == len(TRAINER_LOG)
    assert api.logs(job["id"], offset=nxt) == (b"", nxt)
    events = api.events(job["id"])["events"]
    assert [e["to"] for e in events] == [
        "QUEUED",
        "ALLOCATING",
        "PROVISIONING",
        "RUNNING",
        "EXPORTING",
        "SUCCEEDED",
    ]
    loss = api.metrics(job["id"])["metrics"]["loss"]
    assert [(p["epoch"], p["value"]) for p in loss] == [(1, 0.5), (2, 0.25)]


def test_healthz(api: StackMLClient) -> None:
    assert api.healthz() == {"status": "ok"}


# -- wait --------------------------------------------------------------------------------------


def test_wait_reports_each_event_once_and_returns_the_terminal_job(
    api: StackMLClient, package_uri: str, spec: Any, db_url: str, enqueued: DrivingRecorder
) -> None:
    enqueued.on_allocate = lambda job_id: drive(db_url, job_id, log=TRAINER_LOG)
    job = api.create_job(spec(package_uri))
    seen: list[dict[str, Any]] = []
    final = api.wait(job["id"], timeout=30, on_event=seen.append, interval=0.01)
    assert final["state"] == "SUCCEEDED"
    assert [e["to"] for e in seen] == [
        "QUEUED",
        "ALLOCATING",
        "PROVISIONING",
        "RUNNING",
        "EXPORTING",
        "SUCCEEDED",
    ]


def test_wait_times_out_with_a_typed_error(api: StackMLClient, package_uri: str, spec: Any) -> None:
    job = api.create_job(spec(package_uri))
    started = time.monotonic()
    with pytest.raises(WaitTimeout) as ei:
        api.wait(job["id"], timeout=0.3, interval=0.05)
    assert time.monotonic() - started < 5
    assert ei.value.job is not None and ei.value.job["state"] == "QUEUED"


# -- follow_logs -------------------------------------------------------------------------------


def test_follow_logs_streams_until_the_job_ends(
    api: StackMLClient, package_uri: str, spec: Any, db_url: str, enqueued: DrivingRecorder
) -> None:
    enqueued.on_allocate = lambda job_id: drive(db_url, job_id, log=TRAINER_LOG)
    job = api.create_job(spec(package_uri))
    got = b"".join(api.follow_logs(job["id"]))
    assert got == TRAINER_LOG
    assert b"".join(api.follow_logs(job["id"], offset=9)) == TRAINER_LOG[9:]


class FlakyLogServer:
    """A stand-in API whose followed log stream drops: first by a reset mid-stream, then by
    going silent past the client's read timeout; the job is RUNNING until `finish()`."""

    def __init__(self) -> None:
        self.log = b"one\ntwo\nthree\nfour\n"
        self.state = "RUNNING"
        self.follow_offsets: list[int] = []
        self.follow_timeouts: list[str | None] = []
        self.server = make_server("127.0.0.1", 0, self.app, threaded=True)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)

    def app(self, environ: dict[str, Any], start_response: Any) -> Any:
        req = Request(environ)
        if req.path == "/v1/jobs/job-1":
            return Response(
                f'{{"id": "job-1", "state": "{self.state}"}}', mimetype="application/json"
            )(environ, start_response)
        offset = int(req.args.get("offset", "0"))
        if req.args.get("follow") != "true":
            data = self.log[offset:] if self.state != "RUNNING" else b""
            resp = Response(
                data, mimetype="text/plain", headers={"X-Next-Offset": str(offset + len(data))}
            )
            return resp(environ, start_response)
        self.follow_offsets.append(offset)
        self.follow_timeouts.append(req.args.get("timeout"))
        attempt = len(self.follow_offsets)

        def body() -> Iterator[bytes]:
            if attempt == 1:
                yield self.log[offset : offset + 4]  # "one\n", then the connection breaks
                raise ConnectionResetError("dropped")
            if attempt == 2:
                yield self.log[offset : offset + 4]  # "two\n", then silence past read_timeout
                time.sleep(4.0)
                return
            self.state = "SUCCEEDED"  # the job ends while the last stream is open
            yield self.log[offset : offset + 6]  # "three\n"; "four\n" comes from the drain

        return Response(body(), mimetype="text/plain")(environ, start_response)

    def __enter__(self) -> FlakyLogServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_follow_logs_reconnects_from_the_last_offset() -> None:
    with FlakyLogServer() as srv, StackMLClient(srv.url, timeout=5) as client:
        chunks = list(
            client.follow_logs("job-1", read_timeout=2, stream_seconds=0.3, reconnect_delay=0.01)
        )
    assert b"".join(chunks) == b"one\ntwo\nthree\nfour\n"
    assert srv.follow_offsets == [0, 4, 8]
    assert srv.follow_timeouts == ["0.3", "0.3", "0.3"]


def test_follow_logs_gives_up_when_the_api_is_gone() -> None:
    client = StackMLClient(f"http://127.0.0.1:{closed_port()}", timeout=1)
    with pytest.raises(APIUnavailable):
        list(client.follow_logs("job-1", reconnect_delay=0.01, max_failures=2))
