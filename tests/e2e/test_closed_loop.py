"""The closed loop end to end on the real platform (API over HTTP, worker and beat, sandboxes
over SSH, TensorFlow), run by the same code as `stackml demo --loop` (service/loop_demo.py): a
weak first version of the example serves on an endpoint that logs every request; its
predictions are labelled with the known function's values by request id; a dataset is built
from them. Two schedules fire every minute and rebuild that dataset before their job: one
retrains the example well, one deliberately badly, each behind a gate on the rebuilt version's
holdout. The good candidate is promoted, the bad one refused `below_threshold`; the history
shows both; the endpoint, following `default`, switches to the promoted version under a steady
load with zero failed requests; each candidate was scored on an evaluator server of its own
job; a rollback moves the label back in one step; nothing is left running."""

from __future__ import annotations

from pathlib import Path

from service.backends.compute.sandbox import SandboxBackend, leak_report
from service.client import StackMLClient
from service.config import Settings
from service.loop_demo import PER_REQUEST, REQUESTS, THRESHOLD, closed_loop
from service.platform import LocalPlatform
from tests.e2e.conftest import wait_resources_deleted
from tests.e2e.test_serving import until


def test_schedules_retrain_on_feedback_and_the_gate_promotes_only_the_better(
    client: StackMLClient,
    platform: LocalPlatform,
    e2e_settings: Settings,
    runtime_python: Path,
) -> None:
    r = closed_loop(client, runtime_python, platform.url, print, "closed")
    assert r.live["rmse"] > THRESHOLD, r.live  # the champion is weak on its own traffic
    assert (r.live["logged"], r.live["labelled"], r.live["label_coverage"]) == (
        REQUESTS,
        REQUESTS,
        1.0,
    )
    m = r.manifest  # every labelled row, on the side of the split its request id picks
    assert (m["rows"], m["labelled"], m["versions"]) == (REQUESTS * PER_REQUEST, REQUESTS, [1])
    assert m["train_rows"] + m["holdout_rows"] == m["rows"] and m["holdout_rows"] > 0
    for name, run in r.runs.items():
        assert run["dataset_version"] >= 2, run  # each slot rebuilt the dataset first
        spec = client.get_job(r.jobs[name])["spec"]
        version = f"datasets/{r.dataset}/{run['dataset_version']}/"
        assert spec["inputs"]["data_uri"].endswith(version + "train/")
        assert spec["output"]["gate"]["holdout_uri"].endswith(version + "holdout/")
    good, bad = r.promoted["evaluation"], r.refused["evaluation"]
    assert good["decision"] == "promoted" and good["candidate_score"] < THRESHOLD, good
    assert good["champion_version"] == 1
    assert (bad["decision"], bad["reason"]) == ("refused", "below_threshold"), bad
    assert bad["candidate_score"] > THRESHOLD
    winner = int(r.promoted["version"])
    assert r.labels == {"default": winner}

    by_job = {h["by"]: h for h in r.history}
    assert (by_job[r.jobs["closed-good"]]["kind"], by_job[r.jobs["closed-good"]]["to_version"]) == (
        "move",
        winner,
    )
    assert by_job[r.jobs["closed-bad"]]["kind"] == "refusal"
    assert "below_threshold" in by_job[r.jobs["closed-bad"]]["why"]

    assert not r.failed, f"{len(r.failed)} of {len(r.answers)} failed, e.g. {r.failed[:3]}"
    assert set(r.versions) == {"1", str(winner)}, r.versions  # answers named their version
    assert r.answers[-1][1] == str(winner)
    for job_id in r.jobs.values():  # scored on a server of its own, not the trainer's
        roles = {x["role"] for x in client.get_job(job_id)["resources"]}
        assert roles == {"chief", "evaluator"}, roles
    events = client.events(r.jobs["closed-good"])["events"]
    assert any(
        e["kind"] == "evaluation" and e["message"].startswith("gate promoted:") for e in events
    ), events

    # rollback: the label back to v1 in one step, recorded
    back = client.rollback_label(r.model, why="the champion was fine")
    assert (back["from_version"], back["version"]) == (winner, 1)
    assert client.get_model(r.model)["labels"] == {"default": 1}
    assert client.model_history(r.model)["history"][-1]["kind"] == "rollback"

    client.undeploy(r.model, r.endpoint)
    for job_id in (r.first_job, *r.jobs.values()):
        wait_resources_deleted(client, job_id)
    backend = SandboxBackend(e2e_settings.sandbox_dir, e2e_settings.flavors())
    until(
        "the endpoint's replicas deleted",
        lambda: backend.list_servers(("stackml-endpoint", r.endpoint)) == [],
        120,
    )
    assert leak_report(e2e_settings.sandbox_dir) == []
