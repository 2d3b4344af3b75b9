"""restart_policy end to end on the real platform: the runner syncs STACKML_CHECKPOINT_DIR to the
store while the trainer runs; a trainer that exits with a status its policy retries, or whose
sandbox is killed, starts again on a new server with its checkpoints restored, and resumes
where the last synced checkpoint left it. A status the policy does not retry, or one more
failure than max_restarts allows, fails the job as before. Every server is deleted."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path
from typing import Any

from service.client import StackMLClient
from service.config import Settings
from tests.e2e.conftest import job_spec, make_package, wait_resources_deleted, wait_state

# Counts steps in the checkpoint directory (one weights file per step, the step number in
# `step`), starting from what is there; argv: mode, seconds per step.
#   preempt: exits 42 (TensorFlow's preemption status) after step 3, once
#   fail:    exits 3 after step 1, every time
#   slow:    six steps, argv[2] seconds each
TRAINER = """
    import json, os, sys, time
    ckpt, model = os.environ["STACKML_CHECKPOINT_DIR"], os.environ["STACKML_MODEL_DIR"]
    mode, pause = sys.argv[1], float(sys.argv[2])
    step_file = os.path.join(ckpt, "step")
    step = int(open(step_file).read()) if os.path.exists(step_file) else 0
    print("resumed at step", step, flush=True)
    os.makedirs(os.path.join(ckpt, "weights"), exist_ok=True)
    while step < 6:
        step += 1
        with open(os.path.join(ckpt, "weights", f"w-{step}.bin"), "wb") as fh:
            fh.write(bytes([step]) * 4096)
        with open(step_file + ".tmp", "w") as fh:
            fh.write(str(step))
        os.replace(step_file + ".tmp", step_file)
        print("step", step, flush=True)
        if mode == "fail":
            print("failing for good", flush=True)
            sys.exit(3)
        if mode == "preempt" and step == 3 and not os.path.exists(os.path.join(ckpt, "preempted")):
            open(os.path.join(ckpt, "preempted"), "w").close()
            print("preempted", flush=True)
            sys.exit(42)
        time.sleep(pause)
    with open(os.path.join(model, "done.json"), "w") as fh:
        json.dump({"step": step, "weights": sorted(os.listdir(os.path.join(ckpt, "weights")))}, fh)
"""
ALL_WEIGHTS = [f"w-{n}.bin" for n in range(1, 7)]


def _submit(client: StackMLClient, pkg: str, mode: str, pause: str, **extra: Any) -> str:
    spec = job_spec(pkg, "trainer.resume", **extra)
    spec["name"] = f"e2e-restart-{mode}"
    spec["trainer"]["args"] = [mode, pause]
    return str(client.create_job(spec)["id"])


def _restart_events(client: StackMLClient, job_id: str) -> list[str]:
    return [e["message"] for e in client.events(job_id)["events"] if e["kind"] == "restart"]


def _checkpoint_step(store: Any, prefix: str) -> int:
    body = store.get(prefix + "step") if store.info(prefix + "step") else b"0"
    return int(body or b"0")


def test_restart_policy_resumes_from_synced_checkpoints_on_a_new_server(
    client: StackMLClient, e2e_settings: Settings, tmp_path: Path
) -> None:
    from service.backends import registry

    pkg = client.stage_package(make_package(tmp_path / "resume", {"resume": TRAINER}))[
        "package_uri"
    ]
    store = registry.store()
    area = store.key_of(pkg).split("staging/", 1)[0]  # projects/<id>/
    preempt = _submit(client, pkg, "preempt", "0.2", restart_policy="ExitCode", max_restarts=2)
    not_retried = _submit(client, pkg, "fail", "0", restart_policy="ExitCode")
    used_up = _submit(client, pkg, "fail", "0", restart_policy="OnFailure", max_restarts=1)
    killed = _submit(client, pkg, "slow", "2", restart_policy="OnFailure")

    # the slow job's sandbox is killed once a checkpoint past step 1 is in the store
    prefix = f"{area}checkpoints/{killed}/"
    deadline = time.monotonic() + 120
    while (synced := _checkpoint_step(store, prefix)) < 2:
        job = client.get_job(killed)
        assert job["state"] in {"QUEUED", "ALLOCATING", "PROVISIONING", "RUNNING"}, job["failure"]
        assert time.monotonic() < deadline, f"no checkpoint synced in 120s: {job['state']}"
        time.sleep(0.2)
    running = client.get_job(killed)
    assert running["state"] == "RUNNING" and running["restarts"] == 0
    before = client.logs(killed)[0]
    server_id = [r for r in running["resources"] if r["server_id"]][-1]["server_id"]
    record = json.loads((e2e_settings.sandbox_dir / server_id / "server.json").read_text())
    os.kill(int(record["sshd_pid"]), signal.SIGKILL)

    done = wait_state(client, killed, {"SUCCEEDED", "FAILED"}, timeout=180)
    log = client.logs(killed)[0].decode()
    assert done["state"] == "SUCCEEDED", (done["failure"], log)
    assert done["restarts"] == 1
    assert log.startswith(before.decode())  # the first server's log is kept, the next follows
    resumed = [int(line.split()[-1]) for line in log.splitlines() if "resumed at step" in line]
    assert resumed[0] == 0 and len(resumed) == 2 and resumed[1] >= synced, (resumed, synced)
    assert "stackml-runner: restart 1: " in log
    (why,) = _restart_events(client, killed)
    assert why.startswith("restart 1 of 3 (OnFailure): ") and server_id in why, why
    model = store.key_of(done["output"]["model_uri"])
    assert json.loads(store.get(model + "done.json")) == {"step": 6, "weights": ALL_WEIGHTS}
    names = [r["name"] for r in done["resources"]]
    assert len(names) == 2 and names[1].endswith("-r1"), names
    assert _checkpoint_step(store, prefix) == 6  # the final sync, after the trainer exited

    done = wait_state(client, preempt, {"SUCCEEDED", "FAILED"}, timeout=120)
    log = client.logs(preempt)[0].decode()
    assert done["state"] == "SUCCEEDED", (done["failure"], log)
    assert (done["restarts"], log.count("preempted")) == (1, 1)
    assert [ln for ln in log.splitlines() if "resumed at step" in ln] == [
        "resumed at step 0",
        "resumed at step 3",
    ]
    (why,) = _restart_events(client, preempt)
    assert why.startswith("restart 1 of 2 (ExitCode): the trainer exited with status 42"), why
    model = store.key_of(done["output"]["model_uri"])
    assert json.loads(store.get(model + "done.json")) == {"step": 6, "weights": ALL_WEIGHTS}

    done = wait_state(client, not_retried, {"SUCCEEDED", "FAILED"}, timeout=120)
    assert (done["state"], done["failure"]["reason"], done["restarts"]) == (
        "FAILED",
        "trainer_exit_nonzero",
        0,
    )
    assert _restart_events(client, not_retried) == []

    done = wait_state(client, used_up, {"SUCCEEDED", "FAILED"}, timeout=120)
    assert (done["state"], done["failure"]["reason"], done["restarts"]) == (
        "FAILED",
        "trainer_exit_nonzero",
        1,
    )
    assert done["failure"]["message"].endswith("(restart_policy OnFailure: 1 restart used)")
    assert client.logs(used_up)[0].decode().count("failing for good") == 2
    for job_id in (killed, preempt, not_retried, used_up):
        wait_resources_deleted(client, job_id)
