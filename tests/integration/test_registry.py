"""The model registry on a real PostgreSQL: label compare-and-set under a real race, version
numbers under concurrent creators, and the register task end to end against the local store
with a real SavedModel built by TensorFlow (checksums, signature, a job's metrics), plus the
artifacts it must refuse (FAILED with a sentence, never an exception)."""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select

from service.backends.storage.local import LocalStore
from service.config import Settings
from service.db import registry as repo
from service.db.migrate import upgrade
from service.db.models import Job, MetricRow, ModelLabelHistory, ModelVersion
from service.db.session import session_scope
from service.domain.spec import JobSpec
from tests.pgutil import temp_database
from tests.registryutil import build_savedmodels
from workers import jobctx
from workers.steps import register

P = "proj-reg"


@pytest.fixture(scope="module")
def pg() -> Iterator[str]:
    with temp_database("registry") as url:
        upgrade(url)
        yield url


@pytest.fixture(scope="module")
def savedmodels(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    where = tmp_path_factory.mktemp("sm")
    return where, build_savedmodels(where)


@pytest.fixture
def store(
    pg: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[LocalStore, list[tuple[str, str]]]]:
    settings = Settings(database_url=pg, data_dir=tmp_path, secret_key="registry")
    st = LocalStore(tmp_path / "store", "http://127.0.0.1:9", settings.signing_key())
    sent: list[tuple[str, str]] = []
    monkeypatch.setattr(jobctx, "settings", lambda: settings)
    monkeypatch.setattr(jobctx, "store", lambda project_id=None, trust_id=None: st)
    monkeypatch.setattr(
        jobctx, "next_step", lambda task, ident, countdown=0.0: sent.append((task, ident))
    )
    yield st, sent


def _upload(st: LocalStore, src: Path, prefix: str) -> dict[str, dict[str, Any]]:
    """Put every file of `src` under `prefix`; returns what the checksums must say."""
    expected = {}
    for f in sorted(p for p in src.rglob("*") if p.is_file()):
        rel = f.relative_to(src).as_posix()
        data = f.read_bytes()
        st.put(prefix + rel, data)
        expected[rel] = {"size": len(data), "md5": hashlib.md5(data).hexdigest()}
    return expected


def _model(pg: str, name: str) -> str:
    with session_scope(pg) as s:
        return repo.ensure_model(s, P, name, by="tester").id


def _version(pg: str, name: str, uri: str) -> int:
    with session_scope(pg) as s:
        model = repo.find_model(s, P, name)
        return repo.create_version(s, model, artifact_uri=uri, by="tester").id


def _state(pg: str, vid: int) -> ModelVersion:
    with session_scope(pg) as s:
        mv = s.get(ModelVersion, vid)
        assert mv is not None
        s.expunge(mv)
        return mv


# -- the register task -------------------------------------------------------------------------


def test_register_records_checksums_and_the_signature_tensorflow_reports(
    pg: str, store: Any, savedmodels: tuple[Path, dict[str, Any]]
) -> None:
    st, _ = store
    where, tf_view = savedmodels
    prefix = f"projects/{P}/models/keras-v1/"
    expected = _upload(st, where / "keras", prefix)
    assert "saved_model.pb" in expected and any(k.startswith("variables/") for k in expected)
    _model(pg, "reg-keras")
    vid = _version(pg, "reg-keras", st.uri(prefix))
    register.run(str(vid))
    mv = _state(pg, vid)
    assert mv.state == "READY", mv.failure_message
    assert mv.checksums == expected
    assert mv.signature == tf_view["keras"]
    assert mv.failure_message is None
    register.run(str(vid))  # a second run (a redelivered task) changes nothing
    assert _state(pg, vid).updated_at == mv.updated_at


def test_a_job_with_register_as_gets_a_version_with_its_metrics(
    pg: str, store: Any, savedmodels: tuple[Path, dict[str, Any]]
) -> None:
    st, sent = store
    where, tf_view = savedmodels
    jobs = []
    for n in range(2):
        prefix = f"projects/{P}/models/job-reg-{n}/"
        _upload(st, where / "module", prefix)
        spec = JobSpec.model_validate(
            {
                "name": "j",
                "trainer": {"package_uri": f"local://projects/{P}/staging/t.tar.gz", "module": "m"},
                "output": {"register_as": "from-jobs"},
            }
        )
        with session_scope(pg) as s:
            from service.db import jobs as jobs_repo

            job = jobs_repo.create_job(s, P, spec)
            job.state = "SUCCEEDED"
            job.output = {"model_uri": st.uri(prefix.rstrip("/"))}
            s.add(MetricRow(job_id=job.id, name="loss", value=1.0 + n, log_offset=0))
            s.add(MetricRow(job_id=job.id, name="loss", value=0.5 + n, log_offset=10))
            s.flush()
            vid = register.register_job_output(s, job)
            assert vid is not None
            jobs.append((job.id, vid, prefix))
        register.enqueue(vid)
    assert sent == [("stackml.register_version", str(v)) for _, v, _ in jobs]
    for n, (job_id, vid, prefix) in enumerate(jobs):
        register.run(str(vid))
        mv = _state(pg, vid)
        assert mv.state == "READY", mv.failure_message
        assert mv.version == n + 1  # the model was created once, then got a second version
        assert mv.source_job_id == job_id
        assert mv.metrics == {"loss": 0.5 + n}
        assert mv.artifact_uri == st.uri(prefix)
        assert mv.signature == tf_view["module"]
        assert mv.created_by == "system"


def test_the_first_ready_version_becomes_default_and_only_the_first(
    pg: str, store: Any, savedmodels: tuple[Path, dict[str, Any]]
) -> None:
    st, _ = store
    where, _ = savedmodels
    _model(pg, "adopt")
    bad = _version(pg, "adopt", st.uri(f"projects/{P}/models/adopt-none/"))  # nothing there
    register.run(str(bad))
    assert _state(pg, bad).state == "FAILED"
    ids = []
    for n in range(2):
        prefix = f"projects/{P}/models/adopt-{n}/"
        _upload(st, where / "keras", prefix)
        ids.append(_version(pg, "adopt", st.uri(prefix)))
        register.run(str(ids[-1]))
    with session_scope(pg) as s:
        model = repo.find_model(s, P, "adopt")
        assert repo.labels_of(s, model) == {"default": 2}  # version 1 FAILED: 2 was first READY
        rows = [(h.label, h.from_version, h.to_version, h.by) for h in repo.history(s, model)]
        assert rows == [("default", None, 2, "system")]
        # removed on purpose: a later READY version does not bring it back
        repo.remove_label(s, model, "default", by="tester", why="no default for now")
    prefix = f"projects/{P}/models/adopt-2/"
    _upload(st, where / "keras", prefix)
    third = _version(pg, "adopt", st.uri(prefix))
    register.run(str(third))
    assert _state(pg, third).state == "READY"
    with session_scope(pg) as s:
        assert repo.labels_of(s, repo.find_model(s, P, "adopt")) == {}


def test_an_older_version_ready_later_does_not_move_default(
    pg: str, store: Any, savedmodels: tuple[Path, dict[str, Any]]
) -> None:
    st, _ = store
    where, _ = savedmodels
    _model(pg, "adopt-set")
    ids = []
    for n in range(2):
        prefix = f"projects/{P}/models/adopt-set-{n}/"
        _upload(st, where / "keras", prefix)
        ids.append(_version(pg, "adopt-set", st.uri(prefix)))
    register.run(str(ids[1]))  # version 2 READY first: it becomes default
    with session_scope(pg) as s:
        model = repo.find_model(s, P, "adopt-set")
        assert repo.labels_of(s, model) == {"default": 2}
    register.run(str(ids[0]))  # version 1 READY later: default stays on 2
    with session_scope(pg) as s:
        model = repo.find_model(s, P, "adopt-set")
        assert repo.labels_of(s, model) == {"default": 2}
        assert len(repo.history(s, model)) == 1


def test_a_job_without_register_as_registers_nothing(pg: str) -> None:
    spec = JobSpec.model_validate(
        {"name": "j", "trainer": {"package_uri": f"local://projects/{P}/s/t.tar.gz", "module": "m"}}
    )
    with session_scope(pg) as s:
        from service.db import jobs as jobs_repo

        job = jobs_repo.create_job(s, P, spec)
        job.output = {"model_uri": f"local://projects/{P}/models/x/"}
        assert register.register_job_output(s, job) is None


@pytest.mark.parametrize(
    "files, message",
    [
        ({}, "nothing is stored at"),
        ({"variables/variables.index": b"x"}, "holds no saved_model.pb at its top"),
        ({"sub/saved_model.pb": b"x"}, "holds no saved_model.pb at its top"),
        ({"saved_model.pb": b"\x12\xff\xff\xff\x7f"}, "saved_model.pb cannot be read"),
        ({"saved_model.pb": b"\x0a\x00"}, "cannot be read: saved_model.pb holds no meta graph"),
    ],
)
def test_artifacts_that_are_no_savedmodel_fail_with_a_sentence(
    pg: str, store: Any, files: dict[str, bytes], message: str
) -> None:
    st, _ = store
    prefix = f"projects/{P}/models/bad-{hashlib.md5(repr(files).encode()).hexdigest()[:8]}/"
    for rel, data in files.items():
        st.put(prefix + rel, data)
    _model(pg, "reg-bad")
    vid = _version(pg, "reg-bad", st.uri(prefix))
    register.run(str(vid))
    mv = _state(pg, vid)
    assert mv.state == "FAILED"
    assert mv.failure_message is not None and message in mv.failure_message
    assert mv.signature is None and mv.checksums == {}


def test_a_uri_of_another_store_fails_and_unknown_ids_are_ignored(pg: str, store: Any) -> None:
    _model(pg, "reg-other")
    vid = _version(pg, "reg-other", "swift://projects/x/models/a/")
    register.run(str(vid))
    mv = _state(pg, vid)
    assert mv.state == "FAILED" and "not on this platform's store" in str(mv.failure_message)
    register.run("999999999")
    register.run("not-a-number")


# -- races on PostgreSQL ------------------------------------------------------------------------


def _ready_versions(pg: str, name: str, n: int) -> list[int]:
    _model(pg, name)
    out = []
    with session_scope(pg) as s:
        model = repo.find_model(s, P, name)
        for _ in range(n):
            mv = repo.create_version(s, model, artifact_uri="local://x/", by="t")
            repo.finish_version(s, mv, checksums={}, signature={})
            out.append(mv.version)
    return out


def test_two_concurrent_compare_and_set_moves_one_wins_one_is_refused(pg: str) -> None:
    v1, v2, v3 = _ready_versions(pg, "race", 3)
    with session_scope(pg) as s:
        repo.set_label(s, repo.find_model(s, P, "race"), "default", v1, by="t")
    first_moved = threading.Event()
    results: dict[str, Any] = {}

    def mover(who: str, target: int, hold: bool) -> None:
        try:
            with session_scope(pg) as s:
                model = repo.find_model(s, P, "race")
                repo.set_label(s, model, "default", target, by=who, expected=v1)
                if hold:
                    first_moved.set()
                    time.sleep(1.0)  # keep the transaction open while the other one tries
            results[who] = "moved"
        except repo.LabelMoved as e:
            results[who] = e

    a = threading.Thread(target=mover, args=("a", v2, True))
    a.start()
    assert first_moved.wait(30)
    b = threading.Thread(target=mover, args=("b", v3, False))
    b.start()
    a.join(60)
    b.join(60)
    assert results["a"] == "moved"
    assert isinstance(results["b"], repo.LabelMoved)
    assert results["b"].details["version"] == v2
    with session_scope(pg) as s:
        model = repo.find_model(s, P, "race")
        assert repo.labels_of(s, model) == {"default": v2}
        rows = s.scalars(
            select(ModelLabelHistory)
            .where(ModelLabelHistory.model_id == model.id)
            .order_by(ModelLabelHistory.id)
        ).all()
        assert [(r.from_version, r.to_version, r.by) for r in rows] == [
            (None, v1, "t"),
            (v1, v2, "a"),
        ]


def test_concurrent_version_creators_get_distinct_numbers(pg: str) -> None:
    _model(pg, "many")
    got: list[int] = []
    errors: list[BaseException] = []
    start = threading.Barrier(6)

    def create() -> None:
        try:
            start.wait(30)
            for _ in range(5):
                with session_scope(pg) as s:
                    model = repo.find_model(s, P, "many")
                    got.append(
                        repo.create_version(s, model, artifact_uri="local://x/", by="t").version
                    )
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=create) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert errors == []
    assert sorted(got) == list(range(1, 31))
    with session_scope(pg) as s:
        model = repo.find_model(s, P, "many")
        count = s.scalar(
            select(func.count()).select_from(ModelVersion).where(ModelVersion.model_id == model.id)
        )
        assert count == 30
        assert s.scalar(select(func.count()).select_from(Job)) is not None


def test_versions_whose_task_was_lost_are_re_enqueued_once(pg: str, store: Any) -> None:
    _, sent = store
    _model(pg, "lost")
    vid = _version(pg, "lost", "local://projects/x/models/lost/")
    fresh = _version(pg, "lost", "local://projects/x/models/fresh/")
    with session_scope(pg) as s:
        mv = s.get(ModelVersion, vid)
        assert mv is not None
        mv.updated_at = mv.updated_at - timedelta(hours=1)
    cutoff = datetime.now(UTC) - timedelta(minutes=5)
    assert register.redrive_stalled(cutoff) == [vid]
    assert ("stackml.register_version", str(vid)) in sent
    assert ("stackml.register_version", str(fresh)) not in sent
    # its stamp was renewed: the next round (or a second reconciler) leaves it alone
    assert register.redrive_stalled(cutoff) == []
