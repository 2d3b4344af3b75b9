"""The platform's evaluator (workers/vm/evaluator.py) with the real TensorFlow runtime, against
real SavedModels (tests/integration/savedmodels.py) served over loopback HTTP as the store's
signed URLs would be: the scores come from predictions and the holdout's labels; a file whose
MD5 does not match, a holdout that is not numbers, and a model that cannot be loaded are answers
with ok false (never a score); the parent process never imports TensorFlow."""

from __future__ import annotations

import hashlib
import http.server
import json
import math
import shutil
import subprocess
import threading
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import pytest

from tests.integration.test_model_server import expected, models, runtime_python  # noqa: F401
from workers.steps.evaluate import EvaluationFailed, parse_answer

VM = Path(__file__).resolve().parents[2] / "workers" / "vm"


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, str]]:
    """A directory served over loopback HTTP (a stand-in for the store's signed GET URLs)."""
    root = tmp_path_factory.mktemp("served")
    handler = partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *a, **k: None  # type: ignore[method-assign]
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def _entries(root: Path, base: str, sub: Path) -> list[dict[str, Any]]:
    out = []
    for p in sorted(sub.rglob("*")):
        if p.is_file():
            data = p.read_bytes()
            out.append(
                {
                    "path": p.relative_to(sub).as_posix(),
                    "url": f"{base}/{p.relative_to(root).as_posix()}",
                    "size": len(data),
                    "md5": hashlib.md5(data, usedforsecurity=False).hexdigest(),
                }
            )
    return out


def _holdout(weights: dict[str, Any], rows: int = 200) -> tuple[str, list[float]]:
    """CSV rows x (20 features), y = x @ w1 + b1 (version 1 of `linear` is exact on it)."""
    import random

    rnd = random.Random(7)
    w, b = weights["linear"]["1"]["w"], weights["linear"]["1"]["b"]
    lines, ys = ["f" + ",f".join(str(i) for i in range(20)) + ",y"], []
    for _ in range(rows):
        x = [rnd.uniform(-1, 1) for _ in range(20)]
        y = sum(a * c for a, c in zip(x, w, strict=True)) + b
        ys.append(y)
        lines.append(",".join(f"{v:.6f}" for v in [*x, y]))
    return "\n".join(lines) + "\n", ys


def _run(python: Path, tmp: Path, doc: dict[str, Any], nonce: str = "n0nce") -> dict[str, Any]:
    tmp.mkdir(parents=True, exist_ok=True)
    shutil.copy(VM / "runner.py", tmp / "runner.py")
    shutil.copy(VM / "evaluator.py", tmp / "evaluator.py")
    eval_dir = tmp / "eval"
    eval_dir.mkdir()
    (eval_dir / "eval.json").write_text(json.dumps(doc))
    r = subprocess.run(
        [str(python), str(tmp / "evaluator.py"), str(eval_dir)],
        input=nonce + "\n",
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    lines = r.stdout.splitlines()
    assert len(lines) == 1, r.stdout
    return dict(json.loads(lines[0]))


def test_scores_come_from_predictions_and_labels(
    runtime_python: Path,  # noqa: F811
    models: Path,  # noqa: F811
    expected: dict[str, Any],  # noqa: F811
    files: tuple[Path, str],
    tmp_path: Path,
) -> None:
    root, base = files
    shutil.copytree(models / "linear", root / "linear", dirs_exist_ok=True)
    csv, _ = _holdout(expected)
    (root / "holdout").mkdir(exist_ok=True)
    (root / "holdout" / "part-0.csv").write_text(csv)
    doc = {
        "metric": "rmse",
        "max_rows": 10_000,
        "holdout": _entries(root, base, root / "holdout"),
        "models": [
            {
                "role": "candidate",
                "version": 1,
                "files": _entries(root, base, root / "linear" / "1"),
            },
            {
                "role": "champion",
                "version": 2,
                "files": _entries(root, base, root / "linear" / "2"),
            },
        ],
    }
    answer = _run(runtime_python, tmp_path / "a", doc)
    assert answer["ok"] is True, answer
    assert answer["nonce"] == "n0nce" and answer["rows"] == 200
    cand, champ = answer["scores"]["candidate"], answer["scores"]["champion"]
    assert cand < 1e-3  # version 1 is the function the labels come from
    assert champ > 0.1  # version 2 has other weights
    got = parse_answer(json.dumps(answer), "n0nce", has_champion=True)
    assert got == (cand, champ, 200)
    # mae of the same predictions: also from predictions and labels
    answer = _run(runtime_python, tmp_path / "b", {**doc, "metric": "mae"})
    assert answer["scores"]["candidate"] < 1e-3
    assert not math.isclose(answer["scores"]["champion"], champ)


def test_what_cannot_be_scored_is_an_answer_without_scores(
    runtime_python: Path,  # noqa: F811
    models: Path,  # noqa: F811
    expected: dict[str, Any],  # noqa: F811
    files: tuple[Path, str],
    tmp_path: Path,
) -> None:
    root, base = files
    shutil.copytree(models / "linear", root / "linear", dirs_exist_ok=True)
    csv, _ = _holdout(expected, rows=20)
    (root / "h2").mkdir(exist_ok=True)
    (root / "h2" / "part-0.csv").write_text(csv)
    cand = _entries(root, base, root / "linear" / "1")
    holdout = _entries(root, base, root / "h2")
    ok = {"metric": "rmse", "max_rows": 100, "holdout": holdout}
    # a file whose MD5 is not the registered one: refused before anything is loaded
    bad_md5 = [dict(f, md5="0" * 32) if f["path"] == "saved_model.pb" else f for f in cand]
    answer = _run(
        runtime_python,
        tmp_path / "md5",
        {**ok, "models": [{"role": "candidate", "version": 1, "files": bad_md5}]},
    )
    assert answer["ok"] is False and "md5" in answer["error"]
    # a holdout that is not numbers
    (root / "h3").mkdir(exist_ok=True)
    (root / "h3" / "x.csv").write_text("1,2,3\n4,five,6\n")
    answer = _run(
        runtime_python,
        tmp_path / "nan",
        {
            **ok,
            "holdout": _entries(root, base, root / "h3"),
            "models": [{"role": "candidate", "version": 1, "files": cand}],
        },
    )
    assert answer["ok"] is False and "not a number" in answer["error"]
    # a model that is not a SavedModel: the child fails, the parent answers why
    (root / "junk").mkdir(exist_ok=True)
    (root / "junk" / "saved_model.pb").write_bytes(b"not a protobuf")
    junk = _entries(root, base, root / "junk")
    answer = _run(
        runtime_python,
        tmp_path / "junk",
        {**ok, "models": [{"role": "candidate", "version": 1, "files": junk}]},
    )
    assert answer["ok"] is False and "predicting failed" in answer["error"]
    with pytest.raises(EvaluationFailed, match="could not score"):
        parse_answer(json.dumps(answer), "n0nce", has_champion=False)
    # too many rows for max_rows
    answer = _run(
        runtime_python,
        tmp_path / "rows",
        {**ok, "max_rows": 5, "models": [{"role": "candidate", "version": 1, "files": cand}]},
    )
    assert answer["ok"] is False and "more than 5 rows" in answer["error"]
