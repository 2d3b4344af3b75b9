"""Benchmark: command latency of workers.ssh vs OpenSSH ControlMaster, and sandbox boot times.

    .venv/bin/python bench/bench_ssh.py [--n 200]

Both clients run `true` against the same sandbox in the same run (interleaved rounds, so machine
noise hits both alike); the ratio paramiko/OpenSSH is the figure (target <= 1.0). Then the boot
time of one sandbox (median of 10) and of 20 concurrent boots. The last line is JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from service.backends.compute.sandbox import SandboxBackend, leak_report
from service.backends.interfaces import Flavor, ServerSpec
from workers import ssh

FLAVOR = Flavor(name="bench.small", vcpus=1, ram_mb=512, pids=256)
ROUNDS = 10


def spec(pub: str, name: str) -> ServerSpec:
    return ServerSpec(name=name, flavor=FLAVOR, image="bench", public_key=pub)


def openssh_argv(work: Path, target: ssh.SSHTarget) -> list[str]:
    key = work / "id_ed25519"
    key.write_text(target.private_key_pem)
    key.chmod(0o600)
    host = target.host if target.port == 22 else f"[{target.host}]:{target.port}"
    (work / "known_hosts").write_text(f"{host} {target.host_key}\n")
    return [
        "ssh", "-F", "/dev/null", "-i", str(key), "-o", "IdentitiesOnly=yes",
        "-o", "BatchMode=yes", "-o", f"UserKnownHostsFile={work / 'known_hosts'}",
        "-o", "StrictHostKeyChecking=yes", "-o", "ControlMaster=auto",
        "-o", f"ControlPath={work}/cm-%C", "-o", "ControlPersist=120",
        "-p", str(target.port), f"{target.username}@{target.host}",
    ]  # fmt: skip


def timed(fn: object, n: int) -> list[float]:
    out = []
    for _ in range(n):
        t = time.perf_counter()
        fn()  # type: ignore[operator]
        out.append(time.perf_counter() - t)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=200, help="commands per client")
    args = parser.parse_args()

    base = Path(tempfile.mkdtemp(prefix="stackml-bench-", dir="/var/tmp"))
    os.chmod(base, 0o755)
    backend = SandboxBackend(base / "sandboxes", [FLAVOR])
    pem, pub = ssh.generate_keypair()
    ssh_base: list[str] = []
    figures: dict[str, float | int | str] = {"isolation": backend.isolation}
    try:
        ref = backend.create_server(spec(pub, "bench"))
        st = backend.get_server(ref.id)
        assert st.host and st.username
        target = ssh.SSHTarget(st.host, st.port, st.username, pem, st.host_key)

        conn = ssh.wait_for_ssh(target, 10)
        ssh_base = openssh_argv(base, target)

        def paramiko_true() -> None:
            conn.run(["true"], timeout=10)

        def openssh_true() -> None:
            subprocess.run([*ssh_base, "true"], check=True, stdin=subprocess.DEVNULL)

        for _ in range(10):  # warm up both (the first OpenSSH call starts the master)
            paramiko_true()
            openssh_true()
        p_lat: list[float] = []
        o_lat: list[float] = []
        per_round = max(1, args.n // ROUNDS)
        for _ in range(ROUNDS):
            p_lat += timed(paramiko_true, per_round)
            o_lat += timed(openssh_true, per_round)
        p_med, o_med = statistics.median(p_lat), statistics.median(o_lat)
        figures.update(
            n=len(p_lat),
            paramiko_true_ms=round(p_med * 1000, 3),
            openssh_controlmaster_true_ms=round(o_med * 1000, 3),
            ratio=round(p_med / o_med, 3),
        )
        print(f"exec `true` x{len(p_lat)} on one connection (median):")
        print(f"  workers.ssh (paramiko)      {p_med * 1000:7.2f} ms")
        print(f"  OpenSSH ControlMaster       {o_med * 1000:7.2f} ms")
        print(f"  ratio paramiko/OpenSSH      {p_med / o_med:7.2f}x  (target <= 1.0)")
        conn.close()
        subprocess.run([*ssh_base, "-O", "exit"], capture_output=True, check=False)
        ssh_base = []
        backend.delete_server(ref.id)

        boots, deletes = [], []
        for i in range(10):
            t = time.perf_counter()
            r = backend.create_server(spec(pub, f"boot-{i}"))
            boots.append(time.perf_counter() - t)
            t = time.perf_counter()
            backend.delete_server(r.id)
            deletes.append(time.perf_counter() - t)
        figures.update(
            boot_ms=round(statistics.median(boots) * 1000, 2),
            delete_ms=round(statistics.median(deletes) * 1000, 2),
        )
        print(f"boot one sandbox (median of 10)   {statistics.median(boots) * 1000:7.1f} ms")
        print(f"delete one sandbox (median of 10) {statistics.median(deletes) * 1000:7.1f} ms")

        with ThreadPoolExecutor(20) as pool:
            t = time.perf_counter()
            refs = list(pool.map(lambda i: backend.create_server(spec(pub, f"c{i}")), range(20)))
            boot20 = time.perf_counter() - t
            t = time.perf_counter()
            list(pool.map(lambda r: backend.delete_server(r.id), refs))
            delete20 = time.perf_counter() - t
        figures.update(boot_20_concurrent_s=round(boot20, 3), delete_20_s=round(delete20, 3))
        print(f"20 concurrent boots               {boot20 * 1000:7.1f} ms (wall)")
        print(f"20 concurrent deletes             {delete20 * 1000:7.1f} ms (wall)")
    finally:
        if ssh_base:
            subprocess.run([*ssh_base, "-O", "exit"], capture_output=True, check=False)
        ssh.close_all()
        for r in backend.list_servers():
            backend.delete_server(r.id)
        leaks = leak_report(backend.root)
        shutil.rmtree(base, ignore_errors=True)
    figures["leaks"] = len(leaks)
    for leak in leaks:
        print(f"LEAK: {leak}", file=sys.stderr)
    print(json.dumps(figures))
    return 1 if leaks else 0


if __name__ == "__main__":
    raise SystemExit(main())
