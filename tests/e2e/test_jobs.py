"""The job lifecycle end to end over HTTP, with trivial trainers, and every fault of issue 2."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest

from service.client import APIError, StackMLClient
from service.config import Settings
from tests.e2e.conftest import job_spec, wait_resources_deleted, wait_state


def _server_dir(settings: Settings, job: dict) -> Path:
    server_id = job["resources"][0]["server_id"]
    return settings.sandbox_dir / server_id


def test_trivial_job_succeeds_and_exports_its_model(
    client: StackMLClient, trivial_package: str, e2e_settings: Settings
) -> None:
    spec = job_spec(
        trivial_package,
        "trainer.ok",
        labels={"suite": "e2e"},
        hyperparameters={"lr": 0.1},
        env={"GREETING": "hi"},
    )
    spec["trainer"]["args"] = ["--flag", "a b; rm -rf /"]
    job = client.create_job(spec)
    assert job["state"] == "QUEUED"
    done = wait_state(client, job["id"], {"SUCCEEDED", "FAILED"})
    assert done["state"] == "SUCCEEDED", done["failure"]
    uri = done["output"]["model_uri"]
    assert uri == f"local://projects/{done['project_id']}/models/{job['id']}/"
    keys = sorted(o["key"] for o in done["output"]["objects"])
    assert keys == ["assets/vocab.txt", "weights.txt"]
    model_dir = e2e_settings.store_dir / uri.split("://", 1)[1]
    assert (model_dir / "weights.txt").read_text() == "42\n"

    logs, _ = client.logs(job["id"])
    text = logs.decode()
    # args reach the trainer as quoted argv, hyperparameters as --name=value
    assert f"hello from {job['id']} args ['--flag', 'a b; rm -rf /', '--lr=0.1']" in text
    assert client.metrics(job["id"])["metrics"]["loss"][0]["value"] == 0.5
    states = [e["to"] for e in client.events(job["id"])["events"] if e["kind"] == "transition"]
    assert states == ["QUEUED", "ALLOCATING", "PROVISIONING", "RUNNING", "EXPORTING", "SUCCEEDED"]
    wait_resources_deleted(client, job["id"])


def test_trainer_exit_nonzero_fails_in_train_with_log_tail(
    client: StackMLClient, trivial_package: str
) -> None:
    job = client.create_job(job_spec(trivial_package, "trainer.fail"))
    done = wait_state(client, job["id"], {"SUCCEEDED", "FAILED"})
    assert done["state"] == "FAILED"
    assert done["failure"]["phase"] == "train"
    assert done["failure"]["reason"] == "trainer_exit_nonzero"
    assert "status 3" in done["failure"]["message"]
    assert "something went badly wrong" in done["failure"]["message"]
    assert "line 29" in done["failure"]["message"]
    wait_resources_deleted(client, job["id"])


def test_trainer_that_writes_no_model_fails_in_export(
    client: StackMLClient, trivial_package: str
) -> None:
    job = client.create_job(job_spec(trivial_package, "trainer.nomodel"))
    done = wait_state(client, job["id"], {"SUCCEEDED", "FAILED"})
    assert (done["state"], done["failure"]["phase"], done["failure"]["reason"]) == (
        "FAILED",
        "export",
        "no_model",
    )
    wait_resources_deleted(client, job["id"])


def test_missing_module_fails_with_the_python_error_in_the_message(
    client: StackMLClient, trivial_package: str
) -> None:
    job = client.create_job(job_spec(trivial_package, "trainer.does_not_exist"))
    done = wait_state(client, job["id"], {"SUCCEEDED", "FAILED"})
    assert done["failure"]["reason"] == "trainer_exit_nonzero"
    assert "No module named trainer.does_not_exist" in done["failure"]["message"]


def test_max_runtime_exceeded_fails_with_timeout_and_frees_the_server(
    client: StackMLClient, trivial_package: str
) -> None:
    spec = job_spec(trivial_package, "trainer.sleep", max_runtime_seconds=2)
    spec["trainer"]["args"] = ["60"]
    job = client.create_job(spec)
    done = wait_state(client, job["id"], {"SUCCEEDED", "FAILED"}, timeout=60)
    assert (done["state"], done["failure"]["phase"], done["failure"]["reason"]) == (
        "FAILED",
        "train",
        "timeout",
    )
    wait_resources_deleted(client, job["id"])


@pytest.mark.parametrize("when", ["QUEUED", "RUNNING"])
def test_cancel_in_a_non_terminal_state_removes_the_server(
    client: StackMLClient, trivial_package: str, e2e_settings: Settings, when: str
) -> None:
    spec = job_spec(trivial_package, "trainer.sleep")
    spec["trainer"]["args"] = ["60"]
    job = client.create_job(spec)
    if when == "RUNNING":
        running = wait_state(client, job["id"], {"RUNNING"})
        server_dir = _server_dir(e2e_settings, running)
        assert server_dir.exists()
    client.cancel_job(job["id"])
    done = wait_state(client, job["id"], {"CANCELLED", "FAILED", "SUCCEEDED"}, timeout=60)
    assert done["state"] == "CANCELLED"
    if done["resources"]:
        wait_resources_deleted(client, job["id"])
    if when == "RUNNING":
        assert not server_dir.exists()
    with pytest.raises(APIError) as err:
        client.cancel_job(job["id"])
    assert err.value.status == 409


def test_sandbox_killed_mid_training_fails_with_server_lost(
    client: StackMLClient, trivial_package: str, e2e_settings: Settings
) -> None:
    spec = job_spec(trivial_package, "trainer.sleep")
    spec["trainer"]["args"] = ["60"]
    job = client.create_job(spec)
    running = wait_state(client, job["id"], {"RUNNING"})
    server = json.loads((_server_dir(e2e_settings, running) / "server.json").read_text())
    pid = int(server["sshd_pid"])
    os.kill(pid, signal.SIGKILL)  # the VM dies under the job
    t0 = time.monotonic()
    done = wait_state(client, job["id"], {"SUCCEEDED", "FAILED"}, timeout=60)
    assert (done["state"], done["failure"]["phase"], done["failure"]["reason"]) == (
        "FAILED",
        "train",
        "server_lost",
    )
    assert time.monotonic() - t0 < 30
    wait_resources_deleted(client, job["id"])


def test_invalid_spec_is_rejected_and_creates_nothing(
    client: StackMLClient, trivial_package: str
) -> None:
    before = len(client.list_jobs(limit=200)["jobs"])
    bad = job_spec(
        trivial_package, "trainer.ok", runtime={"framework": "tensorflow", "version": "1.0"}
    )
    with pytest.raises(APIError) as err:
        client.create_job(bad)
    assert err.value.status == 422
    with pytest.raises(APIError) as err:
        client.create_job(job_spec(trivial_package, "trainer.ok; rm -rf /"))
    assert err.value.status == 422
    assert len(client.list_jobs(limit=200)["jobs"]) == before
    with pytest.raises(APIError) as err:
        client.get_job("job-doesnotexist")
    assert err.value.status == 404
