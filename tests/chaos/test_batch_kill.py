"""A batch prediction job's predictors SIGKILLed on its servers mid-run, and the worker SIGKILLed
at the same moment, on one server and spread over two (max_workers 2): each runner starts its
predictor again, which computes only the shards missing from the store (the job's log names
each shard the first server computed: none twice; every shard object in the store at the kill
is the same file afterwards, never written again), and the job SUCCEEDS with every row
predicted, in order, on as many servers as it asked for."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from service.backends import registry
from service.client import StackMLClient
from service.config import Settings
from service.platform import LocalPlatform
from service.runtime import ensure_runtime
from tests.chaos.conftest import record_fault, wait_clean


def _shard_line(ln: str) -> bool:
    """A line the predictor logs for each shard it computed."""
    return ln.startswith("batch") and " shard " in ln and ln.rstrip().endswith("rows/s")


BUILDER = Path(__file__).resolve().parents[1] / "integration" / "savedmodels.py"
ROWS, SHARD_ROWS, N = 3000, 100, 20


def _predictors(job_id: str) -> list[int]:
    """Pids of the job's batch predictor (its environment names the job)."""
    out = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
            env = Path(f"/proc/{pid}/environ").read_bytes()
        except OSError:
            continue
        if b"batch_predictor.py" in cmd and f"STACKML_JOB_ID={job_id}".encode() in env:
            out.append(int(pid))
    return out


@pytest.mark.parametrize("workers", [1, 2])
def test_predictor_and_worker_killed_mid_run_compute_no_shard_twice(
    chaos_platform: LocalPlatform,
    chaos_settings: Settings,
    client: StackMLClient,
    tmp_path: Path,
    workers: int,
) -> None:
    python = ensure_runtime(chaos_settings, chaos_settings.default_runtime, echo=print)
    r = subprocess.run(
        [str(python), str(BUILDER), str(tmp_path)], capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 0, r.stderr[-3000:]
    store = registry.store(chaos_settings)
    area = store.project_prefix("local")
    model = f"chaos-lin-{workers}"
    src = tmp_path / "linear" / "1"
    for path in sorted(src.rglob("*")):
        if path.is_file():
            store.put(f"{area}models/{model}/{path.relative_to(src).as_posix()}", path.read_bytes())
    client.create_model(model)
    client.create_version(model, artifact_uri=store.uri(f"{area}models/{model}/"))
    assert client.wait_version(model, 1, timeout=120)["state"] == "READY"
    rows = [[((i * 7 + j) % 13) / 13.0 for j in range(N)] for i in range(ROWS)]
    store.put(f"{area}chaos/rows.jsonl", "".join(json.dumps(x) + "\n" for x in rows).encode())
    out = f"{area}chaos/out-{workers}/"
    job = client.predict_batch(
        model,
        [store.uri(f"{area}chaos/rows.jsonl")],
        store.uri(out),
        batch_size=1,
        shard_rows=SHARD_ROWS,
        max_workers=workers,
    )

    def results() -> list[str]:
        return [o.key for o in store.list(out) if "prediction.results-" in o.key]

    deadline = time.monotonic() + 180
    while len(results()) < 3:
        assert time.monotonic() < deadline, client.get_job(job["id"])
        assert client.get_job(job["id"])["state"] not in ("SUCCEEDED", "FAILED")
        time.sleep(0.01)
    pids = _predictors(job["id"])
    assert len(pids) >= workers, f"the job's {workers} batch predictors are not running: {pids}"
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    chaos_platform.kill_worker()
    before = len(results())
    # every shard object in the store now: never written again
    at_kill = {k: os.stat(chaos_settings.store_dir / k).st_mtime_ns for k in results()}
    t0 = time.monotonic()
    chaos_platform.restart_worker()
    done = wait_clean(client, job["id"], timeout=180)
    record_fault(
        f"batch predictors ({workers} servers) + worker SIGKILL mid-run",
        done,
        time.monotonic() - t0,
    )
    assert done["state"] == "SUCCEEDED", done["failure"]
    rec = done["output"]["prediction"]
    assert (rec["rows"], rec["errors"], rec["shards"]) == (ROWS, 0, ROWS // SHARD_ROWS)
    log = client.logs(done["id"])[0].decode(errors="replace")
    assert "restarting the batch predictor" in log
    computed = [ln.split("shard ")[1].split(":")[0] for ln in log.splitlines() if _shard_line(ln)]
    assert computed and len(computed) == len(set(computed)), computed  # none computed twice
    assert {k: os.stat(chaos_settings.store_dir / k).st_mtime_ns for k in at_kill} == at_kill
    if workers == 1:
        resumed = [ln for ln in log.splitlines() if "shard(s) done before" in ln]
        assert resumed and int(resumed[-1].split()[1]) >= before, resumed
    manifest = json.loads(store.get(out + "manifest.json"))
    got = []
    for sh in manifest["shards"]:
        got += [json.loads(x) for x in store.get(out + sh["results"]).splitlines()]
    assert [g["index"] for g in got] == list(range(ROWS))
    servers = [r for r in done["resources"] if r["server_id"]]
    # one server per worker: the job did not run twice
    assert len(servers) == workers, done["resources"]
