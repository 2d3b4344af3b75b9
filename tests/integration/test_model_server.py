"""Conformance of the model server with TensorFlow Serving's REST API, over real HTTP with
keep-alive, against real SavedModels (tests/integration/savedmodels.py, built with the TensorFlow
runtime's python).

By default the server under test is stackml's own (workers/vm/model_server.py, run by the
runtime's python). With ``STACKML_TFSERVING_BIN=/usr/bin/tensorflow_model_server`` the same
conformance tests run against TF Serving's binary instead (the tests marked ``ours`` still run
against our server: labels from a flag and the request-size bound are ours only).

Also: ``runner.py serve`` as a subprocess, fetching a version's files over HTTP (size and md5
checked), starting the server detached, idempotent, and refusing a file whose md5 is wrong.
"""

from __future__ import annotations

import functools
import hashlib
import http.client
import http.server
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from service.config import Settings
from service.runtime import ensure_runtime
from tests.envutil import environ, free_port

REPO = Path(__file__).resolve().parents[2]
SERVER = REPO / "workers" / "vm" / "model_server.py"
RUNNER = REPO / "workers" / "vm" / "runner.py"
BUILDER = Path(__file__).resolve().parent / "savedmodels.py"
RUNTIME_ROOT = os.environ.get("STACKML_TEST_RUNTIME_ROOT", "/var/cache/stackml/runtimes")
TFSERVING_BIN = os.environ.get("STACKML_TFSERVING_BIN", "")
READY_DEADLINE = 180.0


# -- fixtures -------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def runtime_python() -> Path:
    with environ({"STACKML_RUNTIME_ROOT": RUNTIME_ROOT}):
        settings = Settings()
        return ensure_runtime(settings, settings.default_runtime, echo=print)


@pytest.fixture(scope="session")
def models(runtime_python: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("savedmodels")
    r = subprocess.run(
        [str(runtime_python), str(BUILDER), str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-4000:]
    return out


@pytest.fixture(scope="session")
def expected(models: Path) -> dict:
    return json.loads((models / "expected.json").read_text())


class Running:
    def __init__(self, proc: subprocess.Popen, port: int, log: Path) -> None:
        self.proc = proc
        self.port = port
        self.log = log

    def conn(self) -> http.client.HTTPConnection:
        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)


def wait_available(port: int, name: str, proc: subprocess.Popen | None, log: Path) -> None:
    deadline = time.monotonic() + READY_DEADLINE
    last = ""
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"the model server exited {proc.returncode}: {log.read_text()[-3000:]}")
        try:
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            c.request("GET", f"/v1/models/{name}")
            resp = c.getresponse()
            body = resp.read()
            c.close()
            last = body.decode(errors="replace")
            if resp.status == 200:
                states = {s["state"] for s in json.loads(body)["model_version_status"]}
                if states == {"AVAILABLE"}:
                    return
        except OSError as e:
            last = str(e)
        time.sleep(0.25)
    pytest.fail(f"{name} not AVAILABLE after {READY_DEADLINE}s: {last}; {log.read_text()[-3000:]}")


def start_server(
    runtime_python: Path, base: Path, name: str, tmp: Path, *, ours: bool, extra: tuple = ()
) -> Running:
    port = free_port()
    flags = [f"--rest_api_port={port}", f"--model_name={name}", f"--model_base_path={base}"]
    if ours or not TFSERVING_BIN:
        argv = [str(runtime_python), str(SERVER), *flags, "--rest_api_bind=127.0.0.1", *extra]
    else:
        # TF Serving serves only a base path's latest version unless a model config says all;
        # labels come from the config too
        labels = "".join(
            f' version_labels {{ key: "{k}" value: {v} }}'
            for flag in extra
            if flag.startswith("--version_labels=")
            for k, v in (kv.split("=") for kv in flag.split("=", 1)[1].split(","))
        )
        config = tmp / f"{name}.config"
        config.write_text(
            f'model_config_list {{ config {{ name: "{name}" base_path: "{base}" '
            f'model_platform: "tensorflow" model_version_policy {{ all {{}} }}{labels} }} }}\n'
        )
        argv = [
            TFSERVING_BIN,
            f"--port={free_port()}",
            f"--rest_api_port={port}",
            f"--model_config_file={config}",
        ]
    log = tmp / f"{name}-{port}.log"
    with open(log, "wb") as fh:
        proc = subprocess.Popen(argv, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_available(port, name, proc, log)
    except BaseException:
        proc.kill()
        proc.wait(10)
        raise
    return Running(proc, port, log)


@pytest.fixture(scope="session")
def servers(
    runtime_python: Path, models: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Any]:
    started: list[Running] = []
    tmp = tmp_path_factory.mktemp("servers")

    @functools.cache
    def get(kind: str) -> Running:
        if kind == "ours-linear" and not TFSERVING_BIN:
            return get("linear")
        base, name, ours, extra = {
            "linear": (models / "linear", "lin", False, ("--version_labels=stable=1,next=2",)),
            "multi": (models / "multi", "multi", False, ()),
            "examples": (models / "examples", "ex", False, ()),
            "ours-linear": (
                models / "linear",
                "lin",
                True,
                ("--version_labels=stable=1,next=2", "--max_request_bytes=65536"),
            ),
        }[kind]
        if kind == "linear" and not TFSERVING_BIN:
            extra = (*extra, "--max_request_bytes=65536")
        r = start_server(runtime_python, base, name, tmp, ours=ours, extra=extra)
        started.append(r)
        return r

    yield get
    for r in started:
        r.proc.terminate()
    for r in started:
        try:
            r.proc.wait(15)
        except subprocess.TimeoutExpired:
            r.proc.kill()
            r.proc.wait(10)


@pytest.fixture(scope="module")
def lin(servers: Any) -> Iterator[Client]:
    c = Client(servers("linear"))
    yield c
    c.close()


@pytest.fixture(scope="module")
def multi(servers: Any) -> Iterator[Client]:
    c = Client(servers("multi"))
    yield c
    c.close()


@pytest.fixture(scope="module")
def ex(servers: Any) -> Iterator[Client]:
    c = Client(servers("examples"))
    yield c
    c.close()


@pytest.fixture(scope="module")
def ours(servers: Any) -> Iterator[Client]:
    c = Client(servers("ours-linear"))
    yield c
    c.close()


class Client:
    """One kept-alive connection; `sockets` counts the TCP connections it had to open."""

    def __init__(self, running: Running) -> None:
        self.running = running
        self.conn = running.conn()
        self.sockets: list[socket.socket] = []

    def close(self) -> None:
        self.conn.close()

    def call(self, method: str, path: str, body: Any = None, raw: bytes | None = None):
        data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        headers = {"Content-Type": "application/json"} if data is not None else {}
        self.conn.request(method, path, body=data, headers=headers)
        if self.conn.sock is not None and (
            not self.sockets or self.sockets[-1] is not self.conn.sock
        ):
            self.sockets.append(self.conn.sock)
        resp = self.conn.getresponse()
        text = resp.read()
        if resp.getheader("Connection", "").lower() == "close":
            self.conn.close()
        try:
            return resp.status, json.loads(text)
        except ValueError:
            pytest.fail(f"{method} {path} answered {resp.status} with no JSON: {text[:300]!r}")

    def error(self, status: int, method: str, path: str, body: Any = None, raw=None) -> str:
        got, answer = self.call(method, path, body, raw)
        assert got == status, answer
        assert set(answer) == {"error"} and isinstance(answer["error"], str), answer
        assert answer["error"]
        return answer["error"]

    def still_serves(self, expected: dict) -> None:
        status, answer = self.call(
            "POST", "/v1/models/lin:predict", {"instances": expected["rows"]}
        )
        assert status == 200, answer
        close(answer["predictions"], expected["linear"]["2"]["direct"])


def close(got: Any, want: Any, tol: float = 1e-5) -> None:
    if isinstance(want, list):
        assert isinstance(got, list) and len(got) == len(want), (got, want)
        for g, w in zip(got, want, strict=True):
            close(g, w, tol)
    else:
        assert abs(float(got) - float(want)) <= tol * max(1.0, abs(float(want))), (got, want)


# -- status and metadata ----------------------------------------------------------------------


def ok_status(version: str) -> dict:
    return {
        "version": version,
        "state": "AVAILABLE",
        "status": {"error_code": "OK", "error_message": ""},
    }


def test_status_of_every_version_and_of_one(lin):
    status, answer = lin.call("GET", "/v1/models/lin")
    assert status == 200
    got = sorted(answer["model_version_status"], key=lambda s: s["version"])
    assert got == [ok_status("1"), ok_status("2")]
    status, answer = lin.call("GET", "/v1/models/lin/versions/1")
    assert status == 200 and answer == {"model_version_status": [ok_status("1")]}


def test_metadata_describes_the_signature(lin):
    status, answer = lin.call("GET", "/v1/models/lin/versions/2/metadata")
    assert status == 200, answer
    assert answer["model_spec"]["name"] == "lin" and answer["model_spec"]["version"] == "2"
    sig = answer["metadata"]["signature_def"]["signature_def"]["serving_default"]
    assert sig["method_name"] == "tensorflow/serving/predict"
    x = sig["inputs"]["x"]
    assert x["dtype"] == "DT_FLOAT"
    assert [d["size"] for d in x["tensor_shape"]["dim"]] == ["-1", "20"]
    assert sig["outputs"]["y"]["dtype"] == "DT_FLOAT"
    # no version: the latest
    status, latest = lin.call("GET", "/v1/models/lin/metadata")
    assert status == 200 and latest["model_spec"]["version"] == "2"


def test_metadata_of_a_model_of_several_inputs(multi):
    status, answer = multi.call("GET", "/v1/models/multi/metadata")
    assert status == 200
    sig = answer["metadata"]["signature_def"]["signature_def"]["serving_default"]
    assert {k: v["dtype"] for k, v in sig["inputs"].items()} == {"a": "DT_FLOAT", "n": "DT_INT32"}
    assert set(sig["outputs"]) == {"total", "twice"}


# -- predict -------------------------------------------------------------------------------


def test_predict_row_format_matches_the_savedmodel(lin, expected):
    status, answer = lin.call("POST", "/v1/models/lin:predict", {"instances": expected["rows"]})
    assert status == 200, answer
    assert set(answer) == {"predictions"}
    close(answer["predictions"], expected["linear"]["2"]["direct"])  # latest by default


def test_predict_columnar_format_matches_the_savedmodel(lin, expected):
    status, answer = lin.call(
        "POST", "/v1/models/lin/versions/1:predict", {"inputs": expected["rows"]}
    )
    assert status == 200, answer
    assert set(answer) == {"outputs"}
    close(answer["outputs"], expected["linear"]["1"]["direct"])
    named = {"inputs": {"x": expected["rows"]}, "signature_name": "serving_default"}
    status, answer = lin.call("POST", "/v1/models/lin/versions/1:predict", named)
    assert status == 200
    close(answer["outputs"], expected["linear"]["1"]["direct"])


def test_two_versions_side_by_side(lin, expected):
    answers = {}
    for v in ("1", "2"):
        status, answer = lin.call(
            "POST", f"/v1/models/lin/versions/{v}:predict", {"instances": expected["rows"]}
        )
        assert status == 200, answer
        close(answer["predictions"], expected["linear"][v]["direct"])
        answers[v] = answer["predictions"]
    assert answers["1"] != answers["2"]


def test_predict_several_inputs_and_outputs(multi):
    rows = [{"a": [1.0, 2.0], "n": 3}, {"a": [0.5, -1.5], "n": 2}]
    status, answer = multi.call("POST", "/v1/models/multi:predict", {"instances": rows})
    assert status == 200, answer
    close(answer["predictions"][0]["total"], 9.0)
    close(answer["predictions"][1]["total"], -2.0)
    assert [p["twice"] for p in answer["predictions"]] == [6, 4]
    cols = {"inputs": {"a": [[1.0, 2.0], [0.5, -1.5]], "n": [3, 2]}}
    status, answer = multi.call("POST", "/v1/models/multi:predict", cols)
    assert status == 200, answer
    close(answer["outputs"]["total"], [9.0, -2.0])
    assert answer["outputs"]["twice"] == [6, 4]


def test_requests_reuse_one_kept_alive_connection(lin, expected):
    fresh = Client(lin.running)
    try:
        for _ in range(5):
            fresh.call("GET", "/v1/models/lin")
            fresh.call("POST", "/v1/models/lin:predict", {"instances": expected["rows"][:1]})
        fresh.error(400, "POST", "/v1/models/lin:predict", raw=b"{nope")
        fresh.call("POST", "/v1/models/lin:predict", {"instances": expected["rows"][:1]})
        assert len(fresh.sockets) == 1, "every request, an error included, on one connection"
    finally:
        fresh.close()


# -- classify / regress ----------------------------------------------------------------------


def test_classify_and_regress(ex, expected):
    feats = expected["examples"]["features"]
    status, answer = ex.call("POST", "/v1/models/ex:classify", {"examples": feats})
    assert status == 200, answer
    assert len(answer["result"]) == 2
    for row, scores in zip(answer["result"], expected["examples"]["scores"], strict=True):
        assert [label for label, _ in row] == ["neg", "pos"]
        close([s for _, s in row], scores)
    body = {"signature_name": "regress", "examples": feats}
    status, answer = ex.call("POST", "/v1/models/ex:regress", body)
    assert status == 200, answer
    close(answer["result"], expected["examples"]["regress"])
    # context: features shared by every example
    body = {"signature_name": "regress", "context": {"f1": 2.0}, "examples": [{"f0": 1.0}]}
    status, answer = ex.call("POST", "/v1/models/ex:regress", body)
    assert status == 200, answer
    close(answer["result"], [5.0])


def test_classify_or_regress_without_such_a_signature_is_an_error(lin, ex, expected):
    examples = {"examples": [{"f0": 1.0, "f1": 2.0}]}
    assert "classif" in lin.error(400, "POST", "/v1/models/lin:classify", examples)
    assert "regress" in lin.error(400, "POST", "/v1/models/lin:regress", examples)
    # the classify signature is not a regression one
    assert "regress" in ex.error(400, "POST", "/v1/models/ex:regress", examples)
    lin.still_serves(expected)


# -- errors: TF Serving's shape and status, and the server keeps serving ----------------------


def test_unknown_model_and_version_are_404(lin, expected):
    lin.error(404, "GET", "/v1/models/nope")
    lin.error(404, "GET", "/v1/models/lin/versions/7")
    lin.error(404, "GET", "/v1/models/nope/metadata")
    lin.error(404, "GET", "/v1/models/lin/versions/7/metadata")
    rows = {"instances": expected["rows"]}
    lin.error(404, "POST", "/v1/models/nope:predict", rows)
    lin.error(404, "POST", "/v1/models/lin/versions/7:predict", rows)
    lin.still_serves(expected)


@pytest.mark.parametrize(
    "raw",
    [
        b"{nope",
        b"",
        b"[1, 2]",
        b'"instances"',
        b"\xff\xfe{}",
        b"[" * 60_000,
        b'{"instances": [[1.0]], "inputs": [[1.0]]}',
        b'{"signature_name": "serving_default"}',
        b'{"instances": []}',
        b'{"instances": [[1.0]], "signature_name": "missing"}',
        b'{"instances": [[1.0]], "signature_name": 7}',
    ],
)
def test_malformed_predict_bodies_are_400(lin, expected, raw):
    lin.error(400, "POST", "/v1/models/lin:predict", raw=raw)
    lin.still_serves(expected)


def test_wrong_shape_is_400(lin, expected):
    lin.error(400, "POST", "/v1/models/lin:predict", {"instances": [[1.0, 2.0]]})
    lin.error(400, "POST", "/v1/models/lin:predict", {"inputs": [1.0] * 20})
    ragged = {"instances": [[1.0] * 20, [1.0] * 19]}
    lin.error(400, "POST", "/v1/models/lin:predict", ragged)
    lin.still_serves(expected)


def test_wrong_dtype_is_400(lin, multi, expected):
    lin.error(400, "POST", "/v1/models/lin:predict", {"instances": [["a"] * 20]})
    lin.error(400, "POST", "/v1/models/lin:predict", {"instances": [[{"x": 1}] * 20]})
    bad_int = {"inputs": {"a": [[1.0, 2.0]], "n": [3.5]}}
    multi.error(400, "POST", "/v1/models/multi:predict", bad_int)
    missing = {"instances": [{"a": [1.0, 2.0]}]}
    multi.error(400, "POST", "/v1/models/multi:predict", missing)
    lin.still_serves(expected)


def test_bad_examples_are_400(ex):
    ex.error(400, "POST", "/v1/models/ex:classify", {"examples": "f0"})
    ex.error(400, "POST", "/v1/models/ex:classify", {"examples": [{"f0": [1.0, "a"]}]})
    ex.error(400, "POST", "/v1/models/ex:classify", {"examples": [{"f0": 1.0}]})  # f1 missing
    status, answer = ex.call(
        "POST", "/v1/models/ex:classify", {"examples": [{"f0": 1.0, "f1": 0.5}]}
    )
    assert status == 200, answer


# -- ours only: labels from --version_labels, the request-size bound ---------------------------


def test_labels_resolve_to_their_versions(ours, expected):
    status, answer = ours.call("GET", "/v1/models/lin/labels/stable")
    assert status == 200 and answer == {"model_version_status": [ok_status("1")]}
    status, answer = ours.call("GET", "/v1/models/lin/labels/next/metadata")
    assert status == 200 and answer["model_spec"]["version"] == "2"
    for label, v in (("stable", "1"), ("next", "2")):
        status, answer = ours.call(
            "POST", f"/v1/models/lin/labels/{label}:predict", {"instances": expected["rows"]}
        )
        assert status == 200, answer
        close(answer["predictions"], expected["linear"][v]["direct"])
    assert "label" in ours.error(400, "GET", "/v1/models/lin/labels/nope")
    ours.error(400, "POST", "/v1/models/lin/labels/nope:predict", {"instances": expected["rows"]})


def test_too_large_a_body_is_refused_and_the_server_serves_on(ours, expected):
    big = json.dumps({"instances": [[0.0] * 20] * 2000}).encode()
    assert len(big) > 65536
    ours.error(413, "POST", "/v1/models/lin:predict", raw=big)
    ours.still_serves(expected)  # on a new connection: the refused body was never read


def test_malformed_paths_and_methods(ours):
    ours.error(400, "GET", "/v1/models/lin:predict")
    ours.error(400, "POST", "/v1/models/lin")
    ours.error(400, "GET", "/v1/models/lin/versions/abc")
    ours.error(404, "GET", "/nothing")
    ours.error(400, "DELETE", "/v1/models/lin")


def test_a_version_that_cannot_load_is_reported_and_the_others_serve(
    runtime_python, models, expected, tmp_path
):
    base = tmp_path / "base"
    shutil.copytree(models / "linear" / "1", base / "1")
    (base / "3").mkdir()
    (base / "3" / "saved_model.pb").write_bytes(b"\x00not a SavedModel")
    port = free_port()
    argv = [str(runtime_python), str(SERVER), f"--rest_api_port={port}", "--model_name=lin"]
    argv += [f"--model_base_path={base}", "--rest_api_bind=127.0.0.1"]
    log = tmp_path / "server.log"
    with open(log, "wb") as fh:
        proc = subprocess.Popen(argv, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        client = None
        deadline = time.monotonic() + READY_DEADLINE
        states: dict[str, str] = {}
        while time.monotonic() < deadline:
            assert proc.poll() is None, log.read_text()[-3000:]
            try:
                c = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
                c.request("GET", "/v1/models/lin")
                answer = json.loads(c.getresponse().read())
                c.close()
            except OSError:
                time.sleep(0.25)
                continue
            states = {s["version"]: s["state"] for s in answer["model_version_status"]}
            if "START" not in states.values() and "LOADING" not in states.values():
                break
            time.sleep(0.25)
        assert states == {"1": "AVAILABLE", "3": "END"}, states
        failed = next(s for s in answer["model_version_status"] if s["version"] == "3")
        assert failed["status"]["error_code"] != "OK" and failed["status"]["error_message"]
        client = Client(Running(proc, port, log))
        client.error(404, "POST", "/v1/models/lin/versions/3:predict", {"instances": [[0.0] * 20]})
        status, got = client.call(
            "POST", "/v1/models/lin:predict", {"instances": expected["rows"]}
        )  # the latest AVAILABLE version
        assert status == 200, got
        close(got["predictions"], expected["linear"]["1"]["direct"])
        client.close()
    finally:
        proc.terminate()
        proc.wait(15)


# -- runner.py serve ------------------------------------------------------------------------


class _Files(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        return


@pytest.fixture(scope="module")
def file_server(models: Path) -> Iterator[str]:
    handler = functools.partial(_Files, directory=str(models))
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()
    srv.server_close()


def version_files(models: Path, base_url: str, version: int) -> list[dict]:
    root = models / "linear" / str(version)
    files = []
    for p in sorted(root.rglob("*")):
        if p.is_file():
            data = p.read_bytes()
            rel = p.relative_to(root).as_posix()
            files.append(
                {
                    "path": rel,
                    "url": f"{base_url}/linear/{version}/{rel}?sig=abc",
                    "size": len(data),
                    "md5": hashlib.md5(data, usedforsecurity=False).hexdigest(),
                }
            )
    return files


def run_runner(runtime_python: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(runtime_python), str(RUNNER), *args], capture_output=True, text=True, timeout=120
    )


def stop_server(runtime_python: Path, job: Path) -> None:
    r = run_runner(runtime_python, "stop-serving", str(job))
    assert r.returncode == 0, r.stderr


def test_runner_serve_fetches_verifies_starts_and_is_idempotent(
    runtime_python, models, file_server, expected, tmp_path
):
    job = tmp_path / "serve"
    job.mkdir()
    port = free_port()
    cfg: dict[str, Any] = {
        "runtime": str(runtime_python.parent.parent),
        "model_name": "lin",
        "port": port,
        "bind": "127.0.0.1",
        "server": "stackml",
        "versions": [
            {"version": v, "files": version_files(models, file_server, v)} for v in (1, 2)
        ],
    }
    (job / "serve.json").write_text(json.dumps(cfg))
    r = run_runner(runtime_python, "serve", str(job))
    assert r.returncode == 0, r.stderr
    first = json.loads(r.stdout)
    try:
        assert first["ok"] is True and first["already_started"] is False
        assert isinstance(first["pid"], int) and first["fetched"] > 2
        for v in (1, 2):
            for f in cfg["versions"][v - 1]["files"]:
                got = (job / "models" / str(v) / f["path"]).read_bytes()
                assert hashlib.md5(got, usedforsecurity=False).hexdigest() == f["md5"]
        wait_available(port, "lin", None, job / "log")
        # detached: its own session, away from the runner's
        assert os.getsid(first["pid"]) == first["pid"]
        assert (job / "heartbeat").exists()
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        c.request(
            "POST", "/v1/models/lin/versions/1:predict", json.dumps({"instances": expected["rows"]})
        )
        resp = c.getresponse()
        assert resp.status == 200
        close(json.loads(resp.read())["predictions"], expected["linear"]["1"]["direct"])
        c.close()
        # a second serve: nothing fetched again, the same server
        again = run_runner(runtime_python, "serve", str(job))
        assert again.returncode == 0, again.stderr
        second = json.loads(again.stdout)
        assert second == {"ok": True, "already_started": True, "pid": first["pid"]}
    finally:
        stop_server(runtime_python, job)
    code = (job / "exit_code").read_text().strip()
    assert code in {"143", "0"}, code  # SIGTERM
    with pytest.raises(ProcessLookupError):
        os.killpg(first["pid"], 0)


def test_runner_serve_refuses_a_file_whose_md5_is_wrong(
    runtime_python, models, file_server, tmp_path
):
    job = tmp_path / "serve"
    job.mkdir()
    files = version_files(models, file_server, 1)
    victim = next(f for f in files if f["path"] == "saved_model.pb")
    victim["md5"] = "0" * 32
    cfg = {
        "runtime": str(runtime_python.parent.parent),
        "model_name": "lin",
        "port": free_port(),
        "versions": [{"version": 1, "files": files}],
    }
    (job / "serve.json").write_text(json.dumps(cfg))
    r = run_runner(runtime_python, "serve", str(job))
    assert r.returncode == 3, r.stdout
    assert "md5" in r.stderr and "saved_model.pb" in r.stderr
    assert not (job / "models" / "1" / "saved_model.pb").exists()
    assert not (job / "started").exists() and not (job / "pid").exists()


@pytest.mark.parametrize(
    "path",
    ["/etc/passwd", "../x", "a/../../x", "a//b", "./saved_model.pb", "a\nb", "a\x00b", "a\\b", ""],
)
def test_runner_serve_refuses_unsafe_paths(runtime_python, tmp_path, path):
    job = tmp_path / "serve"
    job.mkdir()
    files = [
        {"path": "saved_model.pb", "url": "http://127.0.0.1:9/x", "size": 1, "md5": "0" * 32},
        {"path": path, "url": "http://127.0.0.1:9/y", "size": 1, "md5": "0" * 32},
    ]
    cfg = {
        "runtime": str(runtime_python.parent.parent),
        "model_name": "lin",
        "port": 8501,
        "versions": [{"version": 1, "files": files}],
    }
    (job / "serve.json").write_text(json.dumps(cfg))
    r = run_runner(runtime_python, "serve", str(job))
    assert r.returncode == 3 and "file path" in r.stderr, (r.stdout, r.stderr)
    assert not (job / "models").exists()


def test_runner_chooses_tf_serving_when_the_image_has_it(tmp_path, monkeypatch):
    from workers.vm import runner

    cfg = {"port": 8501, "model_name": "m"}
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    monkeypatch.setattr(shutil, "which", lambda name, path=None: None)
    ours = runner.model_server_argv("/job", cfg)
    assert ours[1:] == [
        runner.MODEL_SERVER,
        "--rest_api_port=8501",
        "--model_name=m",
        "--model_base_path=/job/models",
        "--rest_api_bind=0.0.0.0",
    ]
    assert ours[0] == "/job/env/bin/python"
    tfs = str(fake_bin / "tensorflow_model_server")
    monkeypatch.setattr(shutil, "which", lambda name, path=None: tfs)
    argv = runner.model_server_argv("/job", cfg)
    assert argv[0] == tfs and argv[2:] == ours[2:-1]  # TF Serving has no bind flag
    # several versions: a model config file, or TF Serving would serve only the latest
    job = tmp_path / "job"
    job.mkdir()
    two = {**cfg, "versions": [{"version": 1}, {"version": 3}]}
    argv = runner.model_server_argv(str(job), two)
    assert argv[2:] == ["--rest_api_port=8501", f"--model_config_file={job}/models.config"]
    config = (job / "models.config").read_text()
    assert 'name: "m"' in config and f'base_path: "{job}/models"' in config
    assert "specific { versions: 1 versions: 3 }" in config
    assert runner.model_server_argv("/job", {**cfg, "server": "stackml"})[0] == ours[0]
    bound = runner.model_server_argv("/job", {**cfg, "server": "stackml", "bind": "10.0.0.5"})
    assert bound[-1] == "--rest_api_bind=10.0.0.5"
    with pytest.raises(runner.RunnerError, match="bind"):
        runner.model_server_argv("/job", {**cfg, "server": "stackml", "bind": "0.0.0.0 --x"})


def test_the_runtime_is_compiled_and_readable_by_a_sandbox_user(runtime_python: Path) -> None:
    """Every module of the shared runtime has its bytecode, and every file and directory of it
    is readable by others: a sandbox's user (who may write no cache there) never compiles
    TensorFlow at a process's start (service/runtime.py)."""
    unreadable, uncompiled = [], []
    for d, dirs, files in os.walk(runtime_python.parent.parent / "lib"):
        here = Path(d)
        for name in (*dirs, *files):
            p = here / name
            if not p.is_symlink() and p.stat().st_mode & 0o004 == 0:
                unreadable.append(str(p))
        if here.name == "__pycache__":
            continue
        for f in files:
            pyc = here / "__pycache__" / f"{f[:-3]}.{sys.implementation.cache_tag}.pyc"
            if f.endswith(".py") and not pyc.exists():
                uncompiled.append(str(here / f))
    assert unreadable == [], unreadable[:5]
    assert uncompiled == [], uncompiled[:5]
