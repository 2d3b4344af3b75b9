"""The trainer contract's directories, end to end on the real platform: `inputs.data_uri` (files
staged in the local store, nested and binary) arrives byte for byte in STACKML_INPUT_DIR, and
STACKML_CHECKPOINT_DIR keeps what the trainer wrote there across the restart the platform does
during a job (its worker SIGKILLed mid-training and started again; a new worker resumes
polling): the trainer is not started twice, its checkpoints stay, and the run completes.

With restart_policy Never (the default, as here) a trainer that exits non-zero fails the job
and a lost server fails it with server_lost; restarts on a new server, with the checkpoints
synced to the store and restored, are test_restarts.py's."""

from __future__ import annotations

import hashlib
import json
import secrets
import time
from pathlib import Path

from service.client import StackMLClient
from service.platform import LocalPlatform
from tests.e2e.conftest import job_spec, make_package, wait_resources_deleted, wait_state

INPUTS = {
    "train.csv": b"x,y\n1,2\n3,4\n",
    "nested/deeper/weights.bin": bytes(range(256)) * 64 + secrets.token_bytes(1000),
    "notes with spaces.txt": "façade, naïve\n".encode(),
}
# Checks its inputs against the digests given as argv[1], counts its starts in the checkpoint
# directory, writes checkpoint 1, trains argv[2] seconds (the test kills and restarts the worker
# meanwhile), checks checkpoint 1 is still there, writes checkpoint 2 and reports what it saw.
TRAINER = """
    import hashlib, json, os, sys, time
    inp, ckpt, model = (os.environ[k] for k in
                        ("STACKML_INPUT_DIR", "STACKML_CHECKPOINT_DIR", "STACKML_MODEL_DIR"))
    expected = json.loads(sys.argv[1])
    seen = {}
    for root, _dirs, files in os.walk(inp):
        for name in files:
            path = os.path.join(root, name)
            seen[os.path.relpath(path, inp)] = hashlib.sha256(open(path, "rb").read()).hexdigest()
    if seen != expected:
        print("inputs differ:", json.dumps(seen, sort_keys=True), file=sys.stderr, flush=True)
        sys.exit(4)
    print("inputs ok:", len(seen), "files", flush=True)
    starts = os.path.join(ckpt, "starts")
    n = int(open(starts).read()) + 1 if os.path.exists(starts) else 1
    open(starts, "w").write(str(n))
    print("start number", n, flush=True)
    with open(os.path.join(ckpt, "step-1.ckpt"), "wb") as fh:
        fh.write(b"weights after step 1")
    print("checkpoint 1 written", flush=True)
    for i in range(int(sys.argv[2]) * 10):
        time.sleep(0.1)
    kept = open(os.path.join(ckpt, "step-1.ckpt"), "rb").read()
    assert kept == b"weights after step 1", kept
    with open(os.path.join(ckpt, "step-2.ckpt"), "wb") as fh:
        fh.write(b"weights after step 2")
    listing = sorted(os.listdir(ckpt))
    print("checkpoints", json.dumps(listing), flush=True)
    with open(os.path.join(model, "seen.json"), "w") as fh:
        json.dump({"inputs": seen, "checkpoints": listing, "starts": n}, fh)
"""


def test_inputs_arrive_in_the_input_dir_and_checkpoints_outlive_a_worker_restart(
    client: StackMLClient, platform: LocalPlatform, tmp_path: Path
) -> None:
    from service.backends import registry

    pkg = client.stage_package(make_package(tmp_path / "ckptpkg", {"ckpt": TRAINER}))["package_uri"]
    store = registry.store()
    area = store.key_of(pkg).split("staging/", 1)[0]  # the project's area, projects/<id>/
    data_key = f"{area}data/e2e-{secrets.token_hex(4)}/"
    for name, body in INPUTS.items():
        store.put(data_key + name, body)
    expected = {name: hashlib.sha256(body).hexdigest() for name, body in INPUTS.items()}
    spec = job_spec(pkg, "trainer.ckpt", inputs={"data_uri": store.uri(data_key)})
    spec["trainer"]["args"] = [json.dumps(expected), "8"]
    job = client.create_job(spec)
    # the trainer has checked its inputs and written checkpoint 1: kill the worker and start a
    # new one while it trains (the restart a job goes through when a worker host dies)
    deadline = time.monotonic() + 120
    while b"checkpoint 1 written" not in client.logs(job["id"])[0]:
        state = client.get_job(job["id"])
        assert state["state"] in {"QUEUED", "ALLOCATING", "PROVISIONING", "RUNNING"}, (
            state["state"],
            state["failure"],
            client.logs(job["id"])[0].decode()[-2000:],
        )
        assert time.monotonic() < deadline, f"no checkpoint 1 in 120s: {state['state']}"
        time.sleep(0.2)
    platform.kill_worker()
    time.sleep(1)
    platform.restart_worker()
    done = wait_state(client, job["id"], {"SUCCEEDED", "FAILED"}, timeout=120)
    log = client.logs(job["id"])[0].decode()
    assert done["state"] == "SUCCEEDED", (done["failure"], log)
    assert "inputs ok: 3 files" in log
    assert log.count("start number") == 1 and "start number 1" in log  # not run twice
    seen = json.loads(store.get(store.key_of(done["output"]["model_uri"]) + "seen.json"))
    assert seen == {
        "inputs": expected,
        "checkpoints": ["starts", "step-1.ckpt", "step-2.ckpt"],
        "starts": 1,
    }
    wait_resources_deleted(client, job["id"])
