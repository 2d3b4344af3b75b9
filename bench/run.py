"""Runs every benchmark of bench/ in turn (`make bench`); each prints its own figures."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
BENCHES = [
    "bench_ssh.py",
    "bench_overhead.py",
    "bench_swift.py",
    "bench_openstack_calls.py",
    "bench_trusts.py",
    "bench_serving.py",
    "bench_proxy.py",
    "bench_jobs_list.py",
    "bench_batch.py",
    "bench_burst.py",
    "bench_restart.py",
]


def main() -> int:
    failed = []
    for name in BENCHES:
        print(f"\n=== {name} ===", flush=True)
        if subprocess.run([sys.executable, str(HERE / name)], check=False).returncode != 0:
            failed.append(name)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
