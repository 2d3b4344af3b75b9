"""A training job with output.register_as: the real platform trains the example, exports the
SavedModel, registers it as a version of a model it creates, and a worker checks the version:
READY, with the signature TensorFlow itself reports, the checksums of what was exported, and
the job's final metrics. A second job adds version 2; labels and their history follow."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from service.client import StackMLClient
from service.config import REPO_ROOT, Settings
from tests.e2e.conftest import wait_resources_deleted, wait_state
from tests.registryutil import tensorflow_view

EXAMPLE = REPO_ROOT / "examples" / "keras_regression"
MODEL = "e2e-keras-registry"


def _train(client: StackMLClient, package_uri: str) -> dict[str, Any]:
    job = client.create_job(
        {
            "name": "e2e-register",
            "trainer": {"package_uri": package_uri, "module": "trainer.task"},
            "hyperparameters": {"epochs": 2},
            "env": {"TF_ENABLE_ONEDNN_OPTS": "0", "TF_CPP_MIN_LOG_LEVEL": "2"},
            "output": {"register_as": MODEL},
            "max_runtime_seconds": 600,
        }
    )
    done = wait_state(client, job["id"], {"SUCCEEDED", "FAILED"}, timeout=600)
    assert done["state"] == "SUCCEEDED", done["failure"]
    return done


def test_a_job_with_register_as_becomes_a_ready_version(
    client: StackMLClient, e2e_settings: Settings, runtime_python: Path
) -> None:
    pkg = client.stage_package(EXAMPLE)
    done = _train(client, pkg["package_uri"])
    model = client.get_model(MODEL)  # created by the job's success
    assert model["name"] == MODEL and model["versions"] == 1
    v = client.wait_version(MODEL, 1, timeout=120)
    assert v["state"] == "READY", v["failure_message"]
    assert v["source_job_id"] == done["id"]
    assert v["artifact_uri"].rstrip("/") == done["output"]["model_uri"].rstrip("/")

    model_dir = e2e_settings.store_dir / done["output"]["model_uri"].split("://", 1)[1]
    assert v["signature"] == tensorflow_view(model_dir)
    assert v["signature"]["inputs"]["features"]["shape"] == [-1, 20]

    exported = {
        p.relative_to(model_dir).as_posix(): p.read_bytes()
        for p in model_dir.rglob("*")
        if p.is_file()
    }
    assert v["checksums"] == {
        k: {"size": len(b), "md5": hashlib.md5(b).hexdigest()} for k, b in exported.items()
    }
    series = client.metrics(done["id"])["metrics"]
    assert v["metrics"] == {name: points[-1]["value"] for name, points in series.items()}
    assert "loss" in v["metrics"]

    # a second version from the same job, explicitly; labels and the history
    v2 = client.create_version(MODEL, job_id=done["id"])
    assert v2["version"] == 2 and v2["state"] == "CREATING"
    assert client.wait_version(MODEL, 2, timeout=120)["state"] == "READY"
    # the first READY version got `default` by itself (a plain deploy needs nothing more)
    assert client.get_model(MODEL)["labels"] == {"default": 1}
    client.set_label(MODEL, "default", 2, why="second", expected_version=1)
    assert client.get_model(MODEL)["labels"] == {"default": 2}
    hist = client.model_history(MODEL)["history"]
    assert [(h["from_version"], h["to_version"], h["by"]) for h in hist] == [
        (None, 1, "system"),
        (1, 2, hist[1]["by"]),
    ]
    assert hist[1]["by"] != "system" and hist[1]["why"] == "second"
    at = client.model_history(MODEL, at=hist[0]["at"])["labels"]
    assert at == {"default": 1}
    wait_resources_deleted(client, done["id"])
