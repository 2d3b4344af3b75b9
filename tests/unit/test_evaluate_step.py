"""The gate's evaluation, the parts that need no server: the worker's check of the evaluator's
answer (one line, this run's nonce, finite scores; anything else refused), the evaluator's
metrics and holdout reader (stdlib, as it runs on the server), and the isolation rules: the
worker and the API never import TensorFlow, the evaluator's parent process does not either, and
the evaluator's server is a server of its own (its own resources row, role `evaluator`, its
own SSH key), never the trainer's."""

from __future__ import annotations

import ast
import json
import math
from pathlib import Path

import pytest

from workers.steps import evaluate
from workers.steps.evaluate import EvaluationFailed, parse_answer
from workers.vm import evaluator

ROOT = Path(__file__).resolve().parents[2]


def _line(**over: object) -> str:
    body: dict[str, object] = {
        "nonce": "abc",
        "ok": True,
        "rows": 10,
        "scores": {"candidate": 0.5, "champion": 0.7},
    }
    body.update(over)
    return json.dumps(body)


def test_a_good_answer_is_read() -> None:
    assert parse_answer(_line() + "\n", "abc", has_champion=True) == (0.5, 0.7, 10)
    assert parse_answer(_line(scores={"candidate": 1}), "abc", has_champion=False) == (
        1.0,
        None,
        10,
    )


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("", "0 lines"),
        (_line() + "\n" + _line(), "2 lines"),  # a forged second line
        (_line(nonce="forged"), "nonce"),
        ("not json", "not JSON"),
        (_line(ok=False, error="boom"), "could not score: boom"),
        (_line(rows=0), "row count"),
        (_line(rows=True), "row count"),
        (_line(scores=[1, 2]), "no scores"),
        (_line(scores={"candidate": "0.1", "champion": 1}), "candidate's score"),
        (_line(scores={"candidate": True, "champion": 1}), "candidate's score"),
        (_line(scores={"candidate": 0.1}), "champion's score"),
        (
            '{"nonce": "abc", "ok": true, "rows": 3, "scores": {"candidate": NaN, "champion": 1}}',
            "finite",
        ),
    ],
)
def test_anything_else_is_refused(text: str, says: str) -> None:
    with pytest.raises(EvaluationFailed, match=says):
        parse_answer(text, "abc", has_champion=True)


def test_metrics_come_from_predictions_and_labels() -> None:
    p, y = [1.0, 2.0, 4.0], [1.0, 3.0, 2.0]
    assert evaluator.score("mae", p, y) == pytest.approx(1.0)
    assert evaluator.score("mse", p, y) == pytest.approx(5 / 3)
    assert evaluator.score("rmse", p, y) == pytest.approx(math.sqrt(5 / 3))
    assert evaluator.score("accuracy", [0.0, 1.0, 2.0, 1.0], [0, 1, 1, 1]) == 0.75
    with pytest.raises(evaluator.EvalError):
        evaluator.score("rmse", [1.0], [1.0, 2.0])
    with pytest.raises(evaluator.EvalError):
        evaluator.score("auc", [1.0], [1.0])


def test_holdout_reader(tmp_path: Path) -> None:
    a = tmp_path / "a.csv"
    a.write_text("x1,x2,y\n1,2,3\n\n4,5,6\n")
    b = tmp_path / "b.csv"
    b.write_text("7,8,9\n")
    features, labels = evaluator.read_holdout([str(a), str(b)], 10)
    assert features == [[1, 2], [4, 5], [7, 8]] and labels == [3, 6, 9]
    bad = tmp_path / "c.csv"
    for text, says in [
        ("1,2\n1,2,3\n", "3 columns"),
        ("1\n", "feature column"),
        ("1,nan\n", "not finite"),
        ("h\n", "no rows"),
    ]:
        bad.write_text(text)
        with pytest.raises(evaluator.EvalError, match=says):
            evaluator.read_holdout([str(bad)], 10)
    with pytest.raises(evaluator.EvalError, match="more than 2 rows"):
        evaluator.read_holdout([str(a), str(b)], 2)


def _imports(path: Path) -> set[str]:
    """Modules imported at a module's top level (not inside functions)."""
    tree = ast.parse(path.read_text())
    out: set[str] = set()
    for node in tree.body:
        if isinstance(node, ast.Import):
            out |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module.split(".")[0])
    return out


def test_tensorflow_only_in_the_evaluators_child() -> None:
    # the evaluator's parent (what reads the labels and computes the metric) imports no TF;
    # only `predict`, the per-model child, does, inside the function
    assert not _imports(ROOT / "workers/vm/evaluator.py") & {"tensorflow", "numpy"}
    src = ast.parse((ROOT / "workers/vm/evaluator.py").read_text())
    for fn in [n for n in src.body if isinstance(n, ast.FunctionDef)]:
        inner = {
            a.name for node in ast.walk(fn) if isinstance(node, ast.Import) for a in node.names
        }
        assert ("tensorflow" in inner) == (fn.name == "predict"), fn.name
    # the worker's step and the registry never import it at all
    for rel in ("workers/steps/evaluate.py", "service/db/evaluations.py", "service/domain/gate.py"):
        assert "tensorflow" not in (ROOT / rel).read_text(), rel


def test_the_evaluator_runs_on_a_server_of_its_own() -> None:
    # the step boots a new server (tagged with the job, role evaluator) with the evaluation's
    # own key; it never looks up the job's chief (the trainer's server) nor the job's key
    src = (ROOT / "workers/steps/evaluate.py").read_text()
    assert "create_server(" in src and "generate_keypair(" in src
    assert "chief(" not in src and "ssh_target(" not in src and "job.ssh_key_enc" not in src
    assert evaluate.ev_repo.ROLE == "evaluator"
