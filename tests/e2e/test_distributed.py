"""Distributed training end to end: the example trainer on two sandboxes (`resources.workers`
2) under MultiWorkerMirroredStrategy, each replica with the TF_CONFIG the platform wrote, the
two connected on the TensorFlow port over their job's own bridge. The chief's model is
exported and predicts the known function; the worker replica's log is its own
(`?replica=worker-1`). With restart_policy OnFailure, the loss of the
worker replica's sandbox mid-training restarts both replicas on new servers, from the
checkpoint the chief synced to the store, and the job succeeds; no server is left."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from service.client import StackMLClient
from service.config import Settings
from tests.e2e.conftest import wait_resources_deleted, wait_state
from tests.e2e.test_tensorflow import EXAMPLE, assert_learned_the_known_function, evaluate_model

TF_QUIET = {"TF_ENABLE_ONEDNN_OPTS": "0", "TF_CPP_MIN_LOG_LEVEL": "2"}


def _events(client: StackMLClient, job_id: str) -> list[dict[str, Any]]:
    return list(client.events(job_id)["events"])


def _story(client: StackMLClient, job: dict[str, Any]) -> str:
    """The job's timeline and the tails of both replicas' logs (for a failure's message)."""
    events = "\n".join(
        f"{e['at']} {e['kind']} {e['from']}->{e['to']} {e['message']}"
        for e in _events(client, job["id"])
    )
    chief = client.logs(job["id"])[0].decode()[-2000:]
    worker = client.logs(job["id"], replica="worker-1")[0].decode()[-2000:]
    return f"events:\n{events}\nchief:\n{chief}\nworker-1:\n{worker}"


def _kill_then_wait(
    client: StackMLClient, settings: Settings, job: dict[str, Any], server_id: str, timeout: float
) -> dict[str, Any]:
    """SIGKILL the sandbox of `server_id` (its sshd, the sandbox's first process), then the job
    once it SUCCEEDED or FAILED (its timeline in the message when it does not in `timeout`)."""
    record = json.loads((settings.sandbox_dir / server_id / "server.json").read_text())
    os.kill(int(record["sshd_pid"]), signal.SIGKILL)
    try:
        return wait_state(client, job["id"], {"SUCCEEDED", "FAILED"}, timeout=timeout)
    except AssertionError as e:
        raise AssertionError(f"{e}\n{_story(client, job)}") from e


# its own deadlines (300 s to the first synced checkpoint, 400 s from the kill to the end)
# come first, so that a job that stalls fails with its timeline, not with a stack dump
@pytest.mark.timeout(800)
def test_two_replicas_train_under_mwms_and_a_lost_one_restarts_the_cluster_from_the_checkpoint(
    client: StackMLClient, e2e_settings: Settings, runtime_python: Path
) -> None:
    from service.backends import registry

    pkg = client.stage_package(EXAMPLE)["package_uri"]
    epochs = 12
    job = client.create_job(
        {
            "name": "e2e-distributed-failover",
            "trainer": {"package_uri": pkg, "module": "trainer.task"},
            "hyperparameters": {"epochs": epochs, "rows": 4000},
            "resources": {"workers": 2},
            "env": TF_QUIET,
            "restart_policy": "OnFailure",
            "max_restarts": 1,
            "max_runtime_seconds": 900,
        }
    )
    store = registry.store()
    area = store.key_of(pkg).split("staging/", 1)[0]
    index_key = f"{area}checkpoints/{job['id']}/checkpoint"  # tf.train.CheckpointManager's

    def synced_epoch() -> int:  # its `ckpt-N` is the N-th save: one per epoch
        if store.info(index_key) is None:
            return 0
        first = store.get(index_key).decode().splitlines()[0]  # model_checkpoint_path: "ckpt-N"
        return int(first.rsplit("-", 1)[-1].rstrip('"'))

    deadline = time.monotonic() + 300
    while (synced := synced_epoch()) < 2:  # the chief's checkpoint of epoch 2 is in the store
        now = client.get_job(job["id"])
        assert now["state"] in {"QUEUED", "ALLOCATING", "PROVISIONING", "RUNNING"}, (
            now["failure"],
            client.logs(job["id"])[0].decode()[-3000:],
        )
        assert time.monotonic() < deadline, ("no checkpoint synced in 300s", _story(client, job))
        time.sleep(0.3)
    now = client.get_job(job["id"])
    roles = [(r["role"], r["name"].rsplit("-", 2)[-2:]) for r in now["resources"]]
    assert roles == [("chief", ["chief", "0"]), ("worker", ["worker", "1"])], now["resources"]
    worker = next(r for r in now["resources"] if r["role"] == "worker")
    done = _kill_then_wait(client, e2e_settings, job, worker["server_id"], 400)
    log = client.logs(job["id"])[0].decode()
    assert done["state"] == "SUCCEEDED", (done["failure"], log[-3000:])
    assert done["restarts"] == 1
    (why,) = [e["message"] for e in _events(client, job["id"]) if e["kind"] == "restart"]
    assert "replica worker-1" in why and worker["server_id"] in why, why
    resumed = [ln for ln in log.splitlines() if ln.startswith("trainer: resuming from")]
    assert len(resumed) == 1 and int(resumed[0].rsplit(" ", 1)[-1]) >= synced, (resumed, synced)
    # the job's log is the chief's: it ran as the cluster's chief, both replicas in sync, twice
    chief_line = "trainer: replica chief:0 of 2 (MultiWorkerMirroredStrategy, 2 replicas in sync)"
    assert log.count(chief_line) == 2, log[-3000:]
    finished = [e["message"] for e in _events(client, job["id"]) if e["kind"] == "poll"]
    # (its last line: its `done` line, or a warning TensorFlow writes to stderr at exit)
    assert any(m.startswith("replica worker-1 exited 0: ") for m in finished), finished
    loss = client.metrics(job["id"])["metrics"]["loss"]  # resumed epochs are reported again
    assert sorted({p["epoch"] for p in loss}) == list(range(1, epochs + 1)), loss
    assert loss[-1]["value"] < loss[0]["value"] / 2, loss
    worker_log = client.logs(job["id"], replica="worker-1")[0].decode()  # its runs, one log
    worker_line = "trainer: replica worker:0 of 2 (MultiWorkerMirroredStrategy, 2 replicas in sync)"
    assert worker_log.count(worker_line) == 2, worker_log[-3000:]
    assert "(not the chief)" in worker_log and "Epoch 1/" not in worker_log, worker_log[-3000:]
    assert worker_log.count("trainer: resuming from") == 1, worker_log[-3000:]
    # the worker's metrics and events are its own
    # (what it printed after its last pull before its sandbox was killed went with it)
    worker_loss = client.metrics(job["id"], replica="worker-1")["metrics"]["loss"]
    after = int(resumed[0].rsplit(" ", 1)[-1])
    seen = {p["epoch"] for p in worker_loss}
    assert 1 in seen and set(range(after + 1, epochs + 1)) <= seen, worker_loss
    worker_events = client.events(job["id"], replica="worker-1")["events"]
    assert worker_events and all(e["replica"] == "worker-1" for e in worker_events)
    assert any("exited 0" in e["message"] for e in worker_events), worker_events
    names = [r["name"] for r in done["resources"]]
    assert len(names) == 4 and names[2].endswith("-chief-0-r1"), names
    assert names[3].endswith("-r1-worker-1"), names
    model_dir = e2e_settings.store_dir / done["output"]["model_uri"].split("://", 1)[1]
    assert_learned_the_known_function(evaluate_model(runtime_python, model_dir))
    wait_resources_deleted(client, job["id"])


# The chief prints numbered lines and keeps the last number in its checkpoint directory; the
# other replicas say so and wait (a worker replica, or ParameterServerStrategy's shape without
# TensorFlow: workers and a parameter server serving until the job ends). On the restart all
# find the restored mark: the chief says where it resumes and exports, the others exit 0.
NUMBERED = """
    import os, sys, time
    mark = os.path.join(os.environ["STACKML_CHECKPOINT_DIR"], "printed")
    if os.path.exists(mark):
        if os.environ["STACKML_REPLICA"] == "chief":
            print("resumed after line", open(mark).read(), flush=True)
            open(os.path.join(os.environ["STACKML_MODEL_DIR"], "m"), "w").write("1")
        sys.exit(0)
    if os.environ["STACKML_REPLICA"] != "chief":
        print("serving", flush=True)
        time.sleep(600)
    for i in range(100000):
        print(f"line {i}", flush=True)
        with open(mark + ".tmp", "w") as fh:
            fh.write(str(i))
        os.replace(mark + ".tmp", mark)
        time.sleep(0.02)
"""


def test_a_lost_replica_costs_none_of_the_chiefs_lines_its_checkpoint_kept(
    client: StackMLClient, e2e_settings: Settings, tmp_path: Path
) -> None:
    """When another replica is lost, the chief is stopped and the rest of its log read before
    its server goes: the job's log holds every line the chief printed, and the restart resumes
    from the checkpoint it wrote last (the runner's final sync, which runs before it writes the
    exit status the drain waits for), not from an older one. (This trainer rewrites its
    checkpoint every 20 ms, so the periodic sync, which waits for a quiet directory, never
    uploads it: without the stop and its final sync the restart would find no checkpoint.)"""
    from tests.e2e.conftest import job_spec, make_package

    pkg = client.stage_package(make_package(tmp_path / "numbered", {"numbered": NUMBERED}))
    spec = job_spec(pkg["package_uri"], "trainer.numbered", name="e2e-distributed-drain")
    spec.update({"resources": {"workers": 2}, "restart_policy": "OnFailure", "max_restarts": 1})
    job = client.create_job(spec)
    deadline = time.monotonic() + 120
    while client.logs(job["id"])[0].count(b"line ") < 60:
        now = client.get_job(job["id"])
        assert now["state"] in {"QUEUED", "ALLOCATING", "PROVISIONING", "RUNNING"}, now["failure"]
        assert time.monotonic() < deadline, _story(client, job)
        time.sleep(0.2)
    worker = next(r for r in client.get_job(job["id"])["resources"] if r["role"] == "worker")
    done = _kill_then_wait(client, e2e_settings, job, worker["server_id"], 180)
    log = client.logs(job["id"])[0].decode()
    assert done["state"] == "SUCCEEDED" and done["restarts"] == 1, (
        done["failure"],
        _story(client, job),
    )
    numbers = [int(ln.split()[1]) for ln in log.splitlines() if ln.startswith("line ")]
    assert numbers == list(range(len(numbers))), "the chief's lines are not contiguous"
    (resumed,) = [ln for ln in log.splitlines() if ln.startswith("resumed after line ")]
    # every line the chief printed is in the log, and the restart resumed from the mark it
    # wrote last (its runner's final sync, once stopped): the mark follows its line
    assert numbers[-1] - 1 <= int(resumed.rsplit(" ", 1)[-1]) <= numbers[-1], (resumed, numbers)
    wait_resources_deleted(client, job["id"])


# its own deadlines come first, as above
@pytest.mark.timeout(800)
def test_one_ps_two_workers_train_under_pss_and_a_lost_worker_is_replaced_alone(
    client: StackMLClient, e2e_settings: Settings, runtime_python: Path
) -> None:
    """ParameterServerStrategy (`resources.workers` 3, `parameter_servers` 1): the chief
    coordinates, worker-1 and worker-2 compute, ps-0 holds the variables, and a side-car
    evaluator (`resources.evaluator`) evaluates the chief's checkpoints as they come. worker-1's
    sandbox killed mid-training is replaced alone at the same peer address: the job neither
    restarts nor resumes, every epoch is trained once, and the model learns the known
    function; the evaluator saw it get better."""
    pkg = client.stage_package(EXAMPLE)["package_uri"]
    epochs = 30
    job = client.create_job(
        {
            "name": "e2e-parameter-servers",
            "trainer": {"package_uri": pkg, "module": "trainer.task"},
            # asynchronous updates: under Adam at the example's 0.01 the weights jitter around
            # the optimum by enough that an evaluation late in training can be worse than the
            # first epoch's (seen in CI: 0.19 after epoch 1, 0.23 after the last)
            "hyperparameters": {
                "epochs": epochs,
                "rows": 4000,
                "batch_size": 32,
                "learning_rate": 0.003,
            },
            "resources": {"workers": 3, "parameter_servers": 1, "evaluator": True},
            "env": TF_QUIET,
            "restart_policy": "OnFailure",
            "max_restarts": 1,
            "max_runtime_seconds": 900,
        }
    )
    deadline = time.monotonic() + 300
    while len(client.metrics(job["id"])["metrics"].get("loss") or []) < 2:  # two epochs done
        now = client.get_job(job["id"])
        assert now["state"] in {"QUEUED", "ALLOCATING", "PROVISIONING", "RUNNING"}, _story(
            client, job
        )
        assert time.monotonic() < deadline, ("no epoch trained in 300s", _story(client, job))
        time.sleep(0.3)
    now = client.get_job(job["id"])
    roles = [(r["role"], r["name"].rsplit("-", 2)[-2:]) for r in now["resources"]]
    assert roles == [
        ("chief", ["chief", "0"]),
        ("worker", ["worker", "1"]),
        ("worker", ["worker", "2"]),
        ("ps", ["ps", "0"]),
        ("tf-evaluator", ["evaluator", "0"]),
    ], now["resources"]
    lost = now["resources"][1]
    record = json.loads((e2e_settings.sandbox_dir / lost["server_id"] / "server.json").read_text())
    address = record["network"]["peer_address"]
    done = _kill_then_wait(client, e2e_settings, job, lost["server_id"], 400)
    log = client.logs(job["id"])[0].decode()
    assert done["state"] == "SUCCEEDED", (done["failure"], _story(client, job))
    assert done["restarts"] == 0, _story(client, job)
    chief_line = (  # (the evaluator is not in the chief's cluster)
        "trainer: replica chief:0 of 4 (ParameterServerStrategy, 2 workers, 1 parameter servers)"
    )
    assert log.count(chief_line) == 1 and "resuming from" not in log, log[-3000:]
    loss = client.metrics(job["id"])["metrics"]["loss"]
    assert [p["epoch"] for p in loss] == list(range(1, epochs + 1)), loss
    assert loss[-1]["value"] < loss[0]["value"] / 2, loss
    replaced = [e["message"] for e in _events(client, job["id"]) if e["kind"] == "replace"]
    assert len(replaced) == 2, _story(client, job)
    assert replaced[0].startswith("replacing replica worker-1 alone"), replaced
    assert lost["server_id"] in replaced[0], replaced
    new = next(r for r in done["resources"] if r["name"].endswith("-x1-worker-1"))
    assert replaced[1] == (
        f"replica worker-1 replaced: server {new['server_id']} started at {address}"
    ), replaced
    assert [r["name"] for r in done["resources"]].count(lost["name"]) == 1
    finished = [e["message"] for e in _events(client, job["id"]) if e["kind"] == "poll"]
    for who in ("worker-2", "ps-0"):
        assert f"replica {who} served the cluster until the chief finished" in finished, finished
    # (it may have evaluated the last epoch's checkpoint, synced while the chief exported, and
    # exited before the poll saw the chief's exit: then the job had nothing to wait for)
    assert any("evaluator exited 0" in m for m in finished), finished
    worker_log = client.logs(job["id"], replica="worker-1")[0].decode()
    assert "(ParameterServerStrategy, 2 workers, 1 parameter servers): serving the cluster" in (
        worker_log
    ), worker_log[-3000:]
    ps_log = client.logs(job["id"], replica="ps-0")[0].decode()
    assert "trainer: replica ps:0 of 4" in ps_log, ps_log[-3000:]
    # the evaluator got the chief's checkpoints one after the other and saw the model improve
    evaluated = client.metrics(job["id"], replica="evaluator")["metrics"]["eval_loss"]
    seen = [p["epoch"] for p in evaluated]
    assert len(seen) >= 2 and seen == sorted(set(seen)), _story(client, job)
    # the job waited for the evaluation of the final checkpoint, the model it exported
    assert seen[-1] == epochs, (seen, _story(client, job))
    assert evaluated[-1]["value"] < evaluated[0]["value"], evaluated
    evaluator_log = client.logs(job["id"], replica="evaluator")[0].decode()
    assert "trainer: side-car evaluator on 1000 rows" in evaluator_log, evaluator_log[-3000:]
    assert f"Evaluation after epoch {seen[-1]}: loss: " in evaluator_log, evaluator_log[-3000:]
    model_dir = e2e_settings.store_dir / done["output"]["model_uri"].split("://", 1)[1]
    assert_learned_the_known_function(evaluate_model(runtime_python, model_dir))
    wait_resources_deleted(client, job["id"])


def test_a_lost_parameter_server_restarts_the_cluster_from_the_checkpoint(
    client: StackMLClient, e2e_settings: Settings, tmp_path: Path
) -> None:
    """A parameter server holds the variables: losing one ends the run (unlike a worker), and
    with a restart policy every replica starts again on a new server, the chief from its last
    checkpoint, every line it printed kept."""
    from tests.e2e.conftest import job_spec, make_package

    pkg = client.stage_package(make_package(tmp_path / "numbered", {"numbered": NUMBERED}))
    spec = job_spec(pkg["package_uri"], "trainer.numbered", name="e2e-ps-lost")
    spec.update(
        {
            "resources": {"workers": 2, "parameter_servers": 1},
            "restart_policy": "OnFailure",
            "max_restarts": 1,
        }
    )
    job = client.create_job(spec)
    deadline = time.monotonic() + 120
    while client.logs(job["id"])[0].count(b"line ") < 40:
        now = client.get_job(job["id"])
        assert now["state"] in {"QUEUED", "ALLOCATING", "PROVISIONING", "RUNNING"}, now["failure"]
        assert time.monotonic() < deadline, _story(client, job)
        time.sleep(0.2)
    ps = next(r for r in client.get_job(job["id"])["resources"] if r["role"] == "ps")
    assert ps["name"].endswith("-ps-0"), ps
    done = _kill_then_wait(client, e2e_settings, job, ps["server_id"], 180)
    assert done["state"] == "SUCCEEDED" and done["restarts"] == 1, (
        done["failure"],
        _story(client, job),
    )
    events = _events(client, job["id"])
    assert not [e for e in events if e["kind"] == "replace"], events  # never replaced alone
    (why,) = [e["message"] for e in events if e["kind"] == "restart"]
    assert "replica ps-0" in why and ps["server_id"] in why, why
    log = client.logs(job["id"])[0].decode()
    numbers = [int(ln.split()[1]) for ln in log.splitlines() if ln.startswith("line ")]
    assert numbers == list(range(len(numbers))), "the chief's lines are not contiguous"
    (resumed,) = [ln for ln in log.splitlines() if ln.startswith("resumed after line ")]
    assert numbers[-1] - 1 <= int(resumed.rsplit(" ", 1)[-1]) <= numbers[-1], (resumed, numbers)
    ps_log = client.logs(job["id"], replica="ps-0")[0].decode()
    assert ps_log.startswith("serving"), ps_log  # its own log (its second run may be unread)
    wait_resources_deleted(client, job["id"])
