"""Hyperparameter tuning end to end on the real platform: a tuning job's trials are training jobs
of their own on sandboxes, at most max_parallel_trials at a time; the median rule stops a trial
that is worse than the completed ones; the tuning job ends with the best trial's model and
registers it; cancelling a tuning job cancels its trials. Every server is deleted."""

from __future__ import annotations

import time
from pathlib import Path

from service.client import StackMLClient
from tests.e2e.conftest import job_spec, make_package, wait_resources_deleted, wait_state

# A known response surface: loss at step k is (log10(lr) + 1.5)^2 + 1/k, best at lr = 10^-1.5;
# argv[1]: seconds per step. Writes a model file so that the trial exports.
TRAINER = """
    import argparse, json, math, os, time
    p = argparse.ArgumentParser()
    p.add_argument("pause", type=float)
    p.add_argument("--lr", type=float, required=True)
    p.add_argument("--steps", type=int, default=8)
    a = p.parse_args()
    for k in range(1, a.steps + 1):
        time.sleep(a.pause)
        loss = (math.log10(a.lr) + 1.5) ** 2 + 1 / k
        print(json.dumps({"stackml_metric": 1, "step": k, "loss": loss}), flush=True)
    with open(os.path.join(os.environ["STACKML_MODEL_DIR"], "model.json"), "w") as fh:
        json.dump({"lr": a.lr}, fh)
"""
TERMINAL = {"SUCCEEDED", "FAILED", "CANCELLED"}
GRID = [0.1, 0.03, 1.0, 0.01, 0.3, 0.001]


def _package(client: StackMLClient, tmp_path: Path) -> str:
    root = make_package(tmp_path / "tune", {"tune": TRAINER})
    return str(client.stage_package(root)["package_uri"])


def test_six_trials_two_at_a_time_find_the_best_rate_and_stop_a_bad_one(
    client: StackMLClient, tmp_path: Path
) -> None:
    pkg = _package(client, tmp_path)
    spec = job_spec(pkg, "trainer.tune", name="e2e-tune")
    spec["trainer"]["args"] = ["0.4"]
    spec["hyperparameters"] = {"steps": 8}
    spec["output"] = {"register_as": "tuned"}
    spec["tuning"] = {
        "metric": "loss",
        "goal": "minimize",
        "algorithm": "grid",
        "parameters": [{"name": "lr", "type": "discrete", "values": GRID}],
        "max_trials": 6,
        "max_parallel_trials": 2,
        "early_stopping": {"rule": "median", "min_trials": 2, "min_steps": 2},
    }
    job = client.create_job(spec)
    assert job["state"] == "RUNNING"  # it boots nothing
    done = wait_state(client, job["id"], TERMINAL, timeout=240)
    assert done["state"] == "SUCCEEDED", done["failure"]
    assert done["resources"] == []

    block = done["tuning"]
    trials = block["trials"]
    assert [t["trial"] for t in trials] == [1, 2, 3, 4, 5, 6]
    assert [t["hyperparameters"]["lr"] for t in trials] == GRID  # grid order
    states = {t["trial"]: t["state"] for t in trials}
    assert "STOPPED" in states.values(), states  # the median rule stopped a bad trial
    assert states[2] == "SUCCEEDED"  # lr 0.03 is the best one, and it ran to the end
    best = block["best_trial"]
    assert best["hyperparameters"] == {"lr": 0.03} and best["trial"] == 2
    worst = max(t["value"] for t in trials if t["value"] is not None)
    assert best["value"] < worst
    assert abs(best["value"] - ((-1.5228787 + 1.5) ** 2 + 1 / 8)) < 1e-6
    # a stopped trial was stopped before its last step (its trainer may print a few more
    # lines before the cancel reaches it) and its job cancelled
    stops = {
        e["message"].split()[1]: int(e["message"].split(" at step ")[1].split(":")[0])
        for e in client.events(job["id"])["events"]
        if e["kind"] == "trial" and "stopped early at step" in e["message"]
    }
    for t in trials:
        if t["state"] == "STOPPED":
            assert stops[str(t["trial"])] < 8 and t["job_state"] == "CANCELLED", (t, stops)

    # the tuning job's model is the best trial's, registered with that trial as its source
    best_job = client.get_job(best["job_id"])
    assert best_job["parent_id"] == job["id"] and best_job["trial"] == 2
    assert best_job["spec"]["hyperparameters"] == {"steps": 8, "lr": 0.03}
    assert best_job["spec"]["tuning"] is None and best_job["spec"]["output"]["register_as"] is None
    assert done["output"]["model_uri"] == best_job["output"]["model_uri"]
    assert done["output"]["best_trial"] == 2
    # (a version of a file that is not a SavedModel: registered, then FAILED by its check)
    versions = client.list_versions("tuned")
    assert len(versions) == 1, versions
    assert versions[0]["source_job_id"] == best["job_id"]
    assert versions[0]["artifact_uri"] == best_job["output"]["model_uri"]

    # never more than two trials at once: each trial's life (submitted .. finished) overlaps
    # at most one other's
    lives = []
    for t in trials:
        j = client.get_job(t["job_id"])
        assert j["state"] in TERMINAL
        lives.append((j["created_at"], j["finished_at"]))
        wait_resources_deleted(client, t["job_id"])
    for start, _ in lives:
        assert sum(1 for s, e in lives if s <= start < e) <= 2, lives
    kinds = [e["message"] for e in client.events(job["id"])["events"] if e["kind"] == "trial"]
    assert sum("submitted" in m for m in kinds) == 6
    assert any("stopped early" in m for m in kinds), kinds


def test_cancelling_a_tuning_job_cancels_its_trials(client: StackMLClient, tmp_path: Path) -> None:
    pkg = _package(client, tmp_path)
    spec = job_spec(pkg, "trainer.tune", name="e2e-tune-cancel")
    spec["trainer"]["args"] = ["5"]
    spec["tuning"] = {
        "metric": "loss",
        "goal": "minimize",
        "algorithm": "random",
        "seed": 7,
        "parameters": [{"name": "lr", "type": "double", "min": 0.001, "max": 1, "scale": "log"}],
        "max_trials": 4,
        "max_parallel_trials": 2,
    }
    job = client.create_job(spec)
    deadline = time.monotonic() + 120
    while True:
        trials = client.get_job(job["id"])["tuning"]["trials"]
        if len(trials) == 2 and all(t["job_state"] == "RUNNING" for t in trials):
            break
        assert time.monotonic() < deadline, trials
        time.sleep(0.3)
    for t in trials:
        assert 0.001 <= t["hyperparameters"]["lr"] <= 1
    client.cancel_job(job["id"])
    assert wait_state(client, job["id"], TERMINAL, timeout=60)["state"] == "CANCELLED"
    for t in trials:
        assert wait_state(client, t["job_id"], TERMINAL, timeout=60)["state"] == "CANCELLED"
        wait_resources_deleted(client, t["job_id"])
    time.sleep(3)  # a pass of the tuning step after the cancel would submit trial 3
    assert len(client.get_job(job["id"])["tuning"]["trials"]) == 2
