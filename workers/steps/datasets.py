"""Build a dataset version (the `stackml.build_dataset` task, a dataset_versions.id): join the
model's logged predictions in the version's window with their feedback and write, under
`<project area>datasets/<name>/<version>/`:

    train/part-00000.csv ...     (or .jsonl)  the rows not held out
    holdout/part-00000.csv ...                the rows held out
    manifest.json                             counts, coverage, window, versions, files

One row per instance of a labelled request (a list label: one per instance). csv: the
instance's numeric features (a dict's inputs in the order of their names, lists flattened),
then the label: what the example trainer reads from STACKML_INPUT_DIR, so `train/` is a
job's `inputs.data_uri`. jsonl: one object per instance (request_id, index, version, time,
instance, prediction, label). A request's side is fixed by the hash of its request id
(service/domain/feedback.py in_holdout), the same in every version.

The build holds the version's lease (past the task's hard limit), so a redelivered or
re-driven task finds it held and returns; a build killed mid-way leaves the version
BUILDING, its lease lapses, the index pass re-drives it, and the new build first deletes
what the killed one wrote under the version's prefix (which only builds write: job outputs
may not be under datasets/). Zero labelled rows, or none on the train side, is FAILED with
the reason, never an empty READY dataset.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import IO, Any

from sqlalchemy import func, select

from service.backends.interfaces import ObjectStore
from service.db import datasets as repo
from service.db import serving_index
from service.db.models import (
    Dataset,
    DatasetVersion,
    Feedback,
    LoggedPrediction,
    Model,
    iso,
    utcnow,
)
from service.domain import feedback as dom
from service.domain.errors import StoreError, TransientBackendError
from workers import jobctx

log = logging.getLogger("stackml.worker.datasets")

LEASE = timedelta(seconds=660)  # past the task's hard time limit (600 s)
PAGE = 500  # joined rows read per query
PART_ROWS = 100_000  # rows per part file


class BuildFailed(Exception):
    """Why the version cannot be built (its failure_message)."""


@dataclass
class _Split:
    name: str
    ext: str
    directory: str
    files: list[str] = field(default_factory=list)
    rows: int = 0
    requests: int = 0
    _fh: IO[str] | None = None
    _part_rows: int = 0

    def write(self, line: str, header: str | None) -> None:
        if self._fh is None or self._part_rows >= PART_ROWS:
            self.close()
            name = f"part-{len(self.files):05d}.{self.ext}"
            self.files.append(name)
            self._fh = open(
                os.path.join(self.directory, f"{self.name}-{name}"), "w", encoding="utf-8"
            )
            self._part_rows = 0
            if header is not None:
                self._fh.write(header)
        self._fh.write(line)
        self._part_rows += 1
        self.rows += 1

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None


def run(version_id: str) -> None:
    try:
        vid = int(version_id)
    except ValueError:
        log.warning("build_dataset: %r is not a dataset version id; nothing done", version_id)
        return
    with jobctx.db() as s:
        if not serving_index.claim_build(s, vid, utcnow(), LEASE):
            return  # built already, or another build holds it
        dv = s.get(DatasetVersion, vid)
        assert dv is not None
        ds = s.get(Dataset, dv.dataset_id)
        assert ds is not None
        project, name, number = ds.project_id, ds.name, dv.version
        model = s.scalars(
            select(Model).where(Model.project_id == project, Model.name == dv.model_name)
        ).one_or_none()
        model_id = model.id if model is not None else None
        model_name = dv.model_name
        spec = dict(dv.spec or {})
    store = jobctx.store(project)
    prefix = repo.prefix(store, project, name, number)
    try:
        if model_id is None:
            raise BuildFailed(f"model {model_name!r} no longer exists in this project")
        store.delete_prefix(prefix)  # what a killed earlier build of this version wrote
        manifest = build(store, prefix, model_id, model_name, name, number, spec)
    except BuildFailed as e:
        _cleanup(store, prefix)
        _finish(vid, failure=str(e))
        return
    except TransientBackendError:
        _release(vid)
        raise  # retried by the task (workers/base.py)
    except StoreError as e:
        _cleanup(store, prefix)
        _finish(vid, failure=f"the store refused the dataset's objects under {prefix}: {e}")
        return
    _finish(vid, manifest=manifest)


def _cleanup(store: ObjectStore, prefix: str) -> None:
    try:
        store.delete_prefix(prefix)
    except StoreError as e:
        log.warning("dataset build: could not remove %s: %s", prefix, e)


def _release(vid: int) -> None:
    with jobctx.db() as s:
        dv = s.get(DatasetVersion, vid)
        if dv is not None:
            dv.lease_until = None


def _finish(vid: int, **outcome: Any) -> None:
    with jobctx.db() as s:
        dv = s.get(DatasetVersion, vid)
        if dv is None:
            return
        if repo.finish(s, dv, **outcome):
            dv.lease_until = None
            what = "READY" if outcome.get("failure") is None else f"FAILED: {outcome['failure']}"
            log.info("dataset version %s: %s", vid, what)


def _window(spec: dict[str, Any]) -> tuple[datetime | None, datetime | None]:
    w = spec.get("window") or {}

    def parse(v: Any) -> datetime | None:
        return datetime.fromisoformat(v.replace("Z", "+00:00")) if isinstance(v, str) else None

    return parse(w.get("start")), parse(w.get("end"))


def build(
    store: ObjectStore,
    prefix: str,
    model_id: str,
    model_name: str,
    name: str,
    number: int,
    spec: dict[str, Any],
) -> dict[str, Any]:
    """Write the version's objects and manifest under `prefix`; the manifest."""
    start, end = _window(spec)
    fraction = float(spec.get("holdout_fraction", repo.DEFAULT_HOLDOUT))
    fmt = str(spec.get("format", "csv"))
    lp, fb = LoggedPrediction, Feedback
    in_window = [lp.model_id == model_id]
    if start is not None:
        in_window.append(lp.at >= start)
    if end is not None:
        in_window.append(lp.at <= end)
    with jobctx.db() as s:
        logged = int(s.scalar(select(func.count()).select_from(lp).where(*in_window)) or 0)
    skipped: Counter[str] = Counter()
    versions: set[int] = set()
    labelled = 0
    width: int | None = None
    with tempfile.TemporaryDirectory(prefix="stackml-dataset-") as tmp:
        splits = {
            False: _Split("train", fmt, tmp),
            True: _Split("holdout", fmt, tmp),
        }
        header: str | None = None
        after = 0
        while True:
            with jobctx.db() as s:
                page = s.execute(
                    select(lp.id, lp.request_id, lp.version, lp.at, lp.instances, lp.predictions)
                    .add_columns(fb.label)
                    .join(fb, (fb.model_id == lp.model_id) & (fb.request_id == lp.request_id))
                    .where(*in_window, lp.id > after)
                    .order_by(lp.id)
                    .limit(PAGE)
                ).all()
            if not page:
                break
            after = page[-1][0]
            for _id, rid, version, at, instances, predictions, label in page:
                labelled += 1
                if not isinstance(instances, list) or not instances:
                    skipped["no_instances"] += 1
                    continue
                labels = dom.labels_per_instance(label, len(instances))
                if labels is None:
                    skipped["label_does_not_fit"] += len(instances)
                    continue
                side = splits[dom.in_holdout(rid, fraction)]
                wrote = False
                for i, (inst, lab) in enumerate(zip(instances, labels, strict=True)):
                    if fmt == "csv":
                        feats = dom.features(inst)
                        target = dom.csv_target(lab)
                        if feats is None:
                            skipped["non_numeric_features"] += 1
                            continue
                        if target is None:
                            skipped["non_numeric_label"] += 1
                            continue
                        if width is None:
                            width = len(feats)
                            cols = [f"f{j}" for j in range(width)]
                            header = ",".join([*cols, "label"]) + "\n"
                        if len(feats) != width:
                            skipped["feature_count_differs"] += 1
                            continue
                        line = ",".join(dom.csv_number(v) for v in [*feats, target]) + "\n"
                        side.write(line, header)
                    else:
                        pred = (
                            predictions[i]
                            if isinstance(predictions, list) and len(predictions) == len(instances)
                            else None
                        )
                        obj = {
                            "request_id": rid,
                            "index": i,
                            "version": version,
                            "time": iso(at),
                            "instance": inst,
                            "prediction": pred,
                            "label": lab,
                        }
                        side.write(json.dumps(obj, separators=(",", ":")) + "\n", None)
                    wrote = True
                if wrote:
                    side.requests += 1
                    if version is not None:
                        versions.add(int(version))
        for sp in splits.values():
            sp.close()
        train, holdout = splits[False], splits[True]
        rows = train.rows + holdout.rows
        window = spec.get("window") or {}
        if labelled == 0:
            raise BuildFailed(
                f"no labelled predictions of model {model_name!r} in the window "
                f"{window.get('start') or 'the beginning'} .. {window.get('end')}: "
                f"{logged} logged, none with feedback (POST /v1/models/{model_name}/feedback)"
            )
        if rows == 0:
            raise BuildFailed(
                f"none of the {labelled} labelled predictions of model {model_name!r} gave a "
                f"{fmt} row ({_reasons(skipped)})"
            )
        if train.rows == 0:
            raise BuildFailed(
                f"all {rows} rows fell on the holdout side (holdout_fraction {fraction}); "
                "a dataset needs training rows: add feedback or lower holdout_fraction"
            )
        files: dict[str, list[str]] = {}
        for sp in (train, holdout):
            files[sp.name] = []
            for fname in sp.files:
                key = f"{prefix}{sp.name}/{fname}"
                store.put_file(key, os.path.join(tmp, f"{sp.name}-{fname}"))
                files[sp.name].append(f"{sp.name}/{fname}")
    manifest: dict[str, Any] = {
        "dataset": name,
        "version": number,
        "model": model_name,
        "format": fmt,
        "window": window,
        "holdout_fraction": fraction,
        "holdout": "sha256('stackml-holdout:' + request_id) < holdout_fraction",
        "logged": logged,
        "labelled": labelled,
        "label_coverage": round(labelled / logged, 6) if logged else None,
        "rows": rows,
        "train_rows": train.rows,
        "holdout_rows": holdout.rows,
        "train_requests": train.requests,
        "holdout_requests": holdout.requests,
        "columns": (width + 1) if fmt == "csv" and width is not None else None,
        "skipped": dict(sorted(skipped.items())),
        "versions": sorted(versions),
        "files": files,
        "created_at": iso(utcnow()),
    }
    store.put(f"{prefix}manifest.json", json.dumps(manifest, indent=2).encode() + b"\n")
    return manifest


def _reasons(skipped: Counter[str]) -> str:
    return ", ".join(f"{k}: {v}" for k, v in sorted(skipped.items())) or "no rows"


__all__ = ["BuildFailed", "build", "run"]
