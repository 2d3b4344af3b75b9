"""The closed loop's database work on a real PostgreSQL, with the local store: index passes
racing in threads index each serving-log object and each request exactly once; a pass killed
mid-object (its transaction rolled back) loses nothing and the next pass indexes it; two
feedback posts of one request id at once create it once; a dataset's rows are the logged
instances with their labels, the holdout side of each request is the same in every version,
and the example trainer itself reads the train/ CSV (in the TensorFlow runtime)."""

from __future__ import annotations

import json
import subprocess
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select

from service.backends.storage.local import LocalStore
from service.config import Settings
from service.db import datasets as ds_repo
from service.db import feedback as fb_repo
from service.db import registry
from service.db import serving_index as index_repo
from service.db.migrate import upgrade
from service.db.models import Endpoint, Feedback, LoggedPrediction, ServingLogObject
from service.db.session import session_scope
from service.domain import feedback as dom
from service.serving_log import Record, ServingLog
from tests.pgutil import temp_database
from tests.registryutil import runtime_python
from workers import jobctx
from workers.steps import datasets as build_step
from workers.steps import serving_index

P = "proj-loop"
T0 = datetime(2026, 12, 1, 10, 0, tzinfo=UTC)
EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "keras_regression"


@pytest.fixture
def pg() -> Iterator[str]:
    with temp_database("feedback") as url:
        upgrade(url)
        yield url


@pytest.fixture
def env(pg: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Settings, LocalStore]:
    settings = Settings(database_url=pg, data_dir=tmp_path, secret_key="feedback")
    st = LocalStore(tmp_path / "store", "http://127.0.0.1:9", settings.signing_key())
    monkeypatch.setattr(jobctx, "settings", lambda: settings)
    monkeypatch.setattr(jobctx, "store", lambda project_id=None, trust_id=None: st)
    with session_scope(pg) as s:
        m = registry.ensure_model(s, P, "demo", by="tester")
        m.created_at = T0 - timedelta(hours=1)
        s.add(
            Endpoint(
                id="ep-loop00000001",
                project_id=P,
                model_id=m.id,
                state="READY",
                replicas=1,
                flavor="local.small",
                created_by="tester",
                target_label="default",
                log_sample_rate=1.0,
                created_at=T0 - timedelta(hours=1),  # the first listing starts here
            )
        )
    return settings, st


def _log(st: LocalStore, n: int, *, objects: int, start: int = 0, base: datetime = T0) -> list[str]:
    """n predictions y = 2*x0 + x1 of version 1, written by the real ServingLog in `objects`
    batches spread over two hours."""
    rids = []
    per = max(1, n // objects)
    for b in range(objects):
        slog = ServingLog(lambda _p: st, batch_records=10_000, batch_seconds=0.05)
        for i in range(start + b * per, start + min(n, (b + 1) * per)):
            rid = f"req-{i:04d}"
            rids.append(rid)
            x = [float(i), float(i % 7)]
            slog.record(
                Record(
                    project_id=P,
                    model="demo",
                    version=1,
                    endpoint="ep-loop00000001",
                    request_id=rid,
                    at=(base + timedelta(minutes=b * 120 // objects, seconds=i % 60)).timestamp(),
                    caller="c",
                    status=200,
                    latency_ms=1.0,
                    request=json.dumps({"instances": [x]}).encode(),
                    response=json.dumps({"predictions": [[2 * x[0] + x[1]]]}).encode(),
                )
            )
        slog.close(10)
    return rids


def _count(pg: str, model: Any) -> int:
    with session_scope(pg) as s:
        return int(s.scalar(select(func.count()).select_from(model)) or 0)


def _pass(settings: Settings, st: LocalStore, now: datetime) -> serving_index.Report:
    return serving_index.run(
        now, settings=settings, store_for=lambda _p, _t: st, enqueue=lambda *_: None
    )


def test_racing_index_passes_index_each_object_once(env: Any, pg: str) -> None:
    settings, st = env
    rids = _log(st, 300, objects=12)
    now = T0 + timedelta(hours=3)
    threads = 4
    barrier = threading.Barrier(threads)
    reports: list[serving_index.Report] = []
    errors: list[BaseException] = []

    def go() -> None:
        try:
            barrier.wait(10)
            reports.append(_pass(settings, st, now))
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    pool = [threading.Thread(target=go) for _ in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join(60)
    assert not errors and len(reports) == threads
    assert sum(r.objects for r in reports) == 12  # each object indexed by exactly one pass
    assert sum(r.predictions for r in reports) == 300
    assert _count(pg, ServingLogObject) == 12 and _count(pg, LoggedPrediction) == 300
    with session_scope(pg) as s:
        got = set(s.scalars(select(LoggedPrediction.request_id)))
    assert got == set(rids)
    assert _pass(settings, st, now + timedelta(minutes=1)).objects == 0


def test_a_pass_killed_mid_object_loses_nothing(
    env: Any, pg: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings, st = env
    _log(st, 40, objects=2)
    real = index_repo.finish_object
    calls = {"n": 0}

    def dies_once(*a: Any, **kw: Any) -> None:
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt("worker killed")  # mid-transaction: rows not committed
        real(*a, **kw)

    monkeypatch.setattr(index_repo, "finish_object", dies_once)
    now = T0 + timedelta(hours=3)
    with pytest.raises(KeyboardInterrupt):
        _pass(settings, st, now)
    assert _count(pg, ServingLogObject) == 1 and _count(pg, LoggedPrediction) == 20
    again = _pass(settings, st, now)
    assert (again.objects, again.predictions) == (1, 20)
    assert _count(pg, ServingLogObject) == 2 and _count(pg, LoggedPrediction) == 40


def test_racing_feedback_posts_create_a_request_id_once(env: Any, pg: str) -> None:
    threads = 6
    barrier = threading.Barrier(threads)
    outcomes: list[fb_repo.Outcome] = []

    def go(k: int) -> None:
        barrier.wait(10)
        with session_scope(pg) as s:
            model = registry.find_model(s, P, "demo")
            items = [fb_repo.Item(f"r{i}", float(k % 2), None) for i in range(50)]
            outcomes.append(fb_repo.record(s, model, items, by="tester"))

    pool = [threading.Thread(target=go, args=(k,)) for k in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join(60)
    assert len(outcomes) == threads
    assert sum(o.created for o in outcomes) == 50
    assert sum(o.created + o.updated + o.unchanged for o in outcomes) == threads * 50
    assert _count(pg, Feedback) == 50


def _build(pg: str, st: LocalStore, name: str, **spec: Any) -> dict[str, Any]:
    with session_scope(pg) as s:
        dv = ds_repo.start_build(
            s, P, name, ds_repo.BuildSpec(model="demo", **spec), store=st, by="tester"
        )
        vid = dv.id
    build_step.run(str(vid))
    with session_scope(pg) as s:
        ds = ds_repo.find(s, P, name)
        return ds_repo.serialize_version(
            ds, ds_repo.get_version(s, ds, ds_repo.latest(s, ds).version)
        )  # type: ignore[union-attr]


def _csv(st: LocalStore, prefix: str) -> list[list[float]]:
    rows = []
    for obj in sorted(st.list(prefix), key=lambda o: o.key):
        lines = st.get(obj.key).decode().splitlines()
        assert lines[0].startswith("f0,f1,label")
        rows += [[float(v) for v in line.split(",")] for line in lines[1:]]
    return rows


def test_dataset_rows_holdout_stability_and_the_trainer_reads_them(
    env: Any, pg: str, tmp_path: Path
) -> None:
    settings, st = env
    rids = _log(st, 200, objects=4)
    _pass(settings, st, T0 + timedelta(hours=3))
    label = {rid: float(i) * 10 for i, rid in enumerate(rids)}  # not the model's prediction
    with session_scope(pg) as s:
        model = registry.find_model(s, P, "demo")
        items = [fb_repo.Item(r, label[r], None) for r in rids[:150]]
        fb_repo.record(s, model, items, by="tester")

    v1 = _build(pg, st, "loop", holdout_fraction=0.2)
    assert v1["state"] == "READY", v1
    m = v1["manifest"]
    assert (m["logged"], m["labelled"], m["rows"]) == (200, 150, 150)
    area = f"projects/{P}/datasets/loop/1/"
    train, holdout = _csv(st, area + "train/"), _csv(st, area + "holdout/")
    assert len(train) + len(holdout) == 150 and m["train_rows"] == len(train)
    by_x0 = {int(r[0]): r for r in train + holdout}
    for i, rid in enumerate(rids[:150]):
        assert by_x0[i] == [float(i), float(i % 7), label[rid]]  # the instance, then its label
    held1 = {rids[int(r[0])] for r in holdout}
    assert held1 == {r for r in rids[:150] if dom.in_holdout(r, 0.2)}

    # more predictions and labels later: version 2 keeps every old request on its side
    more = _log(st, 100, objects=1, start=200, base=T0 + timedelta(hours=3, minutes=30))
    _pass(settings, st, T0 + timedelta(hours=4))
    with session_scope(pg) as s:
        model = registry.find_model(s, P, "demo")
        fb_repo.record(s, model, [fb_repo.Item(r, 1.0, None) for r in rids[150:] + more], "t")
    v2 = _build(pg, st, "loop", holdout_fraction=0.2)
    assert v2["version"] == 2 and v2["manifest"]["rows"] == 300
    holdout2 = _csv(st, f"projects/{P}/datasets/loop/2/holdout/")
    all_rids = rids + more
    held2 = {all_rids[int(r[0])] for r in holdout2}
    assert held1 <= held2 and held2 & set(rids[:150]) == held1

    # the example trainer's own reader, in the TensorFlow runtime, on what a job would fetch
    local = tmp_path / "input"
    for obj in st.list(area + "train/"):
        dest = local / obj.key[len(area + "train/") :]
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(st.get(obj.key))
    code = (
        "import json, sys; from pathlib import Path; from trainer.task import csv_data; "
        "x, y = csv_data(Path(sys.argv[1])); "
        "print(json.dumps({'x': x.tolist(), 'y': y[:, 0].tolist()}))"
    )
    out = subprocess.run(
        [str(runtime_python()), "-c", code, str(local)],
        cwd=EXAMPLE,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert len(got["x"]) == len(train) and all(len(row) == 2 for row in got["x"])
    assert sorted(zip(map(tuple, got["x"]), got["y"], strict=True)) == sorted(
        ((r[0], r[1]), r[2]) for r in train
    )


def test_no_labels_is_failed_and_leaves_no_objects(env: Any, pg: str) -> None:
    settings, st = env
    _log(st, 10, objects=1)
    _pass(settings, st, T0 + timedelta(hours=3))
    v = _build(pg, st, "nothing")
    assert v["state"] == "FAILED" and "10 logged, none with feedback" in v["failure_message"]
    assert st.list(f"projects/{P}/datasets/nothing/") == []
