"""Control-plane overhead: a trainer that exits at once, end to end through the API, minus the
irreducible steps measured in the same run (boot one sandbox + one SSH exec of the same command).

Prints the median overhead of 20 sequential jobs and p50/p95 of 20 concurrent jobs next to
their targets (issue #13: sequential median <= 0.25 s; concurrent p50 <= 2 s, p95 <= 3 s), the
median seconds each job spent in each state, then one JSON line with every figure. The
project's quota is raised to fit the 20 jobs at once (a quota wait is not overhead);
BENCH_JOBS and BENCH_WORKERS (the worker's prefork pool, 4) change the run.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from service.backends.compute.sandbox import SandboxBackend
from service.backends.interfaces import ServerSpec
from service.client import StackMLClient
from service.config import Settings, reset_settings
from service.platform import LocalPlatform
from service.runtime import ensure_runtime
from workers import ssh

N = int(os.environ.get("BENCH_JOBS", "20"))
WORKERS = int(os.environ.get("BENCH_WORKERS", "4"))  # the worker's prefork pool
TARGETS = {"sequential": 0.25, "p50": 2.0, "p95": 3.0}
TRAINER = "import os; open(os.path.join(os.environ['STACKML_MODEL_DIR'], 'm'), 'w').write('1')"


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def baseline(settings: Settings, python: Path, pkg_dir: Path) -> float:
    """Boot one sandbox, run the same trainer once over SSH, delete it."""
    backend = SandboxBackend(settings.data_dir / "baseline-sandboxes", settings.flavors())
    flavor = backend.find_flavor(settings.default_flavor)
    assert flavor is not None
    pem, pub = ssh.generate_keypair()
    t0 = time.perf_counter()
    ref = backend.create_server(
        ServerSpec(
            name="bench-baseline", flavor=flavor, image=settings.default_runtime, public_key=pub
        )
    )
    st = backend.get_server(ref.id)
    target = ssh.SSHTarget(st.host or "", st.port, st.username or "root", pem, st.host_key)
    conn = ssh.wait_for_ssh(target, 30)
    conn.run(
        [
            "env",
            f"STACKML_MODEL_DIR=/tmp/bench-{ref.id}",
            "sh",
            "-c",
            f'mkdir -p $STACKML_MODEL_DIR && {python} -c "{TRAINER}"',
        ],
        timeout=60,
    )
    elapsed = time.perf_counter() - t0
    conn.close()
    backend.delete_server(ref.id)
    return elapsed


def phases(client: StackMLClient, job_id: str) -> dict[str, float]:
    """Seconds spent in each state, from the job's timeline."""
    ev = [e for e in client.events(job_id)["events"] if e["kind"] == "transition"]
    out: dict[str, float] = {}
    for a, b in zip(ev, ev[1:], strict=False):
        t0 = datetime.fromisoformat(a["at"].replace("Z", "+00:00"))
        t1 = datetime.fromisoformat(b["at"].replace("Z", "+00:00"))
        out[a["to"]] = (t1 - t0).total_seconds()
    return out


def run_job(client: StackMLClient, package_uri: str) -> float:
    """Submit one job and wait for it; seconds from just before the submit to the job's own
    finished_at (the server's clock, the same host's). The wait polls as the CLI does (0.2 s,
    backing off): the finish time comes from the job, so a lazy poll costs no accuracy, and 20
    waiters do not load the API they measure (at 20 ms each they were 1,000 GET/s and took
    most of the 2 cores)."""
    t0 = time.time()
    job = client.create_job(
        {"name": "bench", "trainer": {"package_uri": package_uri, "module": "trainer.quick"}}
    )
    done = client.wait(job["id"], timeout=300, interval=0.2, max_interval=0.5)
    if done["state"] != "SUCCEEDED":
        raise SystemExit(f"job {job['id']} ended {done['state']}: {done['failure']}")
    LAST_IDS.append(job["id"])
    finished = datetime.fromisoformat(done["finished_at"].replace("Z", "+00:00"))
    return finished.timestamp() - t0


LAST_IDS: list[str] = []


def main() -> int:
    data = Path(tempfile.mkdtemp(prefix="stackml-bench-", dir="/var/tmp"))
    os.chmod(data, 0o755)
    os.environ.update(
        {
            "STACKML_DATA_DIR": str(data),
            "STACKML_PORT": str(_port()),
            "STACKML_RUNTIME_ROOT": os.environ.get(
                "STACKML_TEST_RUNTIME_ROOT", "/var/cache/stackml/runtimes"
            ),
            "STACKML_QUOTA_DEFAULTS": json.dumps({"jobs": 2 * N, "servers": 2 * N, "gpus": 0}),
        }
    )
    reset_settings()
    settings = Settings()
    python = ensure_runtime(settings, settings.default_runtime, echo=print)
    pkg_dir = data / "pkg"
    (pkg_dir / "trainer").mkdir(parents=True)
    (pkg_dir / "trainer" / "__init__.py").write_text("")
    (pkg_dir / "trainer" / "quick.py").write_text(TRAINER + "\n")
    try:
        with LocalPlatform(settings, concurrency=WORKERS, quiet=True) as p:
            client = StackMLClient(p.url)
            uri = client.stage_package(pkg_dir)["package_uri"]
            run_job(client, uri)  # warm-up: worker processes, connections, imports
            base = [baseline(settings, python, pkg_dir) for _ in range(5)]
            b = statistics.median(base)
            seq = [run_job(client, uri) for _ in range(N)]
            seq_phases = [phases(client, j) for j in LAST_IDS[-N:]]
            with ThreadPoolExecutor(N) as pool:
                conc = list(pool.map(lambda _: run_job(client, uri), range(N)))
            conc_phases = [phases(client, j) for j in LAST_IDS[-N:]]
            time.sleep(3)  # let the last teardowns finish before the platform stops
    finally:
        shutil.rmtree(data, ignore_errors=True)
    seq_over = [t - b for t in seq]
    conc_over = [t - b for t in conc]
    fig = {
        "baseline_boot_plus_exec_s": round(b, 3),
        "sequential_jobs": N,
        "sequential_e2e_median_s": round(statistics.median(seq), 3),
        "sequential_overhead_median_s": round(statistics.median(seq_over), 3),
        "concurrent_jobs": N,
        "concurrent_overhead_p50_s": round(_pct(conc_over, 0.5), 3),
        "concurrent_overhead_p95_s": round(_pct(conc_over, 0.95), 3),
        "target_sequential_overhead_s": TARGETS["sequential"],
        "target_concurrent_overhead_p50_s": TARGETS["p50"],
        "target_concurrent_overhead_p95_s": TARGETS["p95"],
    }
    print(f"baseline (boot + one SSH exec): {b:.3f}s")
    print(
        f"sequential: median e2e {fig['sequential_e2e_median_s']}s, median overhead "
        f"{fig['sequential_overhead_median_s']}s (target <= {TARGETS['sequential']}s)"
    )
    print(
        f"concurrent ({N}): overhead p50 {fig['concurrent_overhead_p50_s']}s "
        f"(target <= {TARGETS['p50']}s), p95 {fig['concurrent_overhead_p95_s']}s "
        f"(target <= {TARGETS['p95']}s)"
    )
    for label, rows in (("sequential", seq_phases), ("concurrent", conc_phases)):
        med = {
            k: round(statistics.median(r.get(k, 0.0) for r in rows), 3)
            for k in ("QUEUED", "ALLOCATING", "PROVISIONING", "RUNNING", "EXPORTING")
        }
        print(f"{label}: median seconds per state {med}")
        fig[f"{label}_state_medians_s"] = med  # type: ignore[assignment]
    print(json.dumps(fig))
    return 0


if __name__ == "__main__":
    sys.exit(main())
