"""Batch prediction end to end on the real platform (API over HTTP, worker, a sandbox over SSH,
TensorFlow on the server): train and register the example, submit a batch_prediction job by
label through the API, and compare the shards' predictions with the SavedModel's own on the
same rows; the bad row is in the errors shard with its reason; the job's record shows the rows,
errors, shards and the version the label resolved to; its server is gone afterwards. The same
request spread over two servers (max_workers 2) writes the same shards."""

from __future__ import annotations

import json
import math
from pathlib import Path

from service.backends import registry
from service.client import StackMLClient
from service.config import REPO_ROOT, Settings
from tests.e2e.conftest import wait_resources_deleted, wait_state
from tests.e2e.test_serving import direct_predictions, rows

EXAMPLE = REPO_ROOT / "examples" / "keras_regression"
MODEL = "e2e-batch"
TOLERANCE = 1e-4


def test_batch_prediction_through_the_api_equals_the_savedmodel(
    client: StackMLClient, e2e_settings: Settings, runtime_python: Path
) -> None:
    pkg = client.stage_package(EXAMPLE)
    job = client.create_job(
        {
            "name": "e2e-batch-train",
            "trainer": {"package_uri": pkg["package_uri"], "module": "trainer.task"},
            "hyperparameters": {"epochs": 1},
            "env": {"TF_ENABLE_ONEDNN_OPTS": "0", "TF_CPP_MIN_LOG_LEVEL": "2"},
            "output": {"register_as": MODEL},
            "max_runtime_seconds": 600,
        }
    )
    trained = wait_state(client, job["id"], {"SUCCEEDED", "FAILED"}, timeout=600)
    assert trained["state"] == "SUCCEEDED", trained["failure"]
    assert client.wait_version(MODEL, 1, timeout=120)["state"] == "READY"
    width = client.get_version(MODEL, 1)["signature"]["inputs"]["features"]["shape"][1]

    # the three rows predict.py feeds the SavedModel, twice, with a bad row between
    three = rows(width)
    lines = (
        [json.dumps(r) for r in three] + ['{"features": "nope"'] + [json.dumps(r) for r in three]
    )
    store = registry.store()
    area = store.key_of(pkg["package_uri"]).split("staging/", 1)[0]
    store.put(area + "batch-in/rows.jsonl", ("\n".join(lines) + "\n").encode())
    out_uri = store.uri(area + "batch-out/run1/")
    batch = client.create_job(
        {
            "name": "e2e-batch",
            "type": "batch_prediction",
            "prediction": {
                "model": MODEL,
                "input_uris": [store.uri(area + "batch-in/rows.jsonl")],
                "output_prefix": out_uri,
                "batch_size": 2,
                "shard_rows": 3,
            },
            "env": {"TF_ENABLE_ONEDNN_OPTS": "0"},
            "max_runtime_seconds": 600,
        }
    )
    assert batch["output"]["prediction"]["version"] == 1
    assert batch["output"]["prediction"]["label"] == "default"
    done = wait_state(client, batch["id"], {"SUCCEEDED", "FAILED"}, timeout=600)
    assert done["state"] == "SUCCEEDED", (done["failure"], client.logs(batch["id"]))
    rec = done["output"]["prediction"]
    assert (rec["rows"], rec["errors"], rec["shards"], rec["version"]) == (7, 1, 3, 1)
    assert done["output"]["output_prefix"] == out_uri

    prefix = store.key_of(out_uri)
    manifest = json.loads(store.get(prefix + "manifest.json"))
    results, errors = [], []
    for sh in manifest["shards"]:
        results += [json.loads(x) for x in store.get(prefix + sh["results"]).splitlines()]
        errors += [json.loads(x) for x in store.get(prefix + sh["errors"]).splitlines()]
    assert [r["index"] for r in results] == [0, 1, 2, 4, 5, 6]
    model_dir = e2e_settings.store_dir / store.key_of(trained["output"]["model_uri"])
    want = direct_predictions(runtime_python, model_dir)
    got = [float(r["prediction"][0]) for r in results]
    assert all(
        math.isclose(g, w, abs_tol=TOLERANCE) for g, w in zip(got, want + want, strict=True)
    ), (got, want)
    assert [e["index"] for e in errors] == [3] and "not JSON" in errors[0]["reason"]
    wait_resources_deleted(client, batch["id"])

    # the same request over 2 servers (shards 0 and 2 on the first, 1 on the second): the
    # same plan and counts, the same rows and predictions (to TensorFlow's float noise between
    # processes), the same errors objects byte for byte, both servers deleted
    out2 = store.uri(area + "batch-out/run2/")
    spread = client.create_job(
        {
            **{k: batch["spec"][k] for k in ("type", "env", "max_runtime_seconds")},
            "name": "e2e-batch-2",
            "prediction": {
                **{k: batch["spec"]["prediction"][k] for k in ("model", "input_uris")},
                "output_prefix": out2,
                "batch_size": 2,
                "shard_rows": 3,
                "max_workers": 2,
            },
        }
    )
    done2 = wait_state(client, spread["id"], {"SUCCEEDED", "FAILED"}, timeout=600)
    assert done2["state"] == "SUCCEEDED", (done2["failure"], client.logs(spread["id"]))
    rec2 = done2["output"]["prediction"]
    assert (rec2["rows"], rec2["errors"], rec2["shards"]) == (7, 1, 3)
    prefix2 = store.key_of(out2)
    assert json.loads(store.get(prefix2 + "manifest.json"))["shards"] == manifest["shards"]
    for sh in manifest["shards"]:
        assert store.get(prefix2 + sh["errors"]) == store.get(prefix + sh["errors"])
        one, two = (
            [json.loads(x) for x in store.get(p + sh["results"]).splitlines()]
            for p in (prefix, prefix2)
        )
        assert [r["index"] for r in two] == [r["index"] for r in one], sh["results"]
        assert all(
            math.isclose(float(a["prediction"][0]), float(b["prediction"][0]), abs_tol=TOLERANCE)
            for a, b in zip(one, two, strict=True)
        ), (one, two)
    roles = sorted(r["role"] for r in done2["resources"])
    assert roles == ["batch-worker", "chief"], done2["resources"]
    said = [e["message"] for e in client.events(spread["id"])["events"]]
    assert any("batch worker 1 exited 0" in m for m in said), said
    assert any("started on 2 servers" in m for m in said), said
    # each server's log is its own: shard 2 of 3 (shards 0 and 2 are the chief's) is worker 1's
    chief_log = client.logs(spread["id"])[0].decode()
    worker_log = client.logs(spread["id"], replica="worker-1")[0].decode()
    assert "batch worker 1/2: shard 2/3: 3 rows" in worker_log, worker_log
    assert "batch worker 0/2: shard 1/3" in chief_log and "shard 2/3" not in chief_log, chief_log
    wait_resources_deleted(client, spread["id"])
