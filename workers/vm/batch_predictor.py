"""stackml batch predictor: runs on a batch prediction job's server, started by the runner
(``runner start``) under the runtime's python, in place of a trainer::

    python batch_predictor.py JOBDIR

It reads JOBDIR/job.json (kind ``batch_prediction``, written by the provision step:
workers/steps/batch.py), then:

1. fetches the input objects into input/ (through their signed URLs; a file already there with
   its size is kept);
2. scans each input for its rows (JSONL: every non-blank line; CSV: every non-blank line but
   a header, which is a first line with a cell that is not a number; TFRecord: every record)
   and cuts them into shards (batch_plan.plan_shards: the shared `service/domain/batch.py`);
3. reads the output prefix's manifest.json: a manifest of another run (its fingerprint: model
   version, format, shard_rows, every input's key and size) stops it; the shards it marks done
   whose results object is in the store, and those whose results object is there although
   the manifest does not say so, are not computed again;
4. if a shard is left to compute: fetches the model version's files (size + md5 checked) into
   model/, loads the SavedModel with TensorFlow (model_server.Version, the same code that
   serves it) and computes each missing shard in `batch_size` batches through
   `serving_default`; a batch the model refuses is predicted row by row, so that one bad row
   costs only itself: it goes to the shard's errors object with its reason. A shard's errors,
   then its results, are each written in one PUT (the store keeps an object whole or not at
   all); then the manifest is rewritten with the shard done. A predictor killed mid-shard
   leaves that shard absent.

Several servers: job.json's ``"workers": W`` and ``"worker": k`` (0 <= k < W; absent: W 1,
k 0) say that this predictor is worker k of W. With W == 1 it is all of the above. With W > 1
every worker still fetches and scans every input (the plan needs every row count) and reads
manifest.json (and its own part, below: the same fingerprint check), but shard n is worker
n % W's (batch_plan.owner): worker k looks in the store for, and computes, only its own
shards. It never writes manifest.json: it writes its part manifest
``manifest.worker-<k:05d>-of-<W:05d>.json`` (batch_plan.part_manifest_name; the manifest's
format, done marks for its own shards only) before computing and after each shard; the export
step merges the W parts into manifest.json. It fetches and loads the model only when it has a
shard to compute; a worker that owns no shard (W > shards) writes its part and exits 0. Its
log lines say "batch worker k/W: ...".

Each run, shard started, shard computed and shard found done is appended to JOBDIR/batch-ledger
("run", "start N", "computed N", "found N"), and a line per shard goes to stdout (the job's
log), with a metric line (shards_done, rows_done: of this worker's shards).
"""

from __future__ import annotations

import base64
import csv
import hashlib
import json
import os
import struct
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

import batch_plan as plan  # noqa: E402 - service/domain/batch.py, shipped next to this file
import model_server as ms  # noqa: E402
import runner  # noqa: E402

MAX_ROW_CHARS = 4096  # of a bad row, in its errors line
MAX_REASON_CHARS = 1000
LEDGER = "batch-ledger"


class BadRow(Exception):
    """A row that cannot become an instance: its reason goes to the errors object."""


# -- reading rows ------------------------------------------------------------------------


def rows_at(path: str, fmt: str, offset: int) -> Iterator[tuple[int, bytes | None]]:
    """(byte offset, raw row) from `offset` on; a raw row of None is a truncated TFRecord."""
    with open(path, "rb") as fh:
        fh.seek(offset)
        if fmt == "tfrecord":
            while True:
                at = fh.tell()
                head = fh.read(12)
                if not head:
                    return
                if len(head) < 12:
                    yield at, None
                    return
                (length,) = struct.unpack("<Q", head[:8])
                data = fh.read(length)
                tail = fh.read(4)
                if len(data) < length or len(tail) < 4:
                    yield at, None
                    return
                yield at, data
        else:
            while True:
                at = fh.tell()
                line = fh.readline()
                if not line:
                    return
                if line.strip():
                    yield at, line.rstrip(b"\r\n")


def _is_number(cell: str) -> bool:
    try:
        float(cell)
    except ValueError:
        return False
    return True


def scan(path: str, fmt: str, shard_rows: int) -> tuple[int, list[int]]:
    """(rows, byte offset of every shard_rows-th row): where each shard of this object starts.
    A CSV's header line (a cell that is not a number) is not a row."""
    count, offsets = 0, []
    first = True
    for at, raw in rows_at(path, fmt, 0):
        if first and fmt == "csv" and raw is not None:
            first = False
            cells = next(csv.reader([raw.decode("utf-8", "replace")]), [])
            if any(not _is_number(c.strip()) for c in cells):
                continue  # the header
        first = False
        if count % shard_rows == 0:
            offsets.append(at)
        count += 1
    return count, offsets


def instance(raw: bytes | None, fmt: str, specs: dict[str, Any]) -> Any:
    """A raw row as a predict instance (what one element of `instances` is), or BadRow."""
    if raw is None:
        raise BadRow("truncated TFRecord: the file ends inside a record")
    if fmt == "jsonl":
        try:
            value = json.loads(raw)
        except (ValueError, RecursionError) as e:
            raise BadRow(f"not JSON: {e}") from e
        if not isinstance(value, list | dict):
            raise BadRow(f"an instance is a JSON list or object, not {type(value).__name__}")
        return value
    if fmt == "csv":
        cells = next(csv.reader([raw.decode("utf-8", "replace")]), [])
        values: list[int | float] = []
        for i, cell in enumerate(cells):
            cell = cell.strip()
            try:
                values.append(int(cell))
            except ValueError:
                try:
                    values.append(float(cell))
                except ValueError as e:
                    raise BadRow(f"column {i}: {cell[:40]!r} is not a number") from e
        return values
    return _example(raw, specs)


def _example(raw: bytes, specs: dict[str, Any]) -> Any:
    """A tf.train.Example record: the serialized bytes for a signature that takes them (one
    string input), else its features by name (one feature to a one-input signature)."""
    if len(specs) == 1:
        spec = next(iter(specs.values()))
        if spec.dtype.name == "string" and spec.shape.rank == 1:
            return {"b64": base64.b64encode(raw).decode()}
    import tensorflow as tf
    from google.protobuf.message import DecodeError

    try:
        ex = tf.train.Example.FromString(raw)
    except DecodeError as e:
        raise BadRow(f"not a tf.train.Example: {e}") from e
    feats: dict[str, Any] = {}
    for name, f in ex.features.feature.items():
        kind = f.WhichOneof("kind")
        if kind == "float_list":
            vals: list[Any] = list(f.float_list.value)
        elif kind == "int64_list":
            vals = list(f.int64_list.value)
        elif kind == "bytes_list":
            vals = [_text_or_b64(b) for b in f.bytes_list.value]
        else:
            vals = []
        feats[name] = vals
    if len(specs) == 1 and len(feats) == 1:
        (spec,) = specs.values()
        (vals,) = feats.values()
        return _shaped(vals, spec)
    missing = sorted(set(specs) - set(feats))
    if missing:
        raise BadRow(f"the example lacks the features {missing}")
    return {n: _shaped(feats[n], specs[n]) for n in specs}


def _shaped(vals: list[Any], spec: Any) -> Any:
    """A feature's values as one row of the input: a scalar for a [batch] input."""
    if spec.shape.rank == 1:
        if len(vals) != 1:
            raise BadRow(f"a scalar input takes 1 value, the example has {len(vals)}")
        return vals[0]
    return vals


def _text_or_b64(b: bytes) -> Any:
    try:
        return b.decode("utf-8")
    except UnicodeDecodeError:
        return {"b64": base64.b64encode(b).decode()}


def _shown(raw: bytes | None, fmt: str) -> str:
    if raw is None:
        return ""
    if fmt == "tfrecord":
        return base64.b64encode(raw[:MAX_ROW_CHARS]).decode()
    return raw.decode("utf-8", "replace")[:MAX_ROW_CHARS]


# -- predicting ----------------------------------------------------------------------------


def predict_rows(
    version: Any, rows: list[tuple[int, Any]]
) -> tuple[dict[int, Any], dict[int, str]]:
    """(index -> prediction, index -> reason): the batch in one call; a refused batch row by
    row, so that only the bad rows fail."""
    if not rows:
        return {}, {}
    try:
        out = ms.predict(version, {"instances": [inst for _, inst in rows]})["predictions"]
        return {i: p for (i, _), p in zip(rows, out, strict=True)}, {}
    except ms.ServingError as e:
        if len(rows) == 1:
            return {}, {rows[0][0]: e.message[:MAX_REASON_CHARS]}
    good: dict[int, Any] = {}
    bad: dict[int, str] = {}
    for row in rows:
        g, b = predict_rows(version, [row])
        good.update(g)
        bad.update(b)
    return good, bad


def compute_shard(
    version: Any,
    specs: dict[str, Any],
    path: str,
    fmt: str,
    offset: int,
    shard: plan.Shard,
    batch_size: int,
) -> tuple[bytes, bytes, int]:
    """(results JSONL, errors JSONL, errors) of one shard, in row order."""
    results: list[bytes] = []
    errors: list[bytes] = []
    pending: list[tuple[int, Any]] = []
    raw_of: dict[int, bytes | None] = {}

    def flush() -> None:
        good, bad = predict_rows(version, pending)
        for i, _ in pending:
            line = None
            if i in good:
                try:
                    line = json.dumps({"index": i, "prediction": good[i]}, allow_nan=False)
                except ValueError:
                    bad[i] = "the prediction is not a finite number"
            if line is not None:
                results.append(line.encode())
            else:
                errors.append(_error_line(i, raw_of[i], fmt, bad[i]))
        pending.clear()
        raw_of.clear()

    index = shard.first_index
    for _, raw in rows_at(path, fmt, offset):
        if index >= shard.first_index + shard.rows:
            break
        try:
            inst = instance(raw, fmt, specs)
        except BadRow as e:
            flush()  # keep the errors in row order
            errors.append(_error_line(index, raw, fmt, str(e)))
        else:
            pending.append((index, inst))
            raw_of[index] = raw
            if len(pending) >= batch_size:
                flush()
        index += 1
    flush()
    body = b"".join(line + b"\n" for line in results)
    return body, b"".join(line + b"\n" for line in errors), len(errors)


def _error_line(index: int, raw: bytes | None, fmt: str, reason: str) -> bytes:
    return json.dumps(
        {"index": index, "row": _shown(raw, fmt), "reason": reason[:MAX_REASON_CHARS]}
    ).encode()


# -- the store -----------------------------------------------------------------------------


class Output:
    """The output prefix through its read and write grants."""

    def __init__(self, grants: dict[str, str]) -> None:
        self.g = grants

    def _url(self, kind: str, name: str) -> str:
        from urllib.parse import quote

        return f"{self.g[kind + '_url_prefix']}{quote(name)}?{self.g[kind + '_query']}"

    def get(self, name: str) -> bytes | None:
        """The object's bytes, None when it is not there."""
        url = self._url("read", name)
        for attempt in range(runner.RETRIES):
            try:
                with urllib.request.urlopen(url, timeout=runner.HTTP_TIMEOUT) as resp:
                    return bytes(resp.read())
            except urllib.error.HTTPError as e:
                if e.code == 404:
                    return None
                if e.code < 500:
                    raise runner.RunnerError(f"GET {name} answered {e.code} {e.reason}") from e
            except (urllib.error.URLError, OSError) as e:
                if attempt == runner.RETRIES - 1:
                    raise runner.RunnerError(f"GET {name} failed: {e}") from e
            time.sleep(0.5 * (attempt + 1))
        raise runner.RunnerError(f"GET {name} failed after {runner.RETRIES} tries")

    def exists(self, name: str) -> bool:
        """Whether the object is in the store (a HEAD: nothing is downloaded)."""
        req = urllib.request.Request(self._url("read", name), method="HEAD")
        for attempt in range(runner.RETRIES):
            try:
                with urllib.request.urlopen(req, timeout=runner.HTTP_TIMEOUT):
                    return True
            except urllib.error.HTTPError as e:
                if e.code == 404:
                    return False
                if e.code < 500:
                    raise runner.RunnerError(f"HEAD {name} answered {e.code} {e.reason}") from e
            except (urllib.error.URLError, OSError) as e:
                if attempt == runner.RETRIES - 1:
                    raise runner.RunnerError(f"HEAD {name} failed: {e}") from e
            time.sleep(0.5 * (attempt + 1))
        raise runner.RunnerError(f"HEAD {name} failed after {runner.RETRIES} tries")

    def put(self, name: str, data: bytes) -> None:
        """One PUT of the whole object, its ETag checked against the bytes' md5."""
        md5 = hashlib.md5(data, usedforsecurity=False).hexdigest()
        with runner._http(
            "PUT",
            self._url("write", name),
            data=data,
            headers={"Content-Type": "application/octet-stream"},
        ) as resp:
            resp.read()
            etag = (resp.headers.get("Etag") or "").strip('"')
        if etag and etag != md5:
            raise runner.RunnerError(f"PUT {name}: etag {etag} != md5 {md5}")


# -- the run -------------------------------------------------------------------------------


def fetch_model(job_dir: str, job: dict) -> str:
    """The model version's files on local disk (size + md5 checked); the model directory."""
    model_dir = os.path.join(job_dir, "model")
    for f in job["model"]["files"]:
        runner._check_rel_path(f["path"])
        target = os.path.join(model_dir, *f["path"].split("/"))
        runner._fetch_verified(f["url"], target, int(f["size"]), str(f["md5"]))
    return model_dir


def fetch_inputs(job_dir: str, job: dict) -> list[str]:
    """The input objects on local disk (one kept when it is there with its size already);
    their local paths in order."""
    paths = []
    for n, item in enumerate(job["inputs"]):
        target = os.path.join(job_dir, "input", f"{n:05d}")
        paths.append(target)
        if os.path.isfile(target) and os.path.getsize(target) == int(item["size"]):
            continue
        os.makedirs(os.path.dirname(target), exist_ok=True)
        with runner._http("GET", item["url"]) as resp, open(target + ".part", "wb") as out:
            while chunk := resp.read(1 << 20):
                out.write(chunk)
        os.replace(target + ".part", target)
    return paths


def _ledger(job_dir: str, line: str) -> None:
    with open(os.path.join(job_dir, LEDGER), "a") as fh:
        fh.write(line + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def worker_of(job: dict) -> tuple[int, int]:
    """(worker, workers) of job.json: this server's index k and the job's server count W
    (absent: 0 and 1, a job.json of one server)."""
    workers, worker = job.get("workers", 1), job.get("worker", 0)
    if type(workers) is not int or workers < 1:
        raise runner.RunnerError(f"job.json: workers is not an integer >= 1: {workers!r:.40}")
    if type(worker) is not int or not 0 <= worker < workers:
        raise runner.RunnerError(
            f"job.json: worker is not an integer in 0..{workers - 1}: {worker!r:.40}"
        )
    return worker, workers


def _marks(raw: bytes, fp: str, what: str) -> dict[int, dict[str, int]]:
    """The done marks of a manifest (or part) this run wrote before; one of another run (its
    fingerprint) stops the predictor."""
    try:
        doc = json.loads(raw)
    except ValueError:
        doc = None
    if not isinstance(doc, dict) or doc.get("fingerprint") != fp:
        raise runner.RunnerError(
            f"the output prefix holds the {what} of another run (another model version, "
            "format, shard_rows or input objects)"
        )
    marks: dict[int, dict[str, int]] = {}
    for sh in doc.get("shards") or []:
        if isinstance(sh, dict) and sh.get("done") is True:
            marks[int(sh["shard"])] = {"rows": int(sh["predicted"]), "errors": int(sh["failed"])}
    return marks


def run(job_dir: str) -> dict:
    with open(os.path.join(job_dir, "job.json")) as fh:
        job = json.load(fh)
    fmt, shard_rows, batch_size = job["format"], int(job["shard_rows"]), int(job["batch_size"])
    worker, workers = worker_of(job)
    who = "batch" if workers == 1 else f"batch worker {worker}/{workers}"
    t0 = time.monotonic()
    _ledger(job_dir, "run")
    # every worker scans every input: the global plan needs every input's row count
    paths = fetch_inputs(job_dir, job)
    scans = [scan(p, fmt, shard_rows) for p in paths]
    shards = plan.plan_shards([n for n, _ in scans], shard_rows)
    fp = plan.fingerprint(job["request"], [[i["key"], int(i["size"])] for i in job["inputs"]])
    out = Output(job["output"])
    total = len(shards)
    mine = [sh for sh in shards if plan.owner(sh.number, workers) == worker]
    # what this predictor writes: the run's manifest, or (W > 1) its worker's part of it
    target = plan.MANIFEST if workers == 1 else plan.part_manifest_name(worker, workers)
    print(
        f"{who}: {sum(n for n, _ in scans)} rows in {len(paths)} input(s), {total} shard(s)"
        + ("" if workers == 1 else f", {len(mine)} of them this worker's")
        + f"; fetched in {time.monotonic() - t0:.1f}s",
        flush=True,
    )
    marked: dict[int, dict[str, int]] = {}
    old = out.get(plan.MANIFEST)
    if old is not None:
        marked.update(_marks(old, fp, "manifest"))
    if workers > 1:
        part = out.get(target)  # this worker's part of an earlier run of the same W
        if part is not None:
            marked.update(_marks(part, fp, "part manifest"))
    done: dict[int, dict[str, int]] = {}
    for sh in mine:  # the other workers' shards are theirs to look at
        results = plan.shard_name(plan.RESULTS, sh.number, total)
        if not out.exists(results):
            continue  # marked done or not, its results are not there: compute it (again)
        if sh.number in marked:
            done[sh.number] = marked[sh.number]
            _ledger(job_dir, f"found {sh.number}")
            continue
        # written after the results object but before the manifest: done by the object
        errs = out.get(plan.shard_name(plan.ERRORS, sh.number, total))
        if errs is not None:
            bad = sum(1 for line in errs.splitlines() if line.strip())
            done[sh.number] = {"rows": sh.rows - bad, "errors": bad}
            _ledger(job_dir, f"found {sh.number}")
    out.put(target, _manifest_bytes(fp, job["request"], shards, done))
    missing = [sh for sh in mine if sh.number not in done]
    if missing:
        print(
            f"{who}: {len(mine) - len(missing)} shard(s) done before, {len(missing)} to compute",
            flush=True,
        )
        t_load = time.monotonic()
        version = ms.Version(0, fetch_model(job_dir, job))
        version.load()
        if version.state != "AVAILABLE":
            raise runner.RunnerError(f"the model does not load: {version.error}")
        fn = version.signatures.get(ms.DEFAULT_SIGNATURE)
        if fn is None:
            raise runner.RunnerError("the model has no serving_default signature")
        specs = ms.input_specs(fn)
        print(f"{who}: model loaded in {time.monotonic() - t_load:.3f}s", flush=True)
    for sh in missing:
        t1 = time.monotonic()
        _ledger(job_dir, f"start {sh.number}")
        offset = scans[sh.source][1][sh.start // shard_rows]
        body, errors, bad = compute_shard(
            version, specs, paths[sh.source], fmt, offset, sh, batch_size
        )
        out.put(plan.shard_name(plan.ERRORS, sh.number, total), errors)
        out.put(plan.shard_name(plan.RESULTS, sh.number, total), body)
        _ledger(job_dir, f"computed {sh.number}")
        done[sh.number] = {"rows": sh.rows - bad, "errors": bad}
        out.put(target, _manifest_bytes(fp, job["request"], shards, done))
        took = max(time.monotonic() - t1, 1e-6)
        print(
            f"{who}: shard {sh.number + 1}/{total}: {sh.rows} rows, {bad} failed, "
            f"{took:.3f}s, {sh.rows / took:.0f} rows/s",
            flush=True,
        )
        print(
            json.dumps(
                {
                    "stackml_metric": 1,
                    "step": len(done),
                    "shards_done": len(done),
                    "rows_done": sum(d["rows"] + d["errors"] for d in done.values()),
                }
            ),
            flush=True,
        )
    rows = sum(d["rows"] + d["errors"] for d in done.values())
    failed = sum(d["errors"] for d in done.values())
    if workers == 1:
        print(f"batch: done: {rows} rows, {failed} failed, {total} shard(s)", flush=True)
        return {"ok": True, "rows": rows, "errors": failed, "shards": total}
    print(
        f"{who}: done: {rows} rows, {failed} failed, {len(mine)} of {total} shard(s)",
        flush=True,
    )
    return {
        "ok": True,
        "rows": rows,
        "errors": failed,
        "shards": total,
        "worker": worker,
        "workers": workers,
        "worker_shards": len(mine),
    }


def _manifest_bytes(
    fp: str, request: dict, shards: list[plan.Shard], done: dict[int, dict[str, int]]
) -> bytes:
    return json.dumps(plan.manifest(fp, request, shards, done), indent=1).encode()


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        sys.stderr.write("usage: batch_predictor.py JOBDIR\n")
        return 2
    try:
        runner._emit(run(os.path.abspath(argv[0])))
    except runner.RunnerError as e:
        sys.stderr.write(f"stackml-batch: {e}\n")
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
