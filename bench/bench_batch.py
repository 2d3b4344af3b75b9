"""Batch prediction throughput: rows/s through a batch_prediction job against the same model
served by workers/vm/model_server.py and called directly from one process, in the same run.

The platform runs as `stackml up` runs it (LocalPlatform: API, worker, a sandbox over SSH). A
small SavedModel (x float32 [-1, 20] -> y, tests/integration/savedmodels.py) is registered as a
model version; BENCH_BATCH_ROWS rows of JSONL go to the store; a job predicts them in batches of
BENCH_BATCH_SIZE rows, in shards of BENCH_BATCH_SHARD_ROWS rows. Measured:

- the job end to end (submit -> SUCCEEDED: allocate, provision, fetch, load, predict, upload,
  the manifest check), its RUNNING phase alone (from the job's events: the predictor's own
  start, TensorFlow import and load, fetch, prediction and shard uploads), and its shards alone
  (the per-shard seconds the predictor logs: read, parse, predict, serialise, PUT);
- the baseline: the model server started locally on the same SavedModel, the same rows POSTed
  in the same batches, one kept-alive connection, one process (after a warm-up).

Scaling: the same job with max_workers 1, 2 and 4 (BENCH_BATCH_WORKERS), each server a sandbox
on this machine: the speedup of the RUNNING phase and of the whole job over max_workers 1, and
the check that every run's merged manifest is the same. On a machine of few cores the servers
share its CPUs, so the speedup is bounded by the cores, not by the platform. Ends with one JSON
line.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import random
import shutil
import socket
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.bench_serving import build_models, model_server
from service.backends import registry
from service.client import StackMLClient
from service.config import Settings, reset_settings
from service.platform import LocalPlatform
from service.runtime import ensure_runtime

ROWS = int(os.environ.get("BENCH_BATCH_ROWS", "200000"))
BATCH = int(os.environ.get("BENCH_BATCH_SIZE", "256"))
SHARD_ROWS = int(os.environ.get("BENCH_BATCH_SHARD_ROWS", "20000"))
N = 20
JOB_DEADLINE = 900.0
WORKERS = [int(w) for w in os.environ.get("BENCH_BATCH_WORKERS", "1,2,4").split(",")]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _rows() -> list[list[float]]:
    rnd = random.Random(7)
    return [[round(rnd.uniform(-1, 1), 5) for _ in range(N)] for _ in range(ROWS)]


def _at(ts: str) -> float:
    return datetime.fromisoformat(ts.replace("Z", "+00:00")).timestamp()


def direct(host: str, port: int, path: str, rows: list[list[float]]) -> float:
    """Seconds to POST every row in batches of BATCH on one kept-alive connection."""
    conn = http.client.HTTPConnection(host, port, timeout=60)
    bodies = [
        json.dumps({"instances": rows[i : i + BATCH]}).encode() for i in range(0, len(rows), BATCH)
    ]
    for body in bodies[:3]:  # warm-up
        conn.request("POST", path, body=body, headers={"Content-Type": "application/json"})
        conn.getresponse().read()
    t0 = time.perf_counter()
    for body in bodies:
        conn.request("POST", path, body=body, headers={"Content-Type": "application/json"})
        r = conn.getresponse()
        out = json.loads(r.read())
        if r.status != 200 or "predictions" not in out:
            raise SystemExit(f"the model server answered {r.status}: {out}")
    wall = time.perf_counter() - t0
    conn.close()
    return wall


@dataclass(frozen=True)
class Run:
    e2e: float  # submit -> SUCCEEDED
    running: float  # RUNNING -> EXPORTING
    shard_s: float  # the shards the first server logs (max_workers 1: all of them)
    rec: dict[str, Any]
    digest: str  # of the merged manifest: every run computes the same shards


def run_job(client: StackMLClient, store: Any, area: str, workers: int) -> Run:
    """One batch job over the bench rows on `workers` servers, followed to SUCCEEDED."""
    out = store.uri(f"{area}bench/out-{workers}/")
    t0 = time.perf_counter()
    job = client.create_job(
        {
            "name": f"bench-batch-{workers}",
            "type": "batch_prediction",
            "prediction": {
                "model": "bench-lin",
                "version": 1,
                "input_uris": [store.uri(f"{area}bench/rows.jsonl")],
                "output_prefix": out,
                "batch_size": BATCH,
                "shard_rows": SHARD_ROWS,
                "max_workers": workers,
            },
            "max_runtime_seconds": int(JOB_DEADLINE),
        }
    )
    deadline = time.monotonic() + JOB_DEADLINE
    while True:
        done = client.get_job(job["id"])
        if done["state"] in ("SUCCEEDED", "FAILED", "CANCELLED"):
            break
        if time.monotonic() > deadline:
            raise SystemExit(f"the bench job did not finish in {JOB_DEADLINE}s")
        time.sleep(0.05)
    e2e = time.perf_counter() - t0
    if done["state"] != "SUCCEEDED":
        raise SystemExit(f"the bench job ended {done['state']}: {done['failure']}")
    events = client.events(job["id"])["events"]
    at = {e.get("to"): _at(e["at"]) for e in events if e.get("kind") == "transition"}
    rec = done["output"]["prediction"]
    if rec["rows"] != ROWS or rec["errors"]:
        raise SystemExit(f"the job predicted {rec['rows']} rows with {rec['errors']} errors")
    log, _ = client.logs(job["id"])
    shard_s = sum(
        float(line.split(", ")[2].rstrip("s"))
        for line in log.decode(errors="replace").splitlines()
        if line.startswith("batch") and " shard " in line and line.endswith("rows/s")
    )
    digest = hashlib.sha256(store.get(store.key_of(out) + "manifest.json")).hexdigest()[:12]
    return Run(e2e, at["EXPORTING"] - at["RUNNING"], shard_s, rec, digest)


def main() -> int:
    data = Path(tempfile.mkdtemp(prefix="stackml-bench-batch-", dir="/var/tmp"))
    os.chmod(data, 0o755)
    os.environ.update(
        {
            "STACKML_DATA_DIR": str(data),
            "STACKML_PORT": str(_port()),
            "STACKML_RUNTIME_ROOT": os.environ.get(
                "STACKML_TEST_RUNTIME_ROOT", "/var/cache/stackml/runtimes"
            ),
        }
    )
    reset_settings()
    settings = Settings()
    python = ensure_runtime(settings, settings.default_runtime, echo=print)
    rows = _rows()
    try:
        base_path = build_models(python, data / "models")
        with LocalPlatform(settings, concurrency=2, quiet=True) as p:
            client = StackMLClient(p.url)
            store = registry.store(settings)
            area = store.project_prefix("local")
            for path in sorted((base_path / "1").rglob("*")):
                if path.is_file():
                    key = f"{area}models/bench-lin/1/{path.relative_to(base_path / '1').as_posix()}"
                    store.put(key, path.read_bytes())
            client.create_model("bench-lin")
            client.create_version("bench-lin", artifact_uri=store.uri(f"{area}models/bench-lin/1/"))
            if client.wait_version("bench-lin", 1, timeout=120)["state"] != "READY":
                raise SystemExit("the bench model's version did not become READY")
            body = "".join(json.dumps(r) + "\n" for r in rows).encode()
            store.put(f"{area}bench/rows.jsonl", body)
            runs = {w: run_job(client, store, area, w) for w in WORKERS}
            time.sleep(3)  # let the teardown finish before the platform stops
        with model_server(base_path=base_path) as srv:
            base = direct(srv.host, srv.port, f"/v1/models/{srv.name}/versions/1:predict", rows)
    finally:
        shutil.rmtree(data, ignore_errors=True)
    one = runs[WORKERS[0]]
    e2e, running, shard_s, rec, digest = (
        one.e2e,
        one.running,
        one.shard_s,
        one.rec,
        one.digest,
    )
    if len({r.digest for r in runs.values()}) != 1:
        raise SystemExit(f"the runs' manifests differ: {[r.digest for r in runs.values()]}")
    scaling = {
        str(w): {
            "e2e_s": round(r.e2e, 3),
            "running_s": round(r.running, 3),
            "running_rows_per_s": round(ROWS / r.running, 1),
            "running_speedup": round(one.running / r.running, 3),
            "e2e_speedup": round(one.e2e / r.e2e, 3),
        }
        for w, r in runs.items()
    }
    fig = {
        "bench": "batch",
        "rows": ROWS,
        "batch_size": BATCH,
        "shards": rec["shards"],
        "job_e2e_s": round(e2e, 3),
        "job_running_s": round(running, 3),
        "job_e2e_rows_per_s": round(ROWS / e2e, 1),
        "job_running_rows_per_s": round(ROWS / running, 1),
        "job_shards_s": round(shard_s, 3),
        "job_shards_rows_per_s": round(ROWS / shard_s, 1),
        "shards_vs_direct": round(base / shard_s, 3),
        "direct_s": round(base, 3),
        "direct_rows_per_s": round(ROWS / base, 1),
        "running_vs_direct": round((ROWS / running) / (ROWS / base), 3),
        "e2e_vs_direct": round((ROWS / e2e) / (ROWS / base), 3),
        "cores": os.cpu_count(),
        "scaling": scaling,
        "manifest_sha": digest,
    }
    print(
        f"batch job: {ROWS} rows in {rec['shards']} shard(s), batch {BATCH}: end to end "
        f"{fig['job_e2e_s']}s ({fig['job_e2e_rows_per_s']} rows/s), RUNNING phase "
        f"{fig['job_running_s']}s ({fig['job_running_rows_per_s']} rows/s)"
    )
    print(
        f"batch job, the shards alone (read, parse, predict, write, PUT; no process start, "
        f"TensorFlow import, fetch or model load): {fig['job_shards_s']}s "
        f"({fig['job_shards_rows_per_s']} rows/s)"
    )
    print(
        f"direct: model_server.py, one process, one connection, batches of {BATCH}: "
        f"{fig['direct_s']}s ({fig['direct_rows_per_s']} rows/s)"
    )
    print(
        f"ratio: shards {fig['shards_vs_direct']}x direct, RUNNING phase "
        f"{fig['running_vs_direct']}x direct, end to end {fig['e2e_vs_direct']}x direct"
    )
    for w, sc in scaling.items():
        print(
            f"max_workers {w}: end to end {sc['e2e_s']}s ({sc['e2e_speedup']}x of 1), RUNNING "
            f"{sc['running_s']}s, {sc['running_rows_per_s']} rows/s ({sc['running_speedup']}x "
            f"of 1) on {os.cpu_count()} cores"
        )
    print(json.dumps(fig))
    return 0


if __name__ == "__main__":
    sys.exit(main())
