"""The proxy's HTTP/1.1 client (service/api/predict.py: ReplicaPool, ReplicaConn) against a
real socket server that answers with canned bytes: every framing a replica may use (length,
chunked, close-delimited, interim 1xx), connection reuse only when the answer allows it, and
every garbled or cut answer turned into ReplicaDown (retried elsewhere), never a wrong body."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator

import pytest

from service.api.predict import ReplicaDown, ReplicaPool, ReplicaSlow
from tests.canned_http import Canned


@pytest.fixture
def serve() -> Iterator[list[Canned]]:
    servers: list[Canned] = []
    yield servers
    for s in servers:
        s.close()


def _pool(server: Canned, read: float = 5.0) -> ReplicaPool:
    return ReplicaPool("127.0.0.1", server.port, size=4, connect=2.0, read=read)


def _ok(body: bytes, extra: bytes = b"") -> bytes:
    return (
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
        + extra
        + b"Content-Length: "
        + str(len(body)).encode()
        + b"\r\n\r\n"
        + body
    )


def test_length_framed_answers_reuse_one_connection(serve: list[Canned]) -> None:
    s = Canned([_ok(b'{"predictions": [1]}'), _ok(b'{"predictions": [2]}')])
    serve.append(s)
    pool = _pool(s)
    a = pool.request("POST", "/v1/models/m/versions/1:predict", b'{"instances": [1]}', {})
    b = pool.request("POST", "/v1/models/m/versions/1:predict", b'{"instances": [2]}', {})
    assert (a.status, a.content_type, a.data) == (200, "application/json", b'{"predictions": [1]}')
    assert b.data == b'{"predictions": [2]}'
    assert s.connections == 1
    first = s.requests[0]
    assert first.startswith(b"POST /v1/models/m/versions/1:predict HTTP/1.1\r\n")
    assert f"Host: 127.0.0.1:{s.port}\r\n".encode() in first
    assert first.endswith(b"Content-Length: 18\r\n\r\n" + b'{"instances": [1]}')


def test_chunked_answer_with_trailers_is_joined(serve: list[Canned]) -> None:
    chunked = (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Type: application/json\r\n\r\n"
        b'5;ext=1\r\n{"a":\r\n3\r\n 1}\r\n0\r\nX-Trailer: t\r\n\r\n'
    )
    s = Canned([chunked, _ok(b"{}")])
    serve.append(s)
    pool = _pool(s)
    assert pool.request("GET", "/v1/models/m/metadata", None, {}).data == b'{"a": 1}'
    assert pool.request("GET", "/v1/models/m/metadata", None, {}).data == b"{}"
    assert s.connections == 1  # the chunked answer left the connection reusable


def test_interim_100_is_skipped_and_error_bodies_pass_through(serve: list[Canned]) -> None:
    s = Canned(
        [b"HTTP/1.1 100 Continue\r\n\r\n" + _ok(b'{"error": "bad"}').replace(b"200 OK", b"400 Bad")]
    )
    serve.append(s)
    got = _pool(s).request("POST", "/x", b"{}", {})
    assert (got.status, got.data) == (400, b'{"error": "bad"}')


def test_connection_close_and_http10_answers_are_not_reused(serve: list[Canned]) -> None:
    closing = Canned([_ok(b"1", b"Connection: close\r\n")], close_after=True)
    old = Canned([_ok(b"2").replace(b"HTTP/1.1", b"HTTP/1.0")], close_after=True)
    serve += [closing, old]
    for server, want in ((closing, b"1"), (old, b"2")):
        pool = _pool(server)
        assert pool.request("GET", "/", None, {}).data == want
        assert pool._idle == []


def test_close_delimited_body_is_read_to_the_end(serve: list[Canned]) -> None:
    s = Canned(
        [b'HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n\r\n["all of it"]'],
        close_after=True,
    )
    serve.append(s)
    pool = _pool(s)
    assert pool.request("GET", "/", None, {}).data == b'["all of it"]'
    assert pool._idle == []


def test_an_answer_that_is_not_json_is_not_a_model_servers(serve: list[Canned]) -> None:
    # what answered here for a gone sandbox's address: an egress proxy's empty 404
    s = Canned([b"HTTP/1.1 404 Not Found\r\nserver: keryx\r\ncontent-length: 0\r\n\r\n"])
    serve.append(s)
    pool = _pool(s)
    with pytest.raises(ReplicaDown, match="HTTP 404 with no content type: not a model server"):
        pool.request("POST", "/v1/models/m/versions/1:predict", b"{}", {})
    assert pool._idle == []  # that connection is not kept


def test_an_idle_connection_the_replica_closed_is_not_reused(serve: list[Canned]) -> None:
    s = Canned([_ok(b"1")], close_after=True)  # closes without saying so
    serve.append(s)
    pool = _pool(s)
    assert pool.request("GET", "/", None, {}).data == b"1"
    s.answers.append(_ok(b"2"))
    for _ in range(100):  # the close reaches this side
        if not pool._idle or not pool._idle[0].idle_ok():
            break
        threading.Event().wait(0.01)
    assert pool.request("GET", "/", None, {}).data == b"2"
    assert s.connections == 2


@pytest.mark.parametrize(
    "answer",
    [
        b"SMTP ready\r\n\r\n",
        b"HTTP/1.1 abc OK\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nno colon here\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 99999999999\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort",  # then closed
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabcXY0\r\n\r\n",
        b"HTTP/1.1 200",  # cut inside the head
        b"",  # closed without a word
    ],
    ids=[
        "not-http", "status-not-a-number", "header-without-colon", "length-not-a-number",
        "length-too-large", "body-cut", "chunk-size-garbled", "chunk-without-crlf", "head-cut",
        "closed",
    ],
)  # fmt: skip
def test_garbled_or_cut_answers_are_replica_down(serve: list[Canned], answer: bytes) -> None:
    s = Canned([answer], close_after=True)
    serve.append(s)
    pool = _pool(s)
    with pytest.raises(ReplicaDown):
        pool.request("POST", "/x", b"{}", {})
    assert pool._idle == []


def test_a_silent_replica_is_slow_not_down() -> None:
    quiet = socket.create_server(("127.0.0.1", 0))
    try:
        pool = ReplicaPool("127.0.0.1", quiet.getsockname()[1], size=4, connect=2.0, read=0.3)
        with pytest.raises(ReplicaSlow):
            pool.request("POST", "/x", b"{}", {})
    finally:
        quiet.close()


def test_nothing_listening_is_replica_down() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(ReplicaDown, match="connect"):
        ReplicaPool("127.0.0.1", port, size=4, connect=1.0, read=1.0).request("GET", "/", None, {})
