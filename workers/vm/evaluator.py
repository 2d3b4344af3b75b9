"""stackml evaluator: scores model versions on a holdout, on a server of its own.

Shipped over SSH with runner.py (whose verified fetch it uses) by workers/steps/evaluate.py to
a fresh server that the job's trainer never ran on, and run with the runtime's Python:

    python evaluator.py EVALDIR        (stdin: one line, a nonce to echo)

EVALDIR/eval.json (written by the worker, 0600)::

    {"metric": "rmse" | "mae" | "mse" | "accuracy", "max_rows": N,
     "holdout": [{"path", "url", "size", "md5"}, ...],         CSV: features..., target
     "models": [{"role": "champion" | "candidate", "version": V,
                 "files": [{"path", "url", "size", "md5"}, ...]}, ...]}

Prints exactly one JSON line: {"nonce", "ok": true, "rows", "scores": {role: value}} or
{"nonce", "ok": false, "error"}.

Isolation (docs/security.md, "Where a gate's scores come from"): this parent process never
imports TensorFlow nor loads a SavedModel. It fetches every file (size and MD5 checked), reads
the holdout, keeps the labels in memory, makes itself non-dumpable (so that no process of the
same user can read its memory or reach its file descriptors through /proc), and runs one child
per model (`evaluator.py predict MODELDIR FEATURES OUT`), the champion first: a child has no
handle on this process's stdout (the SSH channel) — its stdin, stdout and stderr are files —
and its predictions are read into memory as soon as it exits. The metric is computed here from
the predictions and the labels, so a candidate's graph (which can read and write files) can
change only its own predictions.
"""

from __future__ import annotations

import csv
import ctypes
import json
import math
import os
import subprocess
import sys
import tempfile

METRICS = ("rmse", "mae", "mse", "accuracy")
PREDICT_TIMEOUT = 300
BATCH = 4096
MAX_ERROR = 2000


class EvalError(Exception):
    pass


# -- metrics (pure) ---------------------------------------------------------------------------


def score(metric: str, predictions: list[float], labels: list[float]) -> float:
    """The metric of `predictions` against `labels` (same length, at least one row).
    accuracy compares predicted classes with the labels as integers."""
    if metric not in METRICS:
        raise EvalError(f"unknown metric {metric!r}")
    if len(predictions) != len(labels) or not labels:
        raise EvalError(f"{len(predictions)} predictions for {len(labels)} labels")
    n = len(labels)
    if metric == "accuracy":
        return sum(1 for p, y in zip(predictions, labels, strict=True) if round(p) == round(y)) / n
    diffs = [p - y for p, y in zip(predictions, labels, strict=True)]
    if metric == "mae":
        return sum(abs(d) for d in diffs) / n
    mse = sum(d * d for d in diffs) / n
    return math.sqrt(mse) if metric == "rmse" else mse


def read_holdout(paths: list[str], max_rows: int) -> tuple[list[list[float]], list[float]]:
    """CSV files (as the example trainer reads them): feature columns, then the target; a first
    line that is not all numbers is a header. Every row must have the same width, >= 2."""
    features: list[list[float]] = []
    labels: list[float] = []
    width = None
    for path in paths:
        with open(path, newline="") as fh:
            for i, row in enumerate(csv.reader(fh)):
                if not row or all(not c.strip() for c in row):
                    continue
                try:
                    values = [float(c) for c in row]
                except ValueError as e:
                    if i == 0:
                        continue  # a header
                    raise EvalError(
                        f"{os.path.basename(path)} line {i + 1}: not a number ({e})"
                    ) from e
                if width is None:
                    width = len(values)
                    if width < 2:
                        raise EvalError("holdout rows need a feature column and a target")
                if len(values) != width:
                    raise EvalError(
                        f"{os.path.basename(path)} line {i + 1}: {len(values)} columns, "
                        f"expected {width}"
                    )
                if not all(math.isfinite(v) for v in values):
                    raise EvalError(f"{os.path.basename(path)} line {i + 1}: not finite")
                features.append(values[:-1])
                labels.append(values[-1])
                if len(labels) > max_rows:
                    raise EvalError(f"the holdout has more than {max_rows} rows")
    if not labels:
        raise EvalError("the holdout holds no rows")
    return features, labels


# -- the child: one model's predictions ---------------------------------------------------------


def predict(model_dir: str, features_path: str, out_path: str) -> None:
    """Load the SavedModel, run serving_default over the features, write the predictions (one
    number per row: a single output column as it is, several columns as their argmax)."""
    import numpy as np
    import tensorflow as tf

    with open(features_path) as fh:
        features = json.load(fh)
    loaded = tf.saved_model.load(model_dir)
    fn = loaded.signatures["serving_default"]
    inputs = fn.structured_input_signature[1]
    if len(inputs) != 1:
        raise EvalError(f"serving_default takes {len(inputs)} inputs; the evaluator feeds one")
    ((name, spec),) = inputs.items()
    x = np.asarray(features, dtype=spec.dtype.as_numpy_dtype)
    out: list[float] = []
    for start in range(0, len(x), BATCH):
        result = fn(**{name: tf.constant(x[start : start + BATCH])})
        first = result[sorted(result)[0]].numpy()
        first = first.reshape(len(first), -1)
        if first.shape[1] == 1:
            out.extend(float(v) for v in first[:, 0])
        else:
            out.extend(float(v) for v in first.argmax(axis=1))
    with open(out_path, "w") as fh:
        json.dump(out, fh)


# -- the parent -------------------------------------------------------------------------------


def _non_dumpable() -> None:
    """PR_SET_DUMPABLE 0: /proc/<pid>/{mem,fd,environ} become root's; no same-user ptrace."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(4, 0, 0, 0, 0) != 0:
            raise EvalError(f"prctl(PR_SET_DUMPABLE) failed: errno {ctypes.get_errno()}")
    except (OSError, AttributeError) as e:
        raise EvalError(f"cannot make the evaluator non-dumpable: {e}") from e


def _fetch(runner, entries: list[dict], dest: str) -> list[str]:
    paths = []
    for f in entries:
        runner._check_rel_path(f.get("path"))
        target = os.path.join(dest, *f["path"].split("/"))
        runner._fetch_verified(f["url"], target, int(f["size"]), str(f["md5"]))
        paths.append(target)
    return paths


def _run_child(model_dir: str, features: str, work: str) -> list[float]:
    out = os.path.join(work, "predictions.json")
    err_path = os.path.join(work, "predict.err")
    with (
        open(os.devnull, "rb") as stdin,
        open(os.path.join(work, "predict.out"), "wb") as stdout,
        open(err_path, "wb") as stderr,
    ):
        try:
            code = subprocess.run(
                [sys.executable, os.path.abspath(__file__), "predict", model_dir, features, out],
                stdin=stdin,
                stdout=stdout,
                stderr=stderr,
                timeout=PREDICT_TIMEOUT,
                close_fds=True,
                check=False,
            ).returncode
        except subprocess.TimeoutExpired as e:
            raise EvalError(f"predicting took more than {PREDICT_TIMEOUT}s") from e
    if code != 0:
        with open(err_path, "rb") as fh:
            tail = fh.read()[-MAX_ERROR:].decode("utf-8", "replace").strip().splitlines()
        raise EvalError(f"predicting failed (exit {code}): {tail[-1] if tail else ''}")
    try:
        with open(out) as fh:
            values = json.load(fh)
        os.unlink(out)
    except (OSError, ValueError) as e:
        raise EvalError(f"no predictions: {e}") from e
    if not isinstance(values, list) or not all(
        isinstance(v, int | float) and not isinstance(v, bool) for v in values
    ):
        raise EvalError("the predictions are not a list of numbers")
    return [float(v) for v in values]


def evaluate(eval_dir: str) -> dict:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import runner  # the verified fetch (runner.py is shipped next to this file)

    with open(os.path.join(eval_dir, "eval.json")) as fh:
        cfg = json.load(fh)
    metric = cfg.get("metric")
    if metric not in METRICS:
        raise EvalError(f"eval.json: unknown metric {metric!r}")
    max_rows = int(cfg.get("max_rows") or 1_000_000)
    holdout = _fetch(runner, cfg.get("holdout") or [], os.path.join(eval_dir, "holdout"))
    features, labels = read_holdout(sorted(holdout), max_rows)
    work = tempfile.mkdtemp(prefix="work-", dir=eval_dir)
    features_path = os.path.join(work, "features.json")
    with open(features_path, "w") as fh:
        json.dump(features, fh)
    scores: dict[str, float | None] = {}
    order = sorted(cfg.get("models") or [], key=lambda m: m.get("role") != "champion")
    for m in order:
        role = m.get("role")
        if role not in ("champion", "candidate"):
            raise EvalError(f"eval.json: role {role!r}")
        model_dir = os.path.join(eval_dir, "models", role)
        _fetch(runner, m.get("files") or [], model_dir)
        predictions = _run_child(model_dir, features_path, work)
        value = score(metric, predictions, labels)
        scores[role] = value if math.isfinite(value) else None
    return {"ok": True, "rows": len(labels), "scores": scores}


def main(argv: list[str]) -> int:
    if len(argv) == 4 and argv[0] == "predict":
        predict(argv[1], argv[2], argv[3])
        return 0
    if len(argv) != 1:
        sys.stderr.write("usage: evaluator.py EVALDIR | predict MODEL FEATURES OUT\n")
        return 2
    nonce = sys.stdin.readline().strip()[:64]
    try:
        _non_dumpable()
        result = evaluate(os.path.abspath(argv[0]))
    except Exception as e:  # noqa: BLE001 - every failure is an answer: the worker records it
        result = {"ok": False, "error": f"{type(e).__name__}: {e}"[:MAX_ERROR]}
    sys.stdout.write(json.dumps({"nonce": nonce, **result}) + "\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
