"""The API's HTTP server in `stackml up` (service/httpserver.py): keep-alive, streamed answers
as they are produced, underscored header names dropped, a redacted access log, a clear error
for a taken port, and a stop that ends the server."""

from __future__ import annotations

import http.client
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from service.httpserver import MAX_HEAD_BYTES, STOP_GRACE, ApiServer
from tests.envutil import free_port


def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterator[bytes]:
    path = environ["PATH_INFO"]
    if path == "/stream":
        start_response("200 OK", [("Content-Type", "text/plain")])
        return _stream()
    if path == "/stuck":  # a followed log of a quiet job: nothing to write for a long time
        start_response("200 OK", [("Content-Type", "text/plain")])
        return _stuck()
    if path == "/echo-token":
        body = repr(
            (environ.get("HTTP_X_AUTH_TOKEN"), environ.get("REMOTE_ADDR"), environ["SERVER_PORT"])
        ).encode()
    else:
        body = environ.get("wsgi.input").read(int(environ.get("CONTENT_LENGTH") or 0))
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return iter([body])


RELEASE = threading.Event()


def _stream() -> Iterator[bytes]:
    yield b"first\n"
    RELEASE.wait(10)  # the client must have read the first part by now
    yield b"second\n"


STUCK = threading.Event()


def _stuck() -> Iterator[bytes]:
    yield b"waiting\n"
    STUCK.wait(60)
    yield b"late\n"


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[int, Path]]:
    log = tmp_path / "api.log"
    port = free_port()
    server = ApiServer(app, "127.0.0.1", port, access_log=log, name="test-api")
    server.start()
    try:
        yield port, log
    finally:
        server.stop()


def test_one_connection_carries_many_requests(served: tuple[int, Path]) -> None:
    port, _ = served
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.connect()
    sock = conn.sock
    for i in range(5):
        body = f"request {i}".encode()
        conn.request("POST", "/echo", body, {"Content-Type": "text/plain"})
        r = conn.getresponse()
        assert r.status == 200 and r.read() == body
        assert (r.getheader("Connection") or "").lower() != "close"
        assert conn.sock is sock, "the server closed the connection after an answer"
    conn.close()


def test_a_streamed_answer_arrives_as_it_is_produced(served: tuple[int, Path]) -> None:
    port, _ = served
    RELEASE.clear()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("GET", "/stream")
    r = conn.getresponse()
    assert r.getheader("Transfer-Encoding") == "chunked"
    assert r.readline() == b"first\n"  # before the app produced the rest
    RELEASE.set()
    assert r.read() == b"second\n"
    conn.close()


def test_a_header_name_with_an_underscore_is_dropped(served: tuple[int, Path]) -> None:
    port, _ = served
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("GET", "/echo-token", headers={"X_Auth_Token": "smuggled"})
    assert conn.getresponse().read() == repr((None, "127.0.0.1", str(port))).encode()
    conn.request("GET", "/echo-token", headers={"X-Auth-Token": "t", "X_Auth_Token": "smuggled"})
    assert conn.getresponse().read() == repr(("t", "127.0.0.1", str(port))).encode()
    conn.close()


def test_the_access_log_has_one_redacted_line_a_request(served: tuple[int, Path]) -> None:
    port, log = served
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("GET", "/echo?temp_url_sig=deadbeef1234&temp_url_expires=17")
    conn.getresponse().read()
    conn.request("POST", "/echo", b"x")
    conn.getresponse().read()
    conn.close()
    lines = log.read_text().splitlines()
    assert len(lines) == 2, lines
    assert lines[0].startswith("127.0.0.1 - - [")
    assert lines[0].endswith('"GET /echo?temp_url_sig=REDACTED&temp_url_expires=17 HTTP/1.1" 200 -')
    assert "deadbeef1234" not in lines[0]
    assert lines[1].endswith('"POST /echo HTTP/1.1" 200 -')


def test_a_taken_port_is_an_oserror_and_stop_frees_the_port(tmp_path: Path) -> None:
    port = free_port()
    first = ApiServer(app, "127.0.0.1", port, access_log=None, name="a")
    first.start()
    try:
        with pytest.raises(OSError):
            ApiServer(app, "127.0.0.1", port, access_log=None, name="b").start()
    finally:
        started = time.monotonic()
        first.stop()
    assert time.monotonic() - started < 5
    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", port), timeout=2):
        pass


def test_stop_does_not_wait_for_a_request_that_would_outlive_it() -> None:
    # `stackml up` stopped (Ctrl-C) while a client follows a quiet job's log: the stream is
    # cut after the grace period, the stop returns, the port is free
    STUCK.clear()
    server = ApiServer(app, "127.0.0.1", 0, access_log=None, name="stuck")
    server.start()
    port = server.port
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("GET", "/stuck")
    r = conn.getresponse()
    assert r.readline() == b"waiting\n"
    idle = requests.Session()  # a kept-alive connection, idle when the stop comes
    assert idle.post(f"http://127.0.0.1:{port}/echo", data=b"hi", timeout=10).content == b"hi"
    started = time.monotonic()
    server.stop()
    took = time.monotonic() - started
    assert took < STOP_GRACE + 2, took
    with pytest.raises((http.client.IncompleteRead, OSError)):
        r.read()  # the stream was cut, not finished
    STUCK.set()  # the request's thread then fails its next write and ends
    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", port), timeout=2):
        pass
    conn.close()
    idle.close()


def test_stop_with_idle_keep_alive_connections_is_quick() -> None:
    server = ApiServer(app, "127.0.0.1", 0, access_log=None, name="idle")
    server.start()
    sessions = [requests.Session() for _ in range(3)]
    for s in sessions:
        assert s.post(f"http://127.0.0.1:{server.port}/echo", data=b"x", timeout=10).ok
    started = time.monotonic()
    server.stop()
    assert time.monotonic() - started < 0.5
    for s in sessions:
        s.close()


def test_an_oversized_request_head_is_refused_not_buffered(served: tuple[int, Path]) -> None:
    port, _ = served
    big = "x" * (MAX_HEAD_BYTES + 1)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(f"GET /echo HTTP/1.1\r\nHost: a\r\nX-Big: {big}\r\n\r\n".encode())
        assert sock.recv(64).startswith(b"HTTP/1.1 413 ")
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(f"GET /{big} HTTP/1.1\r\nHost: a\r\n\r\n".encode())
        assert sock.recv(64).startswith(b"HTTP/1.1 414 ")
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)  # still serving
    conn.request("POST", "/echo", b"ok")
    assert conn.getresponse().read() == b"ok"
    conn.close()


def test_the_listen_queue_holds_a_burst_of_new_connections(served: tuple[int, Path]) -> None:
    """The kernel's listen queue (`ss`'s Send-Q of the listening socket) takes a burst of new
    connections while the acceptor is busy: cheroot's default of 5 reset a client of a burst of
    16 on a loaded host. Then 64 connections opened at once are all answered."""
    port, _ = served
    out = subprocess.run(
        ["ss", "-Hltn", f"sport = :{port}"], capture_output=True, text=True, check=True, timeout=10
    ).stdout.split()
    assert out[0] == "LISTEN", out
    assert int(out[2]) >= 128, out  # the backlog (the kernel caps it at net.core.somaxconn)
    socks = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(64)]
    try:
        for s in socks:
            s.sendall(b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\n\r\nok")
        for s in socks:
            data = b""
            while not data.endswith(b"\r\n\r\nok"):
                chunk = s.recv(4096)
                assert chunk, data
                data += chunk
            assert data.startswith(b"HTTP/1.1 200 OK"), data
    finally:
        for s in socks:
            s.close()
