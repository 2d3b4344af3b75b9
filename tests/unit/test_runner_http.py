"""The runner's own HTTP/1.1 client (workers/vm/runner.py: _http, _Uploader) against a real
socket server answering canned bytes: the framings a store answers with (length, chunked,
to the close, an interim 100), connections kept alive only when the answer allows it, 5xx
and broken connections retried, 4xx and garbled answers refused with a sentence."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.canned_http import Canned
from workers.vm import runner


@pytest.fixture
def serve(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[Canned]]:
    monkeypatch.setattr(runner.time, "sleep", lambda _s: None)  # retries without the backoff
    servers: list[Canned] = []
    yield servers
    for s in servers:
        s.close()


def _answer(status: str, body: bytes, *headers: bytes) -> bytes:
    head = b"".join(h + b"\r\n" for h in headers)
    return (
        f"HTTP/1.1 {status}\r\n".encode()
        + head
        + f"Content-Length: {len(body)}\r\n\r\n".encode()
        + body
    )


def _url(s: Canned, path: str = "/obj/a%20b?sig=1") -> str:
    return f"http://127.0.0.1:{s.port}{path}"


def test_a_get_reads_a_length_framed_body_and_sends_a_proper_request(serve: list[Canned]) -> None:
    s = Canned([_answer("200 OK", b"x" * 300_000)])
    serve.append(s)
    with runner._http("GET", _url(s)) as resp:
        assert (resp.status, resp.reason) == (200, "OK")
        assert resp.read(1 << 20) + resp.read(1 << 20) == b"x" * 300_000
        assert resp.read(10) == b""
    assert s.requests[0].startswith(b"GET /obj/a%20b?sig=1 HTTP/1.1\r\n")
    assert f"Host: 127.0.0.1:{s.port}\r\n".encode() in s.requests[0]


def test_chunked_and_to_the_close_bodies_and_an_interim_answer(serve: list[Canned]) -> None:
    chunked = (
        b"HTTP/1.1 100 Continue\r\n\r\n"
        b'HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nETag: "e1"\r\n\r\n'
        b"5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nX-Trailer: t\r\n\r\n"
    )
    a = Canned([chunked])
    b = Canned([b"HTTP/1.0 200 OK\r\n\r\nuntil the close"], close_after=True)
    serve += [a, b]
    with runner._http("GET", _url(a)) as resp:
        assert resp.read() == b"hello world"
        assert resp.headers.get("ETag") == '"e1"'
    with runner._http("GET", _url(b)) as resp:
        assert resp.will_close
        assert resp.read() == b"until the close"


def test_a_4xx_is_refused_at_once_with_the_url_but_not_its_signature(serve: list[Canned]) -> None:
    s = Canned([_answer("403 Forbidden", b"expired")])
    serve.append(s)
    with pytest.raises(runner.RunnerError) as e:
        runner._http("GET", _url(s))
    assert str(e.value) == f"GET http://127.0.0.1:{s.port}/obj/a%20b answered 403 Forbidden"
    assert len(s.requests) == 1


def test_a_5xx_or_a_cut_answer_is_retried_then_named(serve: list[Canned]) -> None:
    flaky = Canned([_answer("503 Service Unavailable", b""), _answer("200 OK", b"ok")])
    serve.append(flaky)
    with runner._http("GET", _url(flaky)) as resp:
        assert resp.read() == b"ok"
    cut = Canned([b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc"] * 3, close_after=True)
    serve.append(cut)
    with runner._http("GET", _url(cut)) as resp, pytest.raises(runner.BadAnswer) as e:
        resp.read()
    assert "7 bytes before the body's end" in str(e.value)
    garbled = Canned([b"SSH-2.0-OpenSSH\r\n\r\n"] * runner.RETRIES, close_after=True)
    serve.append(garbled)
    with pytest.raises(runner.RunnerError) as e2:
        runner._http("GET", _url(garbled))
    assert f"failed after {runner.RETRIES} tries: not an HTTP answer" in str(e2.value)
    assert isinstance(e2.value.__cause__, runner.BadAnswer)


def test_the_uploader_keeps_one_connection_and_checks_each_etag(
    serve: list[Canned], tmp_path: Path
) -> None:
    data = b"model bytes " * 1000
    f = tmp_path / "m"
    f.write_bytes(data)
    md5 = hashlib.md5(data).hexdigest()
    first = hashlib.md5(data[:100]).hexdigest()
    s = Canned(
        [
            _answer("201 Created", b"", f'Etag: "{first}"'.encode()),
            _answer("201 Created", b"", f"Etag: {md5}".encode()),
            _answer("201 Created", b"", b"Etag: 0123456789abcdef0123456789abcdef"),
        ]
    )
    serve.append(s)
    up = runner._Uploader(f"http://127.0.0.1:{s.port}/store/p/", "sig=1&expires=2")
    assert up.put("part 0", str(f), 0, 100) == first
    assert up.put("m", str(f), 0, len(data)) == md5
    with pytest.raises(runner.RunnerError) as e:
        up.put("m", str(f), 0, len(data))
    assert "was corrupted" in str(e.value)
    up.close()
    assert s.connections == 1  # kept alive across the three PUTs
    assert s.requests[0].startswith(b"PUT /store/p/part%200?sig=1&expires=2 HTTP/1.1\r\n")
    assert s.requests[1].endswith(b"\r\n\r\n" + data)
    assert b"Content-Length: 12000\r\n" in s.requests[1]


def test_the_uploader_reconnects_when_the_store_closes_the_connection(
    serve: list[Canned], tmp_path: Path
) -> None:
    f = tmp_path / "m"
    f.write_bytes(b"abc")
    md5 = hashlib.md5(b"abc").hexdigest()
    s = Canned([_answer("201 Created", b"", b"Connection: close")] * 2, close_after=True)
    serve.append(s)
    up = runner._Uploader(f"http://127.0.0.1:{s.port}/p/", "sig=1")
    assert up.put("a", str(f), 0, 3) == md5
    assert up.put("b", str(f), 0, 3) == md5
    assert s.connections == 2


def test_a_header_with_a_line_break_is_never_sent(serve: list[Canned]) -> None:
    s = Canned([_answer("200 OK", b"")])
    serve.append(s)
    with pytest.raises(runner.RunnerError, match="line break"):
        runner._http("PUT", _url(s), b"x", {"X-A": "1\r\nX-Injected: 1"})
    assert s.requests == []
