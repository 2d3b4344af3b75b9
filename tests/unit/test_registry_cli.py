"""`stackml models ...` against the real API (served on a loopback port, SQLite): create,
list, describe, versions (register from a URI), set-label with --expect, history; `-o json`
is the API's JSON; user-controlled text reaches the terminal without its escape sequences."""

from __future__ import annotations

import json
from collections.abc import Callable

from click.testing import Result

from service.db import registry as repo
from service.db.session import session_scope

EVIL = "digits \x1b]0;pwned\x07\x1b[2Jcleared \x1b]8;;http://evil.example/\x1b\\link"


def _ready(db_url: str, name: str, version: int) -> None:
    with session_scope(db_url) as s:
        model = repo.find_model(s, "local", name)
        mv = repo.get_version(s, model, version)
        sig = {
            "method_name": "tensorflow/serving/predict",
            "inputs": {"features": {"dtype": "DT_FLOAT", "shape": [-1, 20]}},
            "outputs": {"output_0": {"dtype": "DT_FLOAT", "shape": None}},
        }
        repo.finish_version(
            s, mv, checksums={"saved_model.pb": {"size": 5, "md5": "x"}}, signature=sig
        )


def test_models_commands_end_to_end(run: Callable[..., Result], db_url: str) -> None:
    res = run("models", "create", "mnist", "--description", EVIL)
    assert res.exit_code == 0, res.output
    assert "created model mnist (mdl-" in res.output
    res = run("models", "list")
    assert res.exit_code == 0 and "mnist" in res.output
    assert "\x1b" not in res.output and "\x07" not in res.output
    assert "digits" in res.output and "cleared" in res.output

    res = run("models", "versions", "mnist", "--uri", "local://projects/local/models/a/")
    assert res.exit_code == 0, res.output
    assert "version 1 of mnist is CREATING" in res.output
    _ready(db_url, "mnist", 1)
    res = run("models", "versions", "mnist", "--version", "1")
    assert res.exit_code == 0, res.output
    assert "READY" in res.output and "input features: DT_FLOAT [-1, 20]" in res.output
    assert "output output_0: DT_FLOAT unknown rank" in res.output

    res = run("models", "set-label", "mnist", "default", "1", "--why", "ship", "--expect", "none")
    assert res.exit_code == 0, res.output
    assert "default: nothing -> version 1" in res.output
    # compare-and-set refused: one sentence, exit 1, nothing moved
    res = run("models", "set-label", "mnist", "default", "1", "--expect", "3")
    assert res.exit_code == 1, res.output
    assert "points at version 1, not version 3" in res.output
    res = run("models", "set-label", "mnist", "default", "1", "--expect", "x")
    assert res.exit_code == 2

    res = run("models", "describe", "mnist")
    assert res.exit_code == 0, res.output
    assert "labels: default=1" in res.output and "endpoint: none" in res.output
    assert "\x1b" not in res.output

    res = run("models", "history", "mnist")
    assert res.exit_code == 0 and "ship" in res.output and "default" in res.output
    res = run("models", "history", "mnist", "--at", "2000-01-01T00:00:00Z")
    assert res.exit_code == 0 and "no label existed" in res.output

    res = run("models", "history", "mnist", "-o", "json")
    body = json.loads(res.output)
    assert [(h["from_version"], h["to_version"], h["why"]) for h in body["history"]] == [
        (None, 1, "ship")
    ]
    res = run("models", "list", "-o", "json")
    assert json.loads(res.output)["models"][0]["description"] == EVIL  # exactly the API's


def test_models_errors_are_one_sentence(run: Callable[..., Result]) -> None:
    res = run("models", "describe", "nope")
    assert res.exit_code == 1 and "no model 'nope'" in res.output
    res = run("models", "create", "Bad:Name")
    assert res.exit_code == 1 and "name" in res.output
    run("models", "create", "m")
    res = run("models", "versions", "m", "--register", "job-x", "--uri", "local://x/")
    assert res.exit_code == 2 and "not both" in res.output


def test_registering_into_a_model_that_does_not_exist_creates_it(run: Callable[..., Result]):
    res = run("models", "versions", "fresh", "--uri", "local://projects/local/models/f/")
    assert res.exit_code == 0, res.output
    assert "created model fresh (mdl-" in res.output
    assert "version 1 of fresh is CREATING" in res.output
    # a URI the API refuses: one sentence, and no empty model is left behind
    res = run("models", "versions", "other", "--uri", "local://projects/elsewhere/x/")
    assert res.exit_code == 1, res.output
    assert "artifact_uri" in res.output
    res = run("models", "describe", "other")
    assert res.exit_code == 1 and "no model 'other'" in res.output
    # a job that does not exist: likewise
    res = run("models", "versions", "third", "--register", "job-00000000")
    assert res.exit_code == 1 and "job-00000000" in res.output, res.output
    assert run("models", "list", "-o", "json").output.count('"name"') == 1


def test_rollback_and_a_gates_evaluation_on_the_command_line(
    run: Callable[..., Result], db_url: str
) -> None:
    run("models", "create", "gated")
    for _ in range(2):
        run("models", "versions", "gated", "--uri", "local://projects/local/models/g/")
    _ready(db_url, "gated", 1)
    _ready(db_url, "gated", 2)
    res = run("models", "rollback", "gated")
    assert res.exit_code == 1 and "no label 'default'" in res.output
    run("models", "set-label", "gated", "default", "1")
    res = run("models", "rollback", "gated")
    assert res.exit_code == 1, res.output
    assert "nothing to roll back to" in res.output  # one sentence, nothing moved
    run("models", "set-label", "gated", "default", "2")
    res = run("models", "rollback", "gated", "--label", "default", "--why", "bad v2")
    assert res.exit_code == 0, res.output
    assert "default: version 2 -> version 1 (rolled back)" in res.output
    res = run("models", "history", "gated")
    assert res.exit_code == 0 and "rollback" in res.output and "bad v2" in res.output
    res = run("models", "rollback", "gated", "-o", "json")
    assert json.loads(res.output)["version"] == 2
    # a version's evaluation, as the gate recorded it
    from service.db import evaluations
    from service.db.models import ModelEvaluation

    with session_scope(db_url) as s:
        model = repo.find_model(s, "local", "gated")
        mv = repo.get_version(s, model, 2)
        s.add(
            ModelEvaluation(
                project_id="local",
                model_id=model.id,
                version_id=mv.id,
                version=2,
                job_id="job-123",
                gate={"metric": "rmse", "direction": "minimize", "label": "default"},
                state=evaluations.DONE,
                champion_version=1,
                candidate_score=0.25,
                champion_score=0.5,
                holdout_rows=200,
                holdout={},
                decision="promoted",
                message="candidate rmse 0.25 is better than the champion's 0.5 by 50.00%",
            )
        )
    res = run("models", "versions", "gated", "--version", "2")
    assert res.exit_code == 0, res.output
    assert "evaluation (rmse, label default, job job-123): promoted" in res.output
    assert "candidate 0.25 vs version 1: 0.5 on 200 rows" in res.output
