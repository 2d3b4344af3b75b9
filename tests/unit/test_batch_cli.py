"""`stackml models predict-batch` and `stackml jobs submit --spec` of a batch_prediction spec
against the real API (loopback port, SQLite, the local store); `jobs describe` shows the model
version the label resolved to and, once the job is done, the results summary."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from click.testing import Result
from flask.testing import FlaskClient

from service.backends.storage.local import LocalStore
from service.db import jobs as repo
from service.db.session import session_scope
from service.domain.states import JobState
from tests.unit.test_api_batch import AREA, _model, batch
from tests.unit.test_api_jobs import advance


def test_predict_batch_submit_spec_and_describe(
    run: Callable[..., Result], client: FlaskClient, db_url: str, store: LocalStore, tmp_path: Path
) -> None:
    _model(client, db_url, store)
    store.put("projects/local/data/rows.jsonl", b"[1]\n")
    res = run(
        "models",
        "predict-batch",
        "demo",
        "--input",
        AREA + "data/rows.jsonl",
        "--output",
        AREA + "predictions/cli/",
        "--batch-size",
        "16",
    )
    assert res.exit_code == 0, res.output
    assert "model demo v1 into" in res.output and ": QUEUED" in res.output
    job_id = res.output.split()[1]

    # refused: a version that is not READY, one sentence, exit 1
    res = run(
        "models", "predict-batch", "demo", "--input", AREA + "data/rows.jsonl",
        "--output", AREA + "predictions/cli2/", "--version", "2",
    )  # fmt: skip
    assert res.exit_code == 1 and "CREATING, not READY" in res.output, res.output
    res = run("models", "predict-batch", "demo", "--input", "x", "--output", "y", "--version",
              "1", "--label", "a")  # fmt: skip
    assert res.exit_code == 2 and "not both" in res.output

    # jobs submit --spec: the same kind of job from a file, -o json is the API's JSON
    path = tmp_path / "batch.json"
    path.write_text(json.dumps(batch(output_prefix=AREA + "predictions/spec/")))
    res = run("jobs", "submit", "--spec", str(path), "-o", "json")
    assert res.exit_code == 0, res.output
    submitted: dict[str, Any] = json.loads(res.output)
    assert submitted["type"] == "batch_prediction"
    assert submitted["output"]["prediction"]["version"] == 1
    res = run("jobs", "submit", "--spec", str(path), "--module", "x")
    assert res.exit_code == 2 and "leave out --module" in res.output
    res = run("jobs", "submit")
    assert res.exit_code == 2 and "--package-path" in res.output

    # describe, while it runs and once it is done
    res = run("jobs", "describe", job_id)
    assert res.exit_code == 0, res.output
    assert "demo v1 (label default)" in res.output and "data/rows.jsonl" in res.output
    assert "batch_size 16" in res.output and "results" not in res.output
    advance(
        db_url, job_id, JobState.ALLOCATING, JobState.PROVISIONING, JobState.RUNNING,
        JobState.EXPORTING,
    )  # fmt: skip
    with session_scope(db_url) as s:
        job = repo.get_job(s, job_id)
        rec = dict(job.output["prediction"])
        rec.update(
            rows=10, errors=2, shards=3, results=AREA + "predictions/cli/prediction.results-*"
        )
        assert repo.transition(
            s,
            job_id,
            JobState.EXPORTING,
            JobState.SUCCEEDED,
            output={**job.output, "prediction": rec},
        )
    res = run("jobs", "describe", job_id)
    assert res.exit_code == 0, res.output
    assert "10 rows, 2 failed, 3 shard(s)" in res.output
    assert "prediction.results-*" in res.output
