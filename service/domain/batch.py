"""Batch prediction's pure logic: input formats, the shard plan, shard names, the manifest.

Stdlib only and no I/O: the provision step ships this file next to the batch predictor
(`workers/vm/batch_predictor.py`), which imports it on the server as `batch_plan`, so that the
worker, the API and the server agree on one plan and one manifest format.

A job's inputs are objects (an input URI naming a prefix stands for the objects under it, in
key order), taken in the order the spec lists them; their rows are numbered 0.. across all of
them in that order (the row's *index*). The plan cuts each object into row ranges of at most
`shard_rows` rows; a shard never spans two objects. Shard i of N writes
`prediction.results-<i:05d>-of-<N:05d>` (one JSONL line per good row, in row order:
``{"index": i, "prediction": ...}``) and `prediction.errors-<i:05d>-of-<N:05d>` (one line per
bad row: ``{"index", "row", "reason"}``), each in one PUT, so a shard is either complete in the
store or absent. `manifest.json` lists the shards and which are done; the results object's
presence is what makes a shard done (the manifest is rewritten after each shard, so a
predictor killed between the PUT and the rewrite finds the shard done by the object).

Several servers (`prediction.max_workers` W > 1): every worker k (0 <= k < W, job.json's
`worker` and `workers`) scans every input and computes the same global plan, but shard n
belongs to worker `owner(n, W) == n % W` only. Worker k computes its own missing shards and
never writes manifest.json: it writes its *part manifest* `part_manifest_name(k, W)`
(`manifest.worker-<k:05d>-of-<W:05d>.json`, the manifest's format, done marks for its own
shards only). The export step merges the W parts (`merge_parts`: every part checked, all of
one run, each marking only its own shards done) into manifest.json. With W == 1 the one
predictor writes manifest.json itself, and no part exists.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

FORMATS = ("jsonl", "csv", "tfrecord")
EXTENSIONS = {
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "jsonl",
    ".csv": "csv",
    ".tfrecord": "tfrecord",
    ".tfrecords": "tfrecord",
    ".tfr": "tfrecord",
}
MANIFEST = "manifest.json"
PART_PREFIX = "manifest.worker-"  # a worker's part manifest (W > 1): part_manifest_name
RESULTS = "prediction.results"
ERRORS = "prediction.errors"
MAX_SHARDS = 99_999  # five digits in the names
MANIFEST_VERSION = 1


def format_of(uri: str) -> str | None:
    """The format an object's extension names (a trailing .gz is not read), or None."""
    name = uri.rsplit("/", 1)[-1].lower()
    for ext, fmt in EXTENSIONS.items():
        if name.endswith(ext):
            return fmt
    return None


def infer_format(uris: list[str], given: str | None) -> tuple[str | None, str | None]:
    """(format, problem): the given format, else the one every input's extension names.
    A prefix (ending in '/') or an unknown extension needs an explicit `format`; inputs whose
    extensions disagree too."""
    if given is not None:
        return given, None
    found: set[str] = set()
    for uri in uris:
        fmt = None if uri.endswith("/") else format_of(uri)
        if fmt is None:
            return None, (
                f"cannot tell the format of {uri} from its name; give prediction.format "
                f"({', '.join(FORMATS)})"
            )
        found.add(fmt)
    if len(found) > 1:
        return None, (
            f"the inputs' names say different formats ({', '.join(sorted(found))}); one job "
            "reads one format: give prediction.format or split the job"
        )
    return found.pop(), None


@dataclass(frozen=True)
class Shard:
    """Rows [start, end) of input object `source` (its position in the job's object list);
    `first_index` is the global index of its first row."""

    number: int
    source: int
    start: int
    end: int
    first_index: int

    @property
    def rows(self) -> int:
        return self.end - self.start


def plan_shards(counts: list[int], shard_rows: int) -> list[Shard]:
    """Cut objects of `counts` rows each into shards of at most `shard_rows` rows, in input
    order. An empty object has no shard; no rows at all is no shard."""
    if shard_rows < 1:
        raise ValueError("shard_rows must be >= 1")
    shards: list[Shard] = []
    index = 0
    for source, n in enumerate(counts):
        if n < 0:
            raise ValueError(f"input {source} has a negative row count")
        for start in range(0, n, shard_rows):
            end = min(n, start + shard_rows)
            shards.append(Shard(len(shards), source, start, end, index + start))
        index += n
    if len(shards) > MAX_SHARDS:
        raise ValueError(
            f"{len(shards)} shards is more than {MAX_SHARDS}: raise prediction.shard_rows"
        )
    return shards


def owner(number: int, workers: int) -> int:
    """The worker (0..workers-1) that computes shard `number`: shards are dealt round-robin."""
    if workers < 1:
        raise ValueError("workers must be >= 1")
    if number < 0:
        raise ValueError("a shard number is >= 0")
    return number % workers


def part_manifest_name(worker: int, workers: int) -> str:
    """`manifest.worker-00002-of-00004.json`: worker 2 of 4's part manifest."""
    if not 0 <= worker < workers:
        raise ValueError(f"worker {worker} is not one of 0..{workers - 1}")
    return f"{PART_PREFIX}{worker:05d}-of-{workers:05d}.json"


def is_part_name(name: str) -> bool:
    """Whether `name` (relative to the output prefix) is a worker's part manifest."""
    if not (name.startswith(PART_PREFIX) and name.endswith(".json")):
        return False
    k, sep, w = name[len(PART_PREFIX) : -len(".json")].partition("-of-")
    return bool(sep) and len(k) == len(w) == 5 and k.isdigit() and w.isdigit() and int(k) < int(w)


def shard_name(kind: str, number: int, total: int) -> str:
    """`prediction.results-00003-of-00010` (kind: RESULTS or ERRORS)."""
    return f"{kind}-{number:05d}-of-{total:05d}"


def fingerprint(request: dict[str, Any], inputs: list[tuple[str, int]]) -> str:
    """What makes two runs the same run: the model version, the formats and sizes the plan
    depends on, and every input object (key, size) in order. A re-run resumes only a
    manifest with the same fingerprint."""
    doc = {"request": request, "inputs": inputs}
    text = json.dumps(doc, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def manifest(
    fp: str,
    request: dict[str, Any],
    shards: list[Shard],
    done: dict[int, dict[str, int]],
) -> dict[str, Any]:
    """The manifest document: the run's fingerprint and request, and per shard its names,
    rows, and once done its counts (`done`: shard number -> {"rows", "errors"})."""
    total = len(shards)
    return {
        "version": MANIFEST_VERSION,
        "fingerprint": fp,
        "request": request,
        "shards": [
            {
                "shard": sh.number,
                "source": sh.source,
                "start": sh.start,
                "end": sh.end,
                "first_index": sh.first_index,
                "results": shard_name(RESULTS, sh.number, total),
                "errors": shard_name(ERRORS, sh.number, total),
                "done": sh.number in done,
                **(
                    {"predicted": done[sh.number]["rows"], "failed": done[sh.number]["errors"]}
                    if sh.number in done
                    else {}
                ),
            }
            for sh in shards
        ],
    }


class ManifestInvalid(ValueError):
    """A manifest.json that is not one stackml wrote (or was changed since)."""


def _int(v: object, what: str) -> int:
    if type(v) is not int or v < 0:
        raise ManifestInvalid(f"{what} is not a non-negative integer: {v!r:.40}")
    return v


@dataclass(frozen=True)
class Summary:
    """What a run's manifest says: shards, done shards, the rows of the done shards, of which
    `errors` failed, and the object names every shard must have in the store."""

    fingerprint: str
    shards: int
    done: int
    rows: int
    errors: int
    objects: tuple[str, ...]


def read_manifest(doc: object) -> Summary:
    """A manifest's summary, every field checked (the server that wrote it runs a SavedModel's
    graph, which can write files: nothing in it is taken on trust)."""
    if not isinstance(doc, dict):
        raise ManifestInvalid("the manifest is not a JSON object")
    fp = doc.get("fingerprint")
    if not isinstance(fp, str) or len(fp) != 64:
        raise ManifestInvalid("the manifest has no fingerprint")
    shards = doc.get("shards")
    if not isinstance(shards, list) or len(shards) > MAX_SHARDS:
        raise ManifestInvalid(f"the manifest's shards are not a list of at most {MAX_SHARDS}")
    total = len(shards)
    done = rows = errors = 0
    objects: list[str] = []
    expect_index = 0
    for n, sh in enumerate(shards):
        if not isinstance(sh, dict) or sh.get("shard") != n:
            raise ManifestInvalid(f"shard {n} is missing or out of order")
        start, end = _int(sh.get("start"), "start"), _int(sh.get("end"), "end")
        if end <= start or _int(sh.get("first_index"), "first_index") != expect_index:
            raise ManifestInvalid(f"shard {n}'s rows do not follow the previous shard's")
        expect_index += end - start
        names = (shard_name(RESULTS, n, total), shard_name(ERRORS, n, total))
        if (sh.get("results"), sh.get("errors")) != names:
            raise ManifestInvalid(f"shard {n}'s object names are not {names}")
        objects.extend(names)
        if sh.get("done") is True:
            ok, bad = _int(sh.get("predicted"), "predicted"), _int(sh.get("failed"), "failed")
            if ok + bad != end - start:
                raise ManifestInvalid(f"shard {n}'s counts do not add up to its rows")
            done += 1
            rows += end - start
            errors += bad
    return Summary(fp, total, done, rows, errors, tuple(objects))


def foreign(names: list[str]) -> list[str]:
    """The names (relative to an output prefix) that are not a batch run's own objects (the
    manifest, the workers' part manifests, the shards): a prefix holding none of these can be
    resumed by a re-run of the same request."""
    own = (RESULTS + "-", ERRORS + "-")
    return [n for n in names if n != MANIFEST and not n.startswith(own) and not is_part_name(n)]


_LAYOUT = ("shard", "source", "start", "end", "first_index", "results", "errors")


def merge_parts(docs: dict[int, object], workers: int) -> dict[str, Any]:
    """The manifest of a run over `workers` servers from their part manifests (`docs`: worker
    -> its parsed part): every part checked as `read_manifest` checks a manifest, all of one
    run (the same fingerprint, request and shards), each marking done only the shards its
    worker owns; the merged document marks a shard done as its owner's part does, and
    `read_manifest` accepts it. Any part missing, malformed or disagreeing: ManifestInvalid."""
    if type(workers) is not int or workers < 1:
        raise ValueError("workers must be >= 1")
    extra = sorted(k for k in docs if not (type(k) is int and 0 <= k < workers))
    if extra:
        raise ManifestInvalid(f"a part of worker {extra[0]!r}, not one of 0..{workers - 1}")
    for k in range(workers):
        if k not in docs:
            raise ManifestInvalid(
                f"the part manifest of worker {k} of {workers} "
                f"({part_manifest_name(k, workers)}) is missing"
            )
    parts: list[dict[str, Any]] = []
    for k in range(workers):
        doc = docs[k]
        try:
            read_manifest(doc)
        except ManifestInvalid as e:
            raise ManifestInvalid(f"part {k} ({part_manifest_name(k, workers)}): {e}") from e
        if not isinstance(doc, dict):  # read_manifest refused it already
            raise ManifestInvalid(f"part {k} is not a JSON object")
        parts.append(doc)
    first = parts[0]
    layout = [tuple(sh.get(f) for f in _LAYOUT) for sh in first["shards"]]
    for k, doc in enumerate(parts[1:], start=1):
        if doc.get("fingerprint") != first.get("fingerprint"):
            raise ManifestInvalid(f"part {k}'s fingerprint is not part 0's: another run")
        if doc.get("request") != first.get("request"):
            raise ManifestInvalid(f"part {k}'s request is not part 0's: another run")
        if [tuple(sh.get(f) for f in _LAYOUT) for sh in doc["shards"]] != layout:
            raise ManifestInvalid(f"part {k}'s shards are not part 0's")
    merged: list[dict[str, Any]] = []
    for n, entry in enumerate(layout):
        j = owner(n, workers)
        for k, doc in enumerate(parts):
            if k != j and doc["shards"][n].get("done") is True:
                raise ManifestInvalid(f"part {k} marks shard {n} done, which worker {j} owns")
        sh = parts[j]["shards"][n]
        done = sh.get("done") is True
        merged.append(
            {
                **dict(zip(_LAYOUT, entry, strict=True)),
                "shard": n,
                "done": done,
                **({"predicted": sh["predicted"], "failed": sh["failed"]} if done else {}),
            }
        )
    return {
        "version": MANIFEST_VERSION,
        "fingerprint": first["fingerprint"],
        "request": first.get("request"),
        "shards": merged,
    }
