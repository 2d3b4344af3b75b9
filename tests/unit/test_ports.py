"""devcloud.process.free_port: the ports the devcloud and the test tiers start servers on."""

from __future__ import annotations

import socket
from pathlib import Path

from devcloud.process import free_port


def test_free_ports_are_distinct_bindable_and_below_the_ephemeral_range() -> None:
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    ports = [free_port() for _ in range(50)]
    assert len(set(ports)) == 50  # never the same port twice in a process
    if low > 21000:  # (else the range leaves no room below it: the kernel's choice is used)
        assert all(p < low for p in ports), (low, ports)  # not where connections draw from
    with socket.socket() as s:
        s.bind(("127.0.0.1", ports[-1]))  # and really free


def test_a_port_in_use_is_not_given(monkeypatch) -> None:
    import devcloud.process as proc

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = busy.getsockname()[1]
        draws = iter([taken, taken, 0])  # the first two draws hit the listening port
        monkeypatch.setattr(proc.random, "randrange", lambda a, b: next(draws))
        monkeypatch.setattr(proc, "_ephemeral_low", lambda: 40000)
        got = free_port()
    assert got != taken and got > 0
