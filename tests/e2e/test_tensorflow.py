"""A real TensorFlow training job: the example trainer, exported as a SavedModel and loaded."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from service.client import StackMLClient
from service.config import REPO_ROOT, Settings
from tests.e2e.conftest import wait_resources_deleted, wait_state

EXAMPLE = REPO_ROOT / "examples" / "keras_regression"


def test_example_trains_exports_a_savedmodel_that_loads_and_predicts(
    client: StackMLClient, e2e_settings: Settings, runtime_python: Path
) -> None:
    pkg = client.stage_package(EXAMPLE)
    job = client.create_job(
        {
            "name": "e2e-keras",
            "trainer": {"package_uri": pkg["package_uri"], "module": "trainer.task"},
            "hyperparameters": {"epochs": 2},
            "env": {"TF_ENABLE_ONEDNN_OPTS": "0", "TF_CPP_MIN_LOG_LEVEL": "2"},
            "max_runtime_seconds": 600,
        }
    )
    done = wait_state(client, job["id"], {"SUCCEEDED", "FAILED"}, timeout=600)
    assert done["state"] == "SUCCEEDED", done["failure"]
    keys = {o["key"] for o in done["output"]["objects"]}
    assert "saved_model.pb" in keys
    metrics = client.metrics(job["id"])["metrics"]
    assert len(metrics["loss"]) == 2  # one point per epoch, from the metric lines
    model_dir = e2e_settings.store_dir / done["output"]["model_uri"].split("://", 1)[1]
    out = subprocess.run(
        [str(runtime_python), str(EXAMPLE / "predict.py"), str(model_dir)],
        capture_output=True,
        text=True,
        timeout=300,
        env={"TF_ENABLE_ONEDNN_OPTS": "0", "TF_CPP_MIN_LOG_LEVEL": "2", "PATH": "/usr/bin"},
    )
    assert out.returncode == 0, out.stderr
    preds = json.loads(out.stdout.strip().splitlines()[-1])["predictions"]
    assert len(preds) == 3 and all(isinstance(p, list | float) for p in preds)
    wait_resources_deleted(client, job["id"])
