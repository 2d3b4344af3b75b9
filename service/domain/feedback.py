"""The closed loop's pure logic: feedback labels, reading a logged prediction, live metrics,
the holdout split and the CSV row of a dataset (no I/O).

- A label is a JSON scalar (a finite number, a string, a boolean) or a list (of scalars or
  nested lists), at most `MAX_LABEL_BYTES` as compact JSON. Its `label_key` (the SHA-256 of
  its canonical JSON) is what makes posting the same label twice `unchanged`.
- A logged prediction's instances come from the request as TensorFlow Serving's REST API
  takes it (`instances`: one per row; `inputs`: columnar, a list or a dict of lists), its
  predictions from the response (`predictions`, or `outputs`). A label applies to a request:
  as given to a one-instance request, a list of n labels to n instances.
- Live metrics: numeric label and numeric prediction -> absolute and squared error (MAE,
  RMSE); a string or boolean label, or an integer label against a vector of scores -> a class
  comparison (accuracy).
- The holdout side of a request is fixed by the SHA-256 of its request id: the same request
  is on the same side in every dataset built with the same fraction, and a request on the
  holdout side at fraction f stays there at any larger fraction.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

MAX_LABEL_BYTES = 16 * 1024
MAX_REQUEST_ID = 128
MAX_FEEDBACK_ITEMS = 1000
MAX_FEATURES = 100_000  # columns of one CSV row


class LabelError(ValueError):
    """Why a label is not accepted (a sentence)."""


def check_label(label: Any) -> None:
    """Raise LabelError when `label` is not a JSON scalar or list a dataset can hold."""
    if label is None:
        raise LabelError("a label is a JSON scalar or list, not null")
    if isinstance(label, dict):
        raise LabelError("a label is a JSON scalar or list, not an object")
    _check_value(label, 0)
    if len(canonical(label)) > MAX_LABEL_BYTES:
        raise LabelError(f"a label is at most {MAX_LABEL_BYTES} bytes as JSON")


def _check_value(v: Any, depth: int) -> None:
    if depth > 8:
        raise LabelError("a label's lists nest at most 8 deep")
    if isinstance(v, bool) or isinstance(v, str):
        return
    if isinstance(v, int):
        if abs(v) > 2**63:
            raise LabelError("an integer label is at most 2**63 in magnitude")
        return
    if isinstance(v, float):
        if not math.isfinite(v):
            raise LabelError("a number in a label must be finite (no NaN or Infinity)")
        return
    if isinstance(v, list):
        for x in v:
            if x is None or isinstance(x, dict):
                raise LabelError("a label's list holds scalars or lists (no null, no object)")
            _check_value(x, depth + 1)
        return
    raise LabelError("a label is a JSON scalar or list")


def canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def label_key(label: Any) -> str:
    return hashlib.sha256(canonical(label).encode()).hexdigest()


def check_request_id(rid: Any) -> str | None:
    """Why `rid` cannot be a request id, or None."""
    if not isinstance(rid, str) or not rid:
        return "must be a non-empty string"
    if len(rid) > MAX_REQUEST_ID:
        return f"must be at most {MAX_REQUEST_ID} characters"
    if not rid.isprintable() or not rid.isascii() or rid != rid.strip():
        return "must be printable ASCII without leading or trailing spaces"
    return None


# -- a logged prediction ------------------------------------------------------------------------


def _columnar(value: Any) -> list[Any] | None:
    """TF Serving's columnar form as rows: a list is its rows; a dict of equal-length lists
    is one dict per row."""
    if isinstance(value, list):
        return value
    if isinstance(value, dict) and value:
        cols = list(value.items())
        if all(isinstance(v, list) for _, v in cols):
            lengths = {len(v) for _, v in cols}
            if len(lengths) == 1:
                n = lengths.pop()
                return [{k: v[i] for k, v in cols} for i in range(n)]
        return None
    return None


def instances_of(request: Any) -> list[Any] | None:
    """The rows of a :predict request body (None: not a request a dataset can use)."""
    if not isinstance(request, dict):
        return None
    if isinstance(request.get("instances"), list):
        rows: list[Any] = request["instances"]
        return rows or None
    if "inputs" in request:
        return _columnar(request["inputs"]) or None
    return None


def predictions_of(response: Any) -> list[Any] | None:
    """The rows of a :predict response body (None: none)."""
    if not isinstance(response, dict):
        return None
    if isinstance(response.get("predictions"), list):
        rows: list[Any] = response["predictions"]
        return rows
    if "outputs" in response:
        return _columnar(response["outputs"])
    return None


def labels_per_instance(label: Any, n: int) -> list[Any] | None:
    """One label per instance of an n-instance request, or None when the label does not fit.
    A one-instance request's label is the label as given (a scalar, or a list: a vector
    target); a request of n > 1 instances needs a list of n labels."""
    if n == 1:
        return [label]
    if isinstance(label, list) and len(label) == n:
        return label
    return None


# -- live metrics -------------------------------------------------------------------------------


def _number(v: Any) -> float | None:
    if isinstance(v, bool):
        return None
    if isinstance(v, int | float) and math.isfinite(v):
        return float(v)
    return None


def _scalar(v: Any) -> Any:
    """[x] -> x, [[x]] -> x: a single-valued prediction as its value."""
    while isinstance(v, list) and len(v) == 1:
        v = v[0]
    if isinstance(v, dict) and len(v) == 1:
        return _scalar(next(iter(v.values())))
    return v


def _argmax(v: Any) -> int | None:
    if isinstance(v, dict) and len(v) == 1:
        v = next(iter(v.values()))
    if not isinstance(v, list) or len(v) < 2:
        return None
    nums = [_number(x) for x in v]
    if any(x is None for x in nums):
        return None
    best = max(range(len(nums)), key=lambda i: nums[i])  # type: ignore[arg-type,return-value]
    return best


@dataclass
class Score:
    """Running sums of the comparisons of predictions with their labels."""

    abs_err: float = 0.0
    sq_err: float = 0.0
    regression: int = 0
    correct: int = 0
    classified: int = 0
    unscored: int = 0

    def add(self, prediction: Any, label: Any) -> None:
        p = _scalar(prediction)
        lab = _scalar(label)
        pn, ln = _number(p), _number(lab)
        if isinstance(lab, str | bool):
            if isinstance(p, str | bool):
                self.classified += 1
                self.correct += int(p == lab)
                return
            self.unscored += 1
            return
        if ln is not None and pn is not None:
            self.regression += 1
            self.abs_err += abs(pn - ln)
            self.sq_err += (pn - ln) ** 2
            return
        if isinstance(lab, int) and (k := _argmax(prediction)) is not None:
            self.classified += 1
            self.correct += int(k == lab)
            return
        self.unscored += 1

    def metrics(self) -> dict[str, float]:
        out: dict[str, float] = {}
        if self.regression:
            out["mae"] = self.abs_err / self.regression
            out["mse"] = self.sq_err / self.regression
            out["rmse"] = math.sqrt(self.sq_err / self.regression)
        if self.classified:
            out["accuracy"] = self.correct / self.classified
        return out


def score_request(score: Score, predictions: Any, label: Any) -> None:
    """Add one labelled request's instances to `score` (a label that does not fit the
    request's instances counts as unscored)."""
    if not isinstance(predictions, list) or not predictions:
        score.unscored += 1
        return
    labels = labels_per_instance(label, len(predictions))
    if labels is None:
        score.unscored += len(predictions)
        return
    for p, lab in zip(predictions, labels, strict=True):
        score.add(p, lab)


@dataclass(frozen=True)
class LiveMetrics:
    logged: int  # logged predictions (requests) of the version
    labelled: int  # of them with feedback
    sampled: int  # labelled requests the metric was computed on (the latest ones)
    metrics: dict[str, float] = field(default_factory=dict)
    scored: int = 0  # instances compared
    unscored: int = 0  # instances whose label and prediction could not be compared

    def as_json(self) -> dict[str, Any]:
        return {
            "logged": self.logged,
            "labelled": self.labelled,
            "label_coverage": round(self.labelled / self.logged, 6) if self.logged else None,
            "sampled": self.sampled,
            "scored": self.scored,
            "unscored": self.unscored,
            **{k: round(v, 6) for k, v in self.metrics.items()},
        }


LIVE_METRICS = ("mae", "mse", "rmse", "accuracy")  # what feedback can compute
# how Keras and common trainers name them in their metric lines (final values of a version)
_TRAINED_NAMES = {
    "mae": ("mae", "mean_absolute_error"),
    "mse": ("mse", "mean_squared_error"),
    "rmse": ("rmse", "root_mean_squared_error"),
    "accuracy": ("accuracy", "acc", "sparse_categorical_accuracy", "categorical_accuracy"),
}


def declared_metric(
    gate_metric: str | None, trained: dict[str, Any], live: dict[str, float]
) -> dict[str, Any] | None:
    """The metric a version is judged by, live against trained: its gate's metric when it was
    evaluated on one (`source` "gate"), else the first metric the trainer reported that
    feedback can compute too (`source` "trainer", in LIVE_METRICS order; a `val_` value is
    preferred to the training one). `trained` is the trainer's final value of it (null when
    it reported none, as for a gate metric it did not print), `live` the value from feedback
    (null until labelled predictions compare). None: no such metric."""

    def trained_value(name: str) -> tuple[str | None, float | None]:
        for alias in _TRAINED_NAMES.get(name, (name,)):
            for key in (f"val_{alias}", alias):
                v = trained.get(key)
                if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v):
                    return key, float(v)
        return None, None

    if gate_metric in LIVE_METRICS:
        name, source = gate_metric, "gate"
    else:
        found = [m for m in LIVE_METRICS if trained_value(m)[0] is not None]
        if not found:
            return None
        name, source = found[0], "trainer"
    key, value = trained_value(name)
    return {
        "metric": name,
        "source": source,
        "trained_as": key,
        "trained": value,
        "live": live.get(name),
    }


# -- datasets -----------------------------------------------------------------------------------


def holdout_point(request_id: str) -> float:
    """Where a request falls in [0, 1): it is held out when this is below the fraction."""
    digest = hashlib.sha256(b"stackml-holdout:" + request_id.encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def in_holdout(request_id: str, fraction: float) -> bool:
    return holdout_point(request_id) < fraction


def _flatten(v: Any, out: list[float]) -> bool:
    if isinstance(v, bool):
        out.append(1.0 if v else 0.0)
        return True
    n = _number(v)
    if n is not None:
        out.append(n)
        return True
    if isinstance(v, list):
        return all(_flatten(x, out) for x in v) and len(out) <= MAX_FEATURES
    if isinstance(v, dict):  # named inputs: in the order of their names
        return all(_flatten(v[k], out) for k in sorted(v)) and len(out) <= MAX_FEATURES
    return False


def features(instance: Any) -> list[float] | None:
    """An instance as the numeric feature columns of a CSV row (None: not numeric)."""
    out: list[float] = []
    if not _flatten(instance, out) or not out:
        return None
    return out


def csv_target(label: Any) -> float | None:
    """A per-instance label as the CSV's one target column (None: not a single number)."""
    v = _scalar(label)
    if isinstance(v, bool):
        return 1.0 if v else 0.0
    return _number(v)


def csv_number(v: float) -> str:
    """A number as the CSV writes it (repr: round-trips exactly)."""
    return repr(float(v))


def hour_prefixes(start: datetime, end: datetime, limit: int) -> list[datetime]:
    """The UTC hours from start's hour through end's hour, at most `limit` of them."""
    h = start.astimezone(UTC).replace(minute=0, second=0, microsecond=0)
    last = end.astimezone(UTC)
    out: list[datetime] = []
    while h <= last and len(out) < limit:
        out.append(h)
        h += timedelta(hours=1)
    return out


def hour_path(h: datetime) -> str:
    return h.astimezone(UTC).strftime("%Y/%m/%d/%H/")


__all__ = [
    "LabelError",
    "LiveMetrics",
    "Score",
    "canonical",
    "check_label",
    "check_request_id",
    "csv_target",
    "features",
    "holdout_point",
    "in_holdout",
    "instances_of",
    "label_key",
    "labels_per_instance",
    "predictions_of",
    "score_request",
]
