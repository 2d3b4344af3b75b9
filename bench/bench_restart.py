"""Restarts (restart_policy): what a lost server costs, and what the checkpoint sync costs.

1. Checkpoint sync overhead per training step. One trainer does BENCH_STEPS steps of fixed CPU
   work (matrix products), writing an 8 MiB checkpoint every 10 steps, and reports the median
   seconds of its steps. It runs as a job with restart_policy Never (no sync: the baseline)
   and with OnFailure (the runner syncs every 2 s, five times as often as the default),
   alternately (and which goes first in turn), BENCH_PAIRS times, on the same platform.
   Target (issue #12): <= 5%.
2. A lost server to training resumed. A job with restart_policy OnFailure writes its
   checkpoint, which is synced; the bench SIGKILLs its sandbox and measures the seconds from
   the kill to the first line the resumed trainer prints, with the detection (the kill to the
   `restart` event) and the new server's boot + provision + restore inside it. The baseline,
   in the same run: a fresh job of the same trainer from submission to its first line.
3. A lost replica to training resumed. The same with a distributed job (resources.workers 2,
   MultiWorkerMirroredStrategy's restart-all failover): the bench SIGKILLs the sandbox of
   replica worker-1, and measures the kill to the first line of the resumed chief (both
   replicas restart on new servers, the chief's checkpoints restored on each). The baseline:
   a fresh two-replica job to its chief's first line.
4. A lost parameter-server worker replaced alone. A job of a chief, two workers and a
   parameter server (resources.workers 3, parameter_servers 1: ParameterServerStrategy's
   failover, no TensorFlow): the chief ticks for CHIEF_SECONDS while the others serve; the
   bench SIGKILLs worker-1's sandbox and measures the kill to the first line of its
   replacement (the `replace` events in between), checking that the chief never stopped (no
   restart, its ticks contiguous). The baseline: a fresh job of the same four replicas to its
   chief's first line.

Prints each figure, then one JSON line with all of them.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from service.client import StackMLClient
from service.config import Settings, reset_settings
from service.platform import LocalPlatform
from service.runtime import ensure_runtime

STEPS = int(os.environ.get("BENCH_STEPS", "100"))
PAIRS = int(os.environ.get("BENCH_PAIRS", "3"))
KILLS = int(os.environ.get("BENCH_KILLS", "3"))
TARGET_SYNC_OVERHEAD = 0.05

STEPPER = """
import json, os, statistics, sys, time
import numpy as np
ckpt = os.environ["STACKML_CHECKPOINT_DIR"]
a = np.random.default_rng(0).random((256, 256))
times = []
for step in range(int(sys.argv[1])):
    t0 = time.perf_counter()
    for _ in range(12):
        b = a @ a
    if step % 10 == 9:
        np.save(os.path.join(ckpt, f"ckpt-{step}.npy"), np.random.default_rng(step).random(1 << 20))
    times.append(time.perf_counter() - t0)
print(json.dumps({"median_step_s": statistics.median(times)}), flush=True)
open(os.path.join(os.environ["STACKML_MODEL_DIR"], "m"), "w").write("1")
"""
# writes its checkpoint and waits to be killed; a run that finds it says so and ends
RESUMER = """
import os, time
mark = os.path.join(os.environ["STACKML_CHECKPOINT_DIR"], "mark")
if os.path.exists(mark):
    print("resumed", flush=True)
else:
    open(mark, "wb").write(os.urandom(1 << 20))
    print("started", flush=True)
    time.sleep(600)
open(os.path.join(os.environ["STACKML_MODEL_DIR"], "m"), "w").write("1")
"""
CHIEF_SECONDS = 40
# ParameterServerStrategy's shape without TensorFlow: the chief works, the others serve
SERVER = f"""
import os, time
if os.environ["STACKML_REPLICA"] != "chief":
    print("serving", flush=True)
    time.sleep(600)
print("started", flush=True)
for i in range({CHIEF_SECONDS} * 5):
    print(f"tick {{i}}", flush=True)
    time.sleep(0.2)
open(os.path.join(os.environ["STACKML_MODEL_DIR"], "m"), "w").write("1")
"""


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _at(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def _wait(
    client: StackMLClient, job_id: str, pred: Callable[[Any], bool], timeout: float, what: str
) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        job = client.get_job(job_id)
        if pred(job):
            return job
        if job["state"] in ("FAILED", "CANCELLED") or time.monotonic() > deadline:
            raise SystemExit(f"job {job_id}: {what} not reached: {job['state']} {job['failure']}")
        time.sleep(0.05)


def _first_line_at(client: StackMLClient, job_id: str, needle: bytes, timeout: float) -> float:
    """When the log first holds `needle` (seen by polling the API every 50 ms)."""
    deadline = time.monotonic() + timeout
    while needle not in client.logs(job_id)[0]:
        if time.monotonic() > deadline:
            raise SystemExit(f"job {job_id}: no {needle!r} in {timeout}s")
        time.sleep(0.05)
    return time.time()


def step_time(client: StackMLClient, uri: str, policy: str) -> float:
    job = client.create_job(
        {
            "name": f"bench-sync-{policy.lower()}",
            "trainer": {"package_uri": uri, "module": "trainer.stepper", "args": [str(STEPS)]},
            "restart_policy": policy,
        }
    )
    done = client.wait(job["id"], timeout=600, interval=0.2, max_interval=0.5)
    if done["state"] != "SUCCEEDED":
        raise SystemExit(f"job {job['id']} ended {done['state']}: {done['failure']}")
    for line in client.logs(job["id"])[0].decode().splitlines():
        if line.startswith("{"):
            return float(json.loads(line)["median_step_s"])
    raise SystemExit(f"job {job['id']} printed no step time")


def recovery(
    client: StackMLClient, settings: Settings, uri: str, replicas: int = 1
) -> dict[str, float]:
    """Kill the sandbox of the job's last replica (the only one, or worker-<replicas-1>)."""
    job = client.create_job(
        {
            "name": "bench-restart" if replicas == 1 else "bench-restart-replica",
            "trainer": {"package_uri": uri, "module": "trainer.resumer"},
            "resources": {"workers": replicas},
            "restart_policy": "OnFailure",
            "max_restarts": 1,
        }
    )
    _first_line_at(client, job["id"], b"started", 120)
    time.sleep(2 * float(settings.checkpoint_sync_seconds) + 1.5)  # one quiet pass at least
    running = client.get_job(job["id"])
    server = [r for r in running["resources"] if r["server_id"]][-1]["server_id"]
    record = json.loads((settings.sandbox_dir / server / "server.json").read_text())
    t_kill = time.time()
    os.kill(int(record["sshd_pid"]), signal.SIGKILL)
    t_resumed = _first_line_at(client, job["id"], b"resumed", 180)
    done = client.wait(job["id"], timeout=120, interval=0.2, max_interval=0.5)
    if done["state"] != "SUCCEEDED" or done["restarts"] != 1:
        raise SystemExit(f"job {job['id']} ended {done['state']}: {done['failure']}")
    events = client.events(job["id"])["events"]
    t_restart = next(_at(e["at"]) for e in events if e["kind"] == "restart")
    t_running = [_at(e["at"]) for e in events if e["to"] == "RUNNING"][-1]
    return {
        "kill_to_resumed_s": t_resumed - t_kill,
        "kill_to_restart_event_s": t_restart - t_kill,
        "restart_event_to_running_s": t_running - t_restart,
    }


PS_RESOURCES = {"workers": 3, "parameter_servers": 1}


def replaced_alone(client: StackMLClient, settings: Settings, uri: str) -> dict[str, float]:
    """Kill worker-1's sandbox of a parameter-server job; the seconds to its replacement's
    first line, and to the two `replace` events (handed over, started)."""
    job = client.create_job(
        {
            "name": "bench-replace",
            "trainer": {"package_uri": uri, "module": "trainer.server"},
            "resources": PS_RESOURCES,
            "restart_policy": "OnFailure",
            "max_restarts": 1,
        }
    )
    _first_line_at(client, job["id"], b"tick 5", 120)
    running = client.get_job(job["id"])
    server = next(r for r in running["resources"] if r["name"].endswith("-worker-1"))
    record = json.loads((settings.sandbox_dir / server["server_id"] / "server.json").read_text())
    t_kill = time.time()
    os.kill(int(record["sshd_pid"]), signal.SIGKILL)
    deadline = time.monotonic() + CHIEF_SECONDS
    while client.logs(job["id"], replica="worker-1")[0].count(b"serving") < 2:
        if time.monotonic() > deadline:
            raise SystemExit(f"job {job['id']}: worker-1 not replaced in {CHIEF_SECONDS}s")
        time.sleep(0.05)
    t_serving = time.time()
    done = client.wait(job["id"], timeout=120, interval=0.2, max_interval=0.5)
    if done["state"] != "SUCCEEDED" or done["restarts"] != 0:
        raise SystemExit(f"job {job['id']} ended {done['state']} ({done['restarts']} restarts)")
    ticks = [ln for ln in client.logs(job["id"])[0].decode().splitlines() if ln.startswith("tick")]
    if ticks != [f"tick {i}" for i in range(CHIEF_SECONDS * 5)]:
        raise SystemExit(f"job {job['id']}: the chief's ticks are not contiguous")
    handed, started = (
        _at(e["at"]) for e in client.events(job["id"])["events"] if e["kind"] == "replace"
    )
    return {
        "kill_to_replacement_serving_s": t_serving - t_kill,
        "kill_to_replace_event_s": handed - t_kill,
        "replace_event_to_started_s": started - handed,
    }


def fresh_start(
    client: StackMLClient, uri: str, replicas: int = 1, module: str = "trainer.resumer"
) -> float:
    """Submission to the first line of a new job of the same trainer (then it is cancelled)."""
    t0 = time.time()
    resources = PS_RESOURCES if module == "trainer.server" else {"workers": replicas}
    job = client.create_job(
        {
            "name": "bench-fresh",
            "trainer": {"package_uri": uri, "module": module},
            "resources": resources,
        }
    )
    t1 = _first_line_at(client, job["id"], b"started", 120)
    client.cancel_job(job["id"])
    _wait(client, job["id"], lambda j: j["state"] == "CANCELLED", 60, "cancelled")
    return t1 - t0


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
            "STACKML_CHECKPOINT_SYNC_SECONDS": "2",
        }
    )
    reset_settings()
    settings = Settings()
    ensure_runtime(settings, settings.default_runtime, echo=print)
    pkg_dir = data / "pkg"
    (pkg_dir / "trainer").mkdir(parents=True)
    (pkg_dir / "trainer" / "__init__.py").write_text("")
    (pkg_dir / "trainer" / "stepper.py").write_text(STEPPER)
    (pkg_dir / "trainer" / "resumer.py").write_text(RESUMER)
    (pkg_dir / "trainer" / "server.py").write_text(SERVER)
    off: list[float] = []
    on: list[float] = []
    kills: list[dict[str, float]] = []
    fresh: list[float] = []
    replica_kills: list[dict[str, float]] = []
    replica_fresh: list[float] = []
    alone: list[dict[str, float]] = []
    ps_fresh: list[float] = []
    try:
        with LocalPlatform(settings, concurrency=2, quiet=True) as p:
            client = StackMLClient(p.url)
            uri = client.stage_package(pkg_dir)["package_uri"]
            step_time(client, uri, "Never")  # warm-up: worker processes, imports, page cache
            for n in range(PAIRS):  # in turn which goes first: the second of two runs faster
                if n % 2:
                    on.append(step_time(client, uri, "OnFailure"))
                    off.append(step_time(client, uri, "Never"))
                else:
                    off.append(step_time(client, uri, "Never"))
                    on.append(step_time(client, uri, "OnFailure"))
            for _ in range(KILLS):
                fresh.append(fresh_start(client, uri))
                kills.append(recovery(client, settings, uri))
            for _ in range(KILLS):
                replica_fresh.append(fresh_start(client, uri, replicas=2))
                replica_kills.append(recovery(client, settings, uri, replicas=2))
            for _ in range(KILLS):
                ps_fresh.append(fresh_start(client, uri, module="trainer.server"))
                alone.append(replaced_alone(client, settings, uri))
            time.sleep(3)  # let the last teardowns finish before the platform stops
    finally:
        shutil.rmtree(data, ignore_errors=True)
    step_off, step_on = statistics.median(off), statistics.median(on)
    fig: dict[str, float | int] = {
        "steps": STEPS,
        "pairs": PAIRS,
        "median_step_no_sync_s": round(step_off, 4),
        "median_step_sync_every_2s_s": round(step_on, 4),
        "sync_overhead_per_step": round(step_on / step_off - 1, 4),
        "target_sync_overhead_per_step": TARGET_SYNC_OVERHEAD,
        "kills": KILLS,
        "fresh_job_to_first_line_median_s": round(statistics.median(fresh), 3),
    }
    for key in ("kill_to_resumed_s", "kill_to_restart_event_s", "restart_event_to_running_s"):
        fig[f"{key.removesuffix('_s')}_median_s"] = round(
            statistics.median(k[key] for k in kills), 3
        )
    fig["resume_vs_fresh_start_ratio"] = round(
        float(fig["kill_to_resumed_median_s"]) / float(fig["fresh_job_to_first_line_median_s"]), 2
    )
    fig["fresh_2_replica_job_to_first_line_median_s"] = round(statistics.median(replica_fresh), 3)
    for key in ("kill_to_resumed_s", "kill_to_restart_event_s", "restart_event_to_running_s"):
        fig[f"replica_{key.removesuffix('_s')}_median_s"] = round(
            statistics.median(k[key] for k in replica_kills), 3
        )
    fig["fresh_ps_job_to_first_line_median_s"] = round(statistics.median(ps_fresh), 3)
    for key in alone[0]:
        fig[f"ps_{key.removesuffix('_s')}_median_s"] = round(
            statistics.median(k[key] for k in alone), 3
        )
    print(
        f"checkpoint sync: median step {step_off * 1000:.1f} ms without, {step_on * 1000:.1f} ms "
        f"with a sync every 2 s: {fig['sync_overhead_per_step']:+.1%} per step "
        f"(target <= {TARGET_SYNC_OVERHEAD:.0%})"
    )
    print(
        f"lost server -> training resumed: median {fig['kill_to_resumed_median_s']}s "
        f"(detected {fig['kill_to_restart_event_median_s']}s, restart -> RUNNING "
        f"{fig['restart_event_to_running_median_s']}s); a fresh job to its first line "
        f"{fig['fresh_job_to_first_line_median_s']}s (ratio {fig['resume_vs_fresh_start_ratio']})"
    )
    print(
        f"lost replica (worker-1 of 2) -> training resumed: median "
        f"{fig['replica_kill_to_resumed_median_s']}s (detected "
        f"{fig['replica_kill_to_restart_event_median_s']}s, restart -> RUNNING "
        f"{fig['replica_restart_event_to_running_median_s']}s); a fresh 2-replica job to its "
        f"chief's first line {fig['fresh_2_replica_job_to_first_line_median_s']}s"
    )
    print(
        f"lost parameter-server worker (worker-1 of chief + 2 workers + 1 ps) -> its replacement "
        f"serving: median {fig['ps_kill_to_replacement_serving_median_s']}s (detected "
        f"{fig['ps_kill_to_replace_event_median_s']}s, replace -> started "
        f"{fig['ps_replace_event_to_started_median_s']}s), the chief never stopped; a fresh "
        f"job of the same 4 replicas to its chief's first line "
        f"{fig['fresh_ps_job_to_first_line_median_s']}s"
    )
    print(json.dumps(fig))
    return 0


if __name__ == "__main__":
    sys.exit(main())
