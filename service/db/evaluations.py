"""Evaluation gates' rows (model_evaluations) and the decision they end with.

An evaluation is made in the transaction that makes its job SUCCEEDED and registers the
job's version (workers/steps/register.py `register_job_output`), PENDING; the worker
(workers/steps/evaluate.py) moves it BOOTING -> SCORING as it boots and uses the evaluator's
server, and `conclude` ends it DONE, in one transaction with what the decision does:

- passed and `promote`: the label moves to the candidate only if it still points at the
  champion that was scored (registry.promote: a compare-and-set under the model's row lock);
  a lost race is a refusal, `champion_changed`;
- refused (or passed with `promote: false`): a history row of kind `refusal` (or
  `evaluated`) that moves nothing;
- the job gets an event `evaluation` with the sentence.

Until DONE, the evaluation holds its job's teardown away from the evaluator's server (and from
the sweep of the job's tag and its trust): `holds_teardown`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import exists, select
from sqlalchemy.orm import Session

from service.db import jobs as jobs_repo
from service.db import registry
from service.db.models import Job, Model, ModelEvaluation, ModelVersion, utcnow
from service.domain.gate import Decision, GateRule, Reason, Verdict, decide, why

PENDING, BOOTING, SCORING, DONE = "PENDING", "BOOTING", "SCORING", "DONE"
ROLE = "evaluator"  # resources.role of the evaluator's server


def create(s: Session, job: Job, mv: ModelVersion, gate: dict[str, Any]) -> ModelEvaluation:
    now = utcnow()
    ev = ModelEvaluation(
        project_id=job.project_id,
        model_id=mv.model_id,
        version_id=mv.id,
        version=mv.version,
        job_id=job.id,
        gate=dict(gate),
        state=PENDING,
        holdout={},
        created_at=now,
        updated_at=now,
    )
    s.add(ev)
    s.flush()
    return ev


def of_version(s: Session, version_id: int) -> list[ModelEvaluation]:
    return list(s.scalars(select(ModelEvaluation).where(ModelEvaluation.version_id == version_id)))


def holds_teardown(s: Session, job_id: str) -> bool:
    """Whether an evaluation of the job is not DONE (its server must outlive the job's
    teardown until it is)."""
    return bool(
        s.scalar(
            select(exists().where(ModelEvaluation.job_id == job_id, ModelEvaluation.state != DONE))
        )
    )


def unfinished_of_job() -> Any:
    """SQL: "the resource's job has an evaluation not DONE" (for the teardown-debt query)."""
    from service.db.models import Resource

    return exists().where(ModelEvaluation.job_id == Resource.job_id, ModelEvaluation.state != DONE)


@dataclass(frozen=True)
class Outcome:
    decision: Decision
    reason: Reason | None
    message: str


def conclude(
    s: Session,
    ev: ModelEvaluation,
    *,
    candidate: float | None,
    champion: float | None,
    rows: int | None,
    failure: str | None = None,
) -> Outcome:
    """Decide, act (promote with compare-and-set, or record the refusal), and end the
    evaluation DONE, in the caller's transaction. `failure`: the evaluation could not score
    (refused, evaluation_failed, with that sentence)."""
    gate = ev.gate or {}
    label = str(gate.get("label") or registry.DEFAULT_LABEL)
    rule = GateRule.of(gate)
    if failure is not None:
        verdict = Verdict(False, Reason.EVALUATION_FAILED, failure)
    elif ev.champion_version is not None and champion is None:
        verdict = Verdict(
            False,
            Reason.EVALUATION_FAILED,
            f"the champion (version {ev.champion_version}) could not be scored",
        )
    else:
        verdict = decide(rule, candidate, champion if ev.champion_version is not None else None)
    model = s.get(Model, ev.model_id)
    assert model is not None
    scores = _scores(rule.metric, ev, candidate, champion, rows)
    if verdict.passed and gate.get("promote", True):
        sentence = f"{verdict.message}{scores}"
        try:
            moved = registry.promote(
                s,
                model,
                label,
                ev.version,
                champion=ev.champion_version,
                by=ev.job_id,
                why=why(Decision.PROMOTED, None, sentence),
            )
        except registry.LabelMoved as e:
            now = e.details.get("version")
            verdict = Verdict(
                False,
                Reason.CHAMPION_CHANGED,
                f"label {label!r} moved from version {ev.champion_version} to {now} while the "
                "candidate was evaluated; it was not compared with the new champion",
            )
        except registry.VersionNotReady as e:
            verdict = Verdict(False, Reason.EVALUATION_FAILED, str(e))
        else:
            outcome = Outcome(
                Decision.PROMOTED if moved else Decision.PASSED,
                None,
                sentence if moved else f"{sentence}; label {label!r} already pointed at it",
            )
            return _done(s, ev, outcome, candidate, champion, rows)
    if verdict.passed:  # promote: false
        outcome = Outcome(Decision.PASSED, None, f"{verdict.message}{scores}; not promoted")
        registry.record_refusal(
            s,
            model,
            label,
            by=ev.job_id,
            why=why(Decision.PASSED, None, outcome.message),
            kind=registry.EVALUATED,
        )
        return _done(s, ev, outcome, candidate, champion, rows)
    outcome = Outcome(Decision.REFUSED, verdict.reason, f"{verdict.message}{scores}")
    registry.record_refusal(
        s, model, label, by=ev.job_id, why=why(Decision.REFUSED, verdict.reason, outcome.message)
    )
    return _done(s, ev, outcome, candidate, champion, rows)


def _scores(
    metric: str,
    ev: ModelEvaluation,
    candidate: float | None,
    champion: float | None,
    rows: int | None,
) -> str:
    if candidate is None and champion is None:
        return f" (version {ev.version})"
    parts = [f"version {ev.version} {metric} {_num(candidate)}"]
    if ev.champion_version is not None:
        parts.append(f"champion version {ev.champion_version} {_num(champion)}")
    if rows is not None:
        parts.append(f"{rows} holdout rows")
    return f" ({', '.join(parts)})"


def _num(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.6g}"


def _done(
    s: Session,
    ev: ModelEvaluation,
    outcome: Outcome,
    candidate: float | None,
    champion: float | None,
    rows: int | None,
) -> Outcome:
    now = utcnow()
    ev.state = DONE
    ev.candidate_score, ev.champion_score, ev.holdout_rows = candidate, champion, rows
    ev.decision = outcome.decision.value
    ev.reason = None if outcome.reason is None else outcome.reason.value
    ev.message = outcome.message
    ev.finished_at = ev.updated_at = now
    ev.ssh_key_enc = None  # the key dies with the evaluation
    ev.step_lease_owner = ev.step_lease_until = None
    if s.get(Job, ev.job_id) is not None:
        head = outcome.decision.value + ("" if outcome.reason is None else f" ({outcome.reason})")
        jobs_repo.add_event(s, ev.job_id, "evaluation", f"gate {head}: {outcome.message}")
    s.flush()
    return outcome
