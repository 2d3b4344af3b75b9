"""SIGKILL the worker while it scores a gate's evaluation (the evaluator's server booted, the
evaluator about to run), start a new one: the evaluation's lease lapses, the reconciler re-drives
it, it scores on the same server (never a second one), decides once (one history row, the label
moved once) and the evaluator's server is deleted with the job's."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path
from typing import Any

from service.client import StackMLClient
from service.config import REPO_ROOT, Settings
from service.platform import LocalPlatform
from service.runtime import ensure_runtime
from tests.chaos.conftest import wait_clean, wait_state

EXAMPLE = REPO_ROOT / "examples" / "keras_regression"
MODEL = "chaos-gated"
HOLDOUT_ROWS = 400

# Noise-free points of the function the example learns, written by the runtime's numpy.
HOLDOUT = f"""
import sys
sys.path.insert(0, {str(EXAMPLE)!r})
import numpy as np
from trainer.task import N_FEATURES, target
x = np.random.default_rng(4242).normal(size=({HOLDOUT_ROWS}, N_FEATURES)).astype("float32")
np.savetxt(sys.stdout, np.hstack([x, target(x)]), delimiter=",", fmt="%.6f")
"""


def _holdout(runtime_python: Path) -> str:
    from service.backends import registry

    out = subprocess.run(
        [str(runtime_python), "-c", HOLDOUT], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    store = registry.store()
    key = "projects/local/data/chaos-gate-holdout/"
    store.put(key + "part-0.csv", out.stdout.encode())
    return store.uri(key)


def _version(client: StackMLClient) -> dict[str, Any]:
    return client.get_version(MODEL, 1)


def test_worker_killed_while_it_scores_an_evaluation(
    chaos_platform: LocalPlatform, client: StackMLClient, chaos_settings: Settings
) -> None:
    runtime_python: Path = ensure_runtime(chaos_settings, chaos_settings.default_runtime)
    holdout = _holdout(runtime_python)
    pkg = client.stage_package(EXAMPLE)["package_uri"]
    chaos_platform.restart_worker({"STACKML_CHAOS_PAUSE": "evaluate:60"})
    try:
        job = client.create_job(
            {
                "name": "chaos-gate",
                "trainer": {"package_uri": pkg, "module": "trainer.task"},
                "hyperparameters": {"epochs": 2},
                "env": {"TF_ENABLE_ONEDNN_OPTS": "0", "TF_CPP_MIN_LOG_LEVEL": "2"},
                "output": {
                    "register_as": MODEL,
                    "gate": {"metric": "rmse", "threshold": 1.5, "holdout_uri": holdout},
                },
                "max_runtime_seconds": 600,
            }
        )
        done = wait_state(client, job["id"], {"SUCCEEDED", "FAILED"}, timeout=600)
        assert done["state"] == "SUCCEEDED", done["failure"]
        deadline = time.monotonic() + 300
        while (_version(client).get("evaluation") or {}).get("state") != "SCORING":
            assert time.monotonic() < deadline, _version(client)
            time.sleep(0.2)
        time.sleep(2.0)  # the scoring run holds the evaluation's lease, paused
        chaos_platform.kill_worker()
    finally:
        chaos_platform.restart_worker()
    deadline = time.monotonic() + 300
    while (ev := _version(client).get("evaluation") or {}).get("state") != "DONE":
        assert time.monotonic() < deadline, ev
        time.sleep(0.5)
    assert (ev["decision"], ev["reason"]) == ("promoted", None), ev
    assert client.get_model(MODEL)["labels"] == {"default": 1}
    hist = client.model_history(MODEL)["history"]
    assert [(h["from_version"], h["to_version"], h["by"]) for h in hist] == [(None, 1, job["id"])]
    clean = wait_clean(client, job["id"], timeout=120)
    roles = sorted(r["role"] for r in clean["resources"])
    assert roles == ["chief", "evaluator"]  # one evaluator server, not a second after the kill
    events = [e for e in client.events(job["id"])["events"] if e["kind"] == "evaluation"]
    assert sum(e["message"].startswith("gate ") for e in events) == 1
