"""Evaluation gates' decisions on a real PostgreSQL: two gated candidates concluding at once
against the same champion — one moves the label, the other is refused `champion_changed` (the
compare-and-set on the label under the model's row lock) —, the history rows both write (who:
the job, why: the decision with the scores), the job's events, no champion, a refusal below
the threshold, and the evaluator's server kept out of the teardown debts until DONE."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import select

from service.db import evaluations
from service.db import jobs as jobs_repo
from service.db import registry as repo
from service.db.migrate import upgrade
from service.db.models import ModelEvaluation, ModelLabelHistory, Resource
from service.db.session import session_scope
from service.domain.spec import JobSpec
from service.domain.states import ResourceState
from tests.pgutil import temp_database
from workers.steps import register

P = "proj-gate"
GATE = {
    "metric": "rmse",
    "threshold": 1.0,
    "min_improvement": 0.05,
    "holdout_uri": f"local://projects/{P}/data/holdout/",
}


@pytest.fixture(scope="module")
def pg() -> Iterator[str]:
    with temp_database("gate") as url:
        upgrade(url)
        yield url


def _gated_version(pg: str, model: str, gate: dict[str, Any] | None = None) -> tuple[str, int, int]:
    """A SUCCEEDED job with a gate, registered: (job id, version number, evaluation id)."""
    spec = JobSpec.model_validate(
        {
            "name": "retrain",
            "trainer": {"package_uri": f"local://projects/{P}/staging/a/p.tar.gz", "module": "m"},
            "output": {"register_as": model, "gate": gate or GATE},
        }
    )
    with session_scope(pg) as s:
        job = jobs_repo.create_job(s, P, spec)
        job.spec = spec.model_dump(mode="json")
        job.state = "SUCCEEDED"
        job.output = {"model_uri": f"local://projects/{P}/models/{job.id}/"}
        s.flush()
        vid = register.register_job_output(s, job)
        assert vid is not None
        mv = repo.version_by_id(s, vid)
        assert mv is not None and repo.finish_version(s, mv, checksums={}, signature={})
        (ev,) = evaluations.of_version(s, vid)
        return job.id, mv.version, ev.id


def _champion(pg: str, model: str, version: int) -> None:
    with session_scope(pg) as s:
        repo.set_label(s, repo.find_model(s, P, model), "default", version, by="tester")


def _scored_against(pg: str, eid: int, champion: int | None) -> None:
    with session_scope(pg) as s:
        ev = s.get_one(ModelEvaluation, eid)
        ev.champion_version, ev.state = champion, evaluations.SCORING


def _history(pg: str, model: str) -> list[ModelLabelHistory]:
    with session_scope(pg) as s:
        m = repo.find_model(s, P, model)
        rows = list(
            s.scalars(
                select(ModelLabelHistory)
                .where(ModelLabelHistory.model_id == m.id)
                .order_by(ModelLabelHistory.id)
            )
        )
        s.expunge_all()
        return rows


def test_two_concurrent_promotions_one_wins_the_other_is_refused_champion_changed(
    pg: str,
) -> None:
    _, v1, _ = _gated_version(pg, "race")
    job_a, v2, ev_a = _gated_version(pg, "race")
    job_b, v3, ev_b = _gated_version(pg, "race")
    _champion(pg, "race", v1)
    _scored_against(pg, ev_a, v1)
    _scored_against(pg, ev_b, v1)
    a_decided = threading.Event()
    out: dict[str, evaluations.Outcome] = {}

    def conclude(who: str, eid: int, score: float, hold: bool) -> None:
        with session_scope(pg) as s:
            ev = s.get_one(ModelEvaluation, eid)
            out[who] = evaluations.conclude(s, ev, candidate=score, champion=0.5, rows=100)
            if hold:
                a_decided.set()
                time.sleep(1.0)  # the label's move is not committed yet while B tries

    a = threading.Thread(target=conclude, args=("a", ev_a, 0.3, True))
    a.start()
    assert a_decided.wait(30)
    b = threading.Thread(target=conclude, args=("b", ev_b, 0.2, False))
    b.start()
    a.join(60)
    b.join(60)
    assert out["a"].decision == "promoted" and out["a"].reason is None
    # B was better than the champion it was scored against, but that champion is gone
    assert out["b"].decision == "refused" and out["b"].reason == "champion_changed"
    assert f"from version {v1} to {v2}" in out["b"].message
    with session_scope(pg) as s:
        model = repo.find_model(s, P, "race")
        assert repo.labels_of(s, model) == {"default": v2}
        a_ev, b_ev = s.get_one(ModelEvaluation, ev_a), s.get_one(ModelEvaluation, ev_b)
        assert (a_ev.state, a_ev.decision, a_ev.candidate_score, a_ev.champion_score) == (
            "DONE",
            "promoted",
            0.3,
            0.5,
        )
        assert (b_ev.state, b_ev.decision, b_ev.reason) == ("DONE", "refused", "champion_changed")
        assert a_ev.holdout_rows == 100 and a_ev.ssh_key_enc is None
        events = [e.message for e in jobs_repo.events(s, job_b) if e.kind == "evaluation"]
        assert events and "champion_changed" in events[-1]
    rows = _history(pg, "race")
    assert [(r.from_version, r.to_version, r.kind, r.by) for r in rows] == [
        (None, v1, "move", "tester"),
        (v1, v2, "move", job_a),
        (v2, v2, "refusal", job_b),
    ]
    assert rows[1].why.startswith("gate promoted:") and "rmse 0.3" in rows[1].why
    assert "champion version 1 0.5" in rows[1].why and "100 holdout rows" in rows[1].why
    assert rows[2].why.startswith("gate refused (champion_changed):")


def test_refusals_and_a_first_promotion_are_history_rows(pg: str) -> None:
    job1, v1, ev1 = _gated_version(pg, "first")
    _scored_against(pg, ev1, None)
    with session_scope(pg) as s:
        o = evaluations.conclude(
            s, s.get_one(ModelEvaluation, ev1), candidate=0.4, champion=None, rows=10
        )
    assert (o.decision, o.reason) == ("promoted", None)  # no champion: the threshold decides
    job2, v2, ev2 = _gated_version(pg, "first")
    _scored_against(pg, ev2, v1)
    with session_scope(pg) as s:
        o = evaluations.conclude(
            s, s.get_one(ModelEvaluation, ev2), candidate=0.39, champion=0.4, rows=10
        )
    assert (o.decision, o.reason) == ("refused", "not_better_than_champion")  # 2.5% < 5%
    job3, v3, ev3 = _gated_version(pg, "first")
    _scored_against(pg, ev3, v1)
    with session_scope(pg) as s:
        o = evaluations.conclude(
            s, s.get_one(ModelEvaluation, ev3), candidate=1.5, champion=0.4, rows=10
        )
    assert (o.decision, o.reason) == ("refused", "below_threshold")
    job4, v4, ev4 = _gated_version(pg, "first")
    _scored_against(pg, ev4, v1)
    with session_scope(pg) as s:
        o = evaluations.conclude(
            s,
            s.get_one(ModelEvaluation, ev4),
            candidate=None,
            champion=None,
            rows=None,
            failure="the evaluator's server is ERROR: no valid host",
        )
    assert (o.decision, o.reason) == ("refused", "evaluation_failed")
    rows = _history(pg, "first")
    assert [(r.from_version, r.to_version, r.kind, r.by) for r in rows] == [
        (None, v1, "move", job1),
        (v1, v1, "refusal", job2),
        (v1, v1, "refusal", job3),
        (v1, v1, "refusal", job4),
    ]
    assert "not_better_than_champion" in rows[1].why and "0.39" in rows[1].why
    assert "no valid host" in rows[3].why
    with session_scope(pg) as s:
        assert repo.labels_of(s, repo.find_model(s, P, "first")) == {"default": v1}


def test_the_evaluators_server_is_no_teardown_debt_until_done(pg: str) -> None:
    job, _, eid = _gated_version(pg, "debt")
    with session_scope(pg) as s:
        s.add(
            Resource(
                job_id=job,
                project_id=P,
                backend="sandbox",
                role=evaluations.ROLE,
                name=f"stackml-{job}-eval-x",
                flavor="local.small",
                state=ResourceState.ACTIVE.value,
            )
        )
    with session_scope(pg) as s:
        assert evaluations.holds_teardown(s, job)
        assert job not in {r.job_id for r in jobs_repo.debts(s)}
    _scored_against(pg, eid, None)
    with session_scope(pg) as s:
        evaluations.conclude(
            s, s.get_one(ModelEvaluation, eid), candidate=0.1, champion=None, rows=5
        )
    with session_scope(pg) as s:
        assert not evaluations.holds_teardown(s, job)
        assert job in {r.job_id for r in jobs_repo.debts(s)}


def test_an_endpoint_following_the_label_switches_on_a_promotion_and_a_rollback(
    pg: str, tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The reconciler's check (`serve.stalled`) sees a gate's promotion and a rollback as it
    sees any label move: the READY endpoint goes UPDATING (its rolling switch)."""
    from datetime import timedelta

    from service.config import Settings
    from service.db.models import Endpoint, utcnow
    from workers import jobctx
    from workers.steps import serve

    settings = Settings(database_url=pg, data_dir=tmp_path, secret_key="gate")
    monkeypatch.setattr(jobctx, "settings", lambda: settings)
    _, v1, _ = _gated_version(pg, "served")
    _, v2, ev2 = _gated_version(pg, "served")
    _champion(pg, "served", v1)
    with session_scope(pg) as s:
        m = repo.find_model(s, P, "served")
        s.add(
            Endpoint(
                id="ep-0000000gate1",
                project_id=P,
                model_id=m.id,
                state="READY",
                target_label="default",
                serving_version=v1,
                replicas=1,
                flavor="local.small",
                created_by="t",
            )
        )
    before = utcnow() - timedelta(seconds=60)
    assert "ep-0000000gate1" not in serve.stalled(before)  # settled on v1
    _scored_against(pg, ev2, v1)
    with session_scope(pg) as s:
        o = evaluations.conclude(
            s, s.get_one(ModelEvaluation, ev2), candidate=0.1, champion=0.5, rows=10
        )
    assert o.decision == "promoted"
    assert serve.stalled(before) == ["ep-0000000gate1"]
    with session_scope(pg) as s:
        ep = s.get_one(Endpoint, "ep-0000000gate1")
        assert ep.state == "UPDATING"
        ep.state, ep.serving_version = "READY", v2  # its switch to v2 is done
    assert "ep-0000000gate1" not in serve.stalled(before)
    with session_scope(pg) as s:
        assert repo.rollback(s, repo.find_model(s, P, "served"), "default", by="ops") == (v2, v1)
    assert serve.stalled(before) == ["ep-0000000gate1"]
    with session_scope(pg) as s:
        assert s.get_one(Endpoint, "ep-0000000gate1").state == "UPDATING"
