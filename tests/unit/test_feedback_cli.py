"""`stackml models feedback` and `stackml datasets ...` against the real API (served on a
loopback port, SQLite, the local store): feedback from a JSONL file and from stdin (the
counts), a bad line or a refused item is one sentence and a non-zero exit; a dataset built
(the worker's build run here), listed and described with its data_uri; live metrics in
`stackml models versions`."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

from click.testing import Result

from service.backends.storage.local import LocalStore
from service.config import Settings
from service.db import registry
from service.db.models import ModelVersion
from service.db.session import session_scope
from tests.unit.test_feedback_datasets import T0, index, log_predictions
from tests.unit.test_feedback_datasets import model as model
from tests.unit.test_feedback_datasets import worker as worker
from workers.steps import datasets as build_step


def test_feedback_and_datasets_commands(
    run: Callable[..., Result],
    model: str,
    worker: Any,
    settings: Settings,
    store: LocalStore,
    db_url: str,
    enqueued: Any,
    tmp_path: Path,
) -> None:
    preds = [
        (f"req-{i}", {"instances": [[float(i), 1.0]]}, {"predictions": [[float(i)]]}, 1)
        for i in range(12)
    ]
    log_predictions(store, preds, T0)
    index(settings, store, T0 + timedelta(minutes=5))
    with session_scope(db_url) as s:
        m = registry.find_model(s, "local", "demo")
        s.add(
            ModelVersion(
                model_id=m.id, version=1, state="READY", artifact_uri="local://x/", created_by="u"
            )
        )

    path = tmp_path / "fb.jsonl"
    path.write_text(
        "".join(json.dumps({"request_id": f"req-{i}", "label": i + 1.0}) + "\n" for i in range(6))
    )
    res = run("models", "feedback", "demo", "--file", str(path))
    assert res.exit_code == 0, res.output
    assert "6 label(s) for demo: 6 new, 0 corrected, 0 unchanged" in res.output
    stdin = "\n".join(json.dumps({"request_id": f"req-{i}", "label": i + 1.0}) for i in range(12))
    res = run("models", "feedback", "demo", "-o", "json", stdin=stdin)
    assert res.exit_code == 0, res.output
    assert json.loads(res.output) == {
        "model": "demo",
        "received": 12,
        "created": 6,
        "updated": 0,
        "unchanged": 6,
    }
    res = run("models", "feedback", "demo", stdin='{"request_id": "x", "label": 1}\nnot json\n')
    assert res.exit_code == 2 and "line 2 is not JSON" in res.output
    res = run("models", "feedback", "demo", stdin='{"request_id": "x", "label": null}\n')
    assert res.exit_code == 1 and "feedback.0.label" in res.output

    res = run("models", "versions", "demo")
    assert res.exit_code == 0 and "12/12 labelled (100%) mae=1" in res.output, res.output
    res = run("models", "versions", "demo", "--version", "1")
    assert "live (from feedback): 12/12 labelled" in res.output

    res = run("datasets", "create", "loop", "--model", "demo", "--holdout-fraction", "0.25")
    assert res.exit_code == 0, res.output
    assert "dataset loop version 1" in res.output and "BUILDING" in res.output
    build_step.run(enqueued.calls[-1][1])
    res = run("datasets", "describe", "loop", "--version", "1")
    assert res.exit_code == 0, res.output
    assert "READY" in res.output and "12/12 predictions labelled (100%)" in res.output
    assert "data_uri (a job's inputs.data_uri): local://projects/local/datasets/loop/1/train/" in (
        res.output
    )
    res = run("datasets", "list")
    assert "loop" in res.output and "READY" in res.output
    res = run("datasets", "describe", "loop", "-o", "json")
    assert json.loads(res.output)["version_list"][0]["manifest"]["rows"] == 12
    res = run("datasets", "create", "other", "--model", "ghost")
    assert res.exit_code == 1 and "no model 'ghost'" in res.output
