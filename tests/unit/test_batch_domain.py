"""Batch prediction's pure logic (service/domain/batch.py): formats from names, the shard plan
(by object, by row ranges, in input order), shard names, the manifest and its checks; shards
dealt over several servers, the workers' part manifests and their merge (missing, forged,
foreign or malformed parts refused); and the job spec's split between training and batch
prediction fields."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from service.domain import batch as dom
from service.domain.spec import JobSpec, stored, type_problems, unbuilt_fields

PRED = {
    "model": "demo",
    "input_uris": ["local://projects/p/data/rows.jsonl"],
    "output_prefix": "local://projects/p/predictions/run1/",
}
TRAINER = {"package_uri": "local://projects/p/staging/x/pkg.tar.gz", "module": "trainer.task"}


def batch_spec(**over: Any) -> dict[str, Any]:
    pred = {**PRED, **over.pop("prediction", {})}
    return {"name": "b", "type": "batch_prediction", "prediction": pred, **over}


def fields_of(e: ValidationError) -> list[str]:
    return [".".join(str(p) for p in err["loc"]) for err in e.errors()]


# -- formats ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("uris", "given", "want", "problem"),
    [
        (["a/x.jsonl", "a/y.ndjson"], None, "jsonl", None),
        (["a/x.JSON"], None, "jsonl", None),
        (["a/x.csv"], None, "csv", None),
        (["a/x.tfrecord", "a/y.tfr"], None, "tfrecord", None),
        (["a/x.csv", "a/y.jsonl"], None, None, "different formats"),
        (["a/dir/"], None, None, "cannot tell"),
        (["a/x.parquet"], None, None, "cannot tell"),
        (["a/dir/", "a/x.bin"], "csv", "csv", None),
    ],
)
def test_format_is_given_or_inferred_from_every_name(uris, given, want, problem):
    fmt, why = dom.infer_format(uris, given)
    assert fmt == want
    assert (why is None) if problem is None else (problem in str(why))


# -- the plan ---------------------------------------------------------------------------------


def test_shards_cut_each_object_by_rows_in_input_order():
    shards = dom.plan_shards([5, 0, 3], 2)
    assert [(s.source, s.start, s.end, s.first_index) for s in shards] == [
        (0, 0, 2, 0),
        (0, 2, 4, 2),
        (0, 4, 5, 4),
        (2, 0, 2, 5),
        (2, 2, 3, 7),
    ]
    assert [s.number for s in shards] == list(range(5))
    assert dom.plan_shards([], 10) == [] and dom.plan_shards([0, 0], 10) == []
    with pytest.raises(ValueError, match="shard_rows"):
        dom.plan_shards([1], 0)
    with pytest.raises(ValueError, match="raise prediction.shard_rows"):
        dom.plan_shards([dom.MAX_SHARDS + 1], 1)


@given(st.lists(st.integers(0, 50), max_size=8), st.integers(1, 20))
def test_shards_cover_every_row_once_in_order(counts, shard_rows):
    shards = dom.plan_shards(counts, shard_rows)
    covered = [(s.source, r) for s in shards for r in range(s.start, s.end)]
    assert covered == [(src, r) for src, n in enumerate(counts) for r in range(n)]
    index = [s.first_index + k for s in shards for k in range(s.rows)]
    assert index == list(range(sum(counts)))
    assert all(0 < s.rows <= shard_rows for s in shards)


def test_shard_names():
    assert dom.shard_name(dom.RESULTS, 3, 12) == "prediction.results-00003-of-00012"
    assert dom.shard_name(dom.ERRORS, 0, 1) == "prediction.errors-00000-of-00001"


def test_fingerprint_changes_with_the_request_and_the_inputs():
    req = {"model": "m", "version": 1}
    a = dom.fingerprint(req, [("k", 10)])
    assert a == dom.fingerprint(dict(req), [("k", 10)])
    assert a != dom.fingerprint({**req, "version": 2}, [("k", 10)])
    assert a != dom.fingerprint(req, [("k", 11)])
    assert len(a) == 64


# -- the manifest -----------------------------------------------------------------------------


def _manifest(done: dict[int, dict[str, int]]) -> dict[str, Any]:
    shards = dom.plan_shards([3, 2], 2)
    return json.loads(json.dumps(dom.manifest("f" * 64, {"r": 1}, shards, done)))


def test_a_manifest_reads_back_its_counts():
    done = {0: {"rows": 2, "errors": 0}, 1: {"rows": 0, "errors": 1}, 2: {"rows": 1, "errors": 1}}
    s = dom.read_manifest(_manifest(done))
    assert (s.shards, s.done, s.rows, s.errors) == (3, 3, 5, 2)
    assert s.objects[:2] == (
        "prediction.results-00000-of-00003",
        "prediction.errors-00000-of-00003",
    )
    partial = dom.read_manifest(_manifest({1: {"rows": 1, "errors": 0}}))
    assert (partial.done, partial.rows) == (1, 1)


@pytest.mark.parametrize(
    ("change", "why"),
    [
        (lambda d: d.update(fingerprint=1), "fingerprint"),
        (lambda d: d["shards"].reverse(), "out of order"),
        (lambda d: d["shards"][1].update(first_index=0), "do not follow"),
        (lambda d: d["shards"][0].update(results="../x"), "object names"),
        (lambda d: d["shards"][0].update(predicted=7), "add up"),
        (lambda d: d["shards"][0].update(failed=-1), "non-negative"),
        (lambda d: d.update(shards="x"), "not a list"),
    ],
)
def test_a_forged_manifest_is_refused(change, why):
    doc = _manifest({0: {"rows": 2, "errors": 0}})
    change(doc)
    with pytest.raises(dom.ManifestInvalid, match=why):
        dom.read_manifest(doc)
    with pytest.raises(dom.ManifestInvalid):
        dom.read_manifest([])


def test_only_a_runs_own_objects_can_be_resumed():
    own = ["manifest.json", "prediction.results-00000-of-00002", "prediction.errors-00001-of-00002"]
    assert dom.foreign(own) == []
    assert dom.foreign([*own, "model/saved_model.pb"]) == ["model/saved_model.pb"]
    # the workers' part manifests of a run over several servers are its own too
    parts = [dom.part_manifest_name(0, 2), "manifest.worker-00001-of-00002.json"]
    assert dom.foreign([*own, *parts]) == []
    odd = [
        "manifest.worker-x.json",
        "manifest.worker-00002-of-00002.json",  # no worker 2 of 2
        "manifest.worker-00001-of-00002.json.bak",
        "manifest.worker-1-of-2.json",
    ]
    assert dom.foreign([*own, *odd]) == odd


# -- several servers: owners, part manifests, the merge ----------------------------------------


def test_shards_are_dealt_round_robin_over_the_workers():
    assert [dom.owner(n, 1) for n in range(4)] == [0, 0, 0, 0]
    assert [dom.owner(n, 3) for n in range(7)] == [0, 1, 2, 0, 1, 2, 0]
    with pytest.raises(ValueError):
        dom.owner(1, 0)
    with pytest.raises(ValueError):
        dom.owner(-1, 2)


@given(st.integers(0, 500), st.integers(1, 64))
def test_every_shard_has_exactly_one_owner(shards, workers):
    owned = [[n for n in range(shards) if dom.owner(n, workers) == k] for k in range(workers)]
    assert sorted(n for mine in owned for n in mine) == list(range(shards))
    assert max(map(len, owned)) - min(map(len, owned)) <= 1  # dealt evenly


def test_part_manifest_names():
    assert dom.part_manifest_name(2, 4) == "manifest.worker-00002-of-00004.json"
    assert dom.part_manifest_name(0, 1).startswith(dom.PART_PREFIX)
    assert dom.is_part_name(dom.part_manifest_name(63, 64))
    assert not dom.is_part_name(dom.MANIFEST)
    for bad in [(4, 4), (-1, 4), (0, 0)]:
        with pytest.raises(ValueError):
            dom.part_manifest_name(*bad)


SHARDS = dom.plan_shards([3, 4], 2)  # 4 shards: 2, 1, 2, 2 rows
FP = "a" * 64
REQUEST = {"model": "m", "version": 1}
COUNTS = {0: {"rows": 2, "errors": 0}, 1: {"rows": 0, "errors": 1}}
COUNTS |= {2: {"rows": 1, "errors": 1}, 3: {"rows": 2, "errors": 0}}


def _part(worker: int, workers: int, *, fp: str = FP) -> dict[str, Any]:
    """Worker `worker`'s part manifest once all its shards are done, as JSON reads it back."""
    mine = {n: c for n, c in COUNTS.items() if dom.owner(n, workers) == worker}
    return json.loads(json.dumps(dom.manifest(fp, REQUEST, SHARDS, mine)))


def test_the_parts_merge_into_the_manifest_one_server_writes():
    one = json.loads(json.dumps(dom.manifest(FP, REQUEST, SHARDS, COUNTS)))
    for workers in (1, 2, 3, 4, 6):
        parts: dict[int, object] = {k: _part(k, workers) for k in range(workers)}
        merged = dom.merge_parts(parts, workers)
        assert merged == one, workers
        s = dom.read_manifest(merged)
        assert (s.shards, s.done, s.rows, s.errors) == (4, 4, 7, 2)
    # a part whose worker has not finished: its shards are not done in the merge
    parts = {0: _part(0, 2), 1: json.loads(json.dumps(dom.manifest(FP, REQUEST, SHARDS, {})))}
    merged = dom.merge_parts(parts, 2)
    assert [sh["done"] for sh in merged["shards"]] == [True, False, True, False]
    assert dom.read_manifest(merged).done == 2


def test_a_missing_part_is_named():
    with pytest.raises(dom.ManifestInvalid, match=r"worker 1 of 3 \(manifest.worker-00001"):
        dom.merge_parts({0: _part(0, 3), 2: _part(2, 3)}, 3)
    with pytest.raises(dom.ManifestInvalid, match="worker 5"):
        dom.merge_parts({0: _part(0, 2), 1: _part(1, 2), 5: _part(0, 2)}, 2)


def test_a_part_marking_another_workers_shard_done_is_refused():
    parts: dict[int, object] = {0: _part(0, 2), 1: _part(1, 2)}
    forged = _part(0, 2)
    forged["shards"][1].update(done=True, predicted=0, failed=1)  # shard 1 is worker 1's
    parts[0] = forged
    with pytest.raises(dom.ManifestInvalid, match="part 0 marks shard 1 done, which worker 1 owns"):
        dom.merge_parts(parts, 2)


def test_parts_of_different_runs_do_not_merge():
    with pytest.raises(dom.ManifestInvalid, match="part 1's fingerprint"):
        dom.merge_parts({0: _part(0, 2), 1: _part(1, 2, fp="b" * 64)}, 2)
    other = _part(1, 2)
    other["request"] = {**REQUEST, "version": 2}
    with pytest.raises(dom.ManifestInvalid, match="part 1's request"):
        dom.merge_parts({0: _part(0, 2), 1: other}, 2)
    # other inputs under the same fingerprint: as many shards, other rows (nothing done yet)
    replanned = json.loads(json.dumps(dom.manifest(FP, REQUEST, dom.plan_shards([4, 3], 2), {})))
    with pytest.raises(dom.ManifestInvalid, match="part 1's shards"):
        dom.merge_parts({0: _part(0, 2), 1: replanned}, 2)


@pytest.mark.parametrize(
    ("change", "why"),
    [
        (lambda d: d.update(fingerprint="short"), "fingerprint"),
        (lambda d: d["shards"][3].update(predicted=9), "add up"),
        (lambda d: d["shards"][0].update(results="../../x"), "object names"),
        (lambda d: d["shards"].pop(), None),
    ],
)
def test_a_malformed_part_is_refused(change, why):
    bad = _part(1, 2)
    change(bad)
    with pytest.raises(dom.ManifestInvalid, match=why or "part 1"):
        dom.merge_parts({0: _part(0, 2), 1: bad}, 2)
    junks: list[object] = [[], "x", None]
    for junk in junks:
        with pytest.raises(dom.ManifestInvalid, match="part 1"):
            dom.merge_parts({0: _part(0, 2), 1: junk}, 2)


# -- the spec: which fields belong to which type ----------------------------------------------


def test_a_batch_spec_and_its_defaults():
    spec = JobSpec.model_validate(batch_spec())
    pred = spec.predicting()
    assert (pred.batch_size, pred.max_workers, pred.shard_rows) == (64, 1, 10_000)
    assert pred.version is None and pred.label is None and pred.format is None
    assert type_problems(spec) == [] and unbuilt_fields(spec) == []
    data = stored(spec)
    assert "trainer" not in data and "inputs" not in data and "output" not in data
    assert JobSpec.model_validate(data) == spec  # what GET shows can be submitted again
    with pytest.raises(ValueError, match="no trainer"):
        spec.training()


@pytest.mark.parametrize(
    ("over", "field"),
    [
        ({"trainer": TRAINER}, "trainer"),
        ({"inputs": {"data_uri": "local://projects/p/data/"}}, "inputs"),
        ({"output": {"model_uri": "local://projects/p/models/x/"}}, "output"),
        ({"output": {"register_as": "m"}}, "output"),
        ({"hyperparameters": {"epochs": 1}}, "hyperparameters"),
    ],
)
def test_a_training_field_on_a_batch_job_is_named(over, field):
    with pytest.raises(ValidationError) as e:
        JobSpec.model_validate(batch_spec(**over))
    assert fields_of(e.value) == [field]
    assert "training field" in str(e.value)


def test_the_sections_each_type_needs_and_refuses():
    with pytest.raises(ValidationError) as e:
        JobSpec.model_validate({"name": "b", "type": "batch_prediction"})
    assert fields_of(e.value) == ["prediction"]
    with pytest.raises(ValidationError) as e:
        JobSpec.model_validate({"name": "t"})
    assert fields_of(e.value) == ["trainer"]
    with pytest.raises(ValidationError) as e:
        JobSpec.model_validate({"name": "t", "trainer": TRAINER, "prediction": PRED})
    assert fields_of(e.value) == ["prediction"]
    # a stored training spec repeats no batch field, and the defaults of its own are fine
    train = JobSpec.model_validate({"name": "t", "trainer": TRAINER})
    assert "prediction" not in stored(train)
    explicit = batch_spec(inputs={"data_uri": None}, output={}, hyperparameters={})
    assert type_problems(JobSpec.model_validate(explicit)) == []


@pytest.mark.parametrize(
    ("pred", "field"),
    [
        ({"version": 1, "label": "default"}, "prediction"),
        ({"version": 0}, "prediction.version"),
        ({"input_uris": []}, "prediction.input_uris"),
        ({"input_uris": ["http://x/y.csv"]}, "prediction.input_uris.0"),
        ({"input_uris": ["local://projects/p/../q/x.csv"]}, "prediction.input_uris"),
        ({"format": "parquet"}, "prediction.format"),
        ({"batch_size": 0}, "prediction.batch_size"),
        ({"model": "Bad Name"}, "prediction.model"),
        ({"label": "UP"}, "prediction.label"),
        ({"surprise": 1}, "prediction.surprise"),
    ],
)
def test_bad_prediction_fields_are_named(pred, field):
    with pytest.raises(ValidationError) as e:
        JobSpec.model_validate(batch_spec(prediction=pred))
    assert any(f.startswith(field) for f in fields_of(e.value)), fields_of(e.value)


def test_several_workers_are_accepted():
    spec = JobSpec.model_validate(batch_spec(prediction={"max_workers": 4}))
    assert spec.predicting().max_workers == 4 and unbuilt_fields(spec) == []
