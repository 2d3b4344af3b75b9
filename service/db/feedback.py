"""Feedback repository: record labels for a model's predictions (idempotent per request id),
and the live metrics of a model's versions from logged predictions joined with feedback."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from service.db.models import Feedback, LoggedPrediction, Model, utcnow
from service.db.registry import _lock_model
from service.domain import feedback as dom

# labelled requests a version's live metric is computed on (the latest ones): the counts are
# exact, the metric is over at most this many requests, so a GET stays bounded
LIVE_SAMPLE = 5000


@dataclass(frozen=True)
class Item:
    request_id: str
    label: Any
    labelled_at: datetime | None


@dataclass
class Outcome:
    created: int = 0
    updated: int = 0
    unchanged: int = 0

    def as_json(self) -> dict[str, int]:
        return {"created": self.created, "updated": self.updated, "unchanged": self.unchanged}


def record(s: Session, model: Model, items: list[Item], by: str) -> Outcome:
    """Store `items` (already checked) for `model`: a new request id is created, the same
    label again is unchanged, a different one replaces the stored one (updated). Writers of
    one model are serialised (its row is written first), so two posts of the same request id
    cannot both create it. The last item wins when a batch names a request id twice."""
    _lock_model(s, model)
    last: dict[str, Item] = {}
    for it in items:
        last[it.request_id] = it
    existing = {
        f.request_id: f
        for f in s.scalars(
            select(Feedback).where(
                Feedback.model_id == model.id, Feedback.request_id.in_(list(last))
            )
        )
    }
    now = utcnow()
    out = Outcome()
    for rid, it in last.items():
        key = dom.label_key(it.label)
        row = existing.get(rid)
        if row is None:
            s.add(
                Feedback(
                    project_id=model.project_id,
                    model_id=model.id,
                    request_id=rid,
                    label=it.label,
                    label_key=key,
                    labelled_at=it.labelled_at or now,
                    received_at=now,
                    updated_at=now,
                    by=by,
                )
            )
            out.created += 1
        elif row.label_key == key:
            out.unchanged += 1
        else:
            row.label = it.label
            row.label_key = key
            row.labelled_at = it.labelled_at or now
            row.updated_at = now
            row.by = by
            out.updated += 1
    out.unchanged += len(items) - len(last)  # repeats within the batch
    s.flush()
    return out


def live_metrics(s: Session, model: Model, versions: list[int]) -> dict[int, dom.LiveMetrics]:
    """Each version's live metrics: logged and labelled request counts (exact), and the metric
    over its latest LIVE_SAMPLE labelled requests."""
    if not versions:
        return {}
    lp, fb = LoggedPrediction, Feedback
    logged = dict(
        s.execute(
            select(lp.version, func.count())
            .where(lp.model_id == model.id, lp.version.in_(versions))
            .group_by(lp.version)
        ).all()
    )
    joined = (lp.model_id == fb.model_id) & (lp.request_id == fb.request_id)
    labelled = dict(
        s.execute(
            select(lp.version, func.count())
            .join(fb, joined)
            .where(lp.model_id == model.id, lp.version.in_(versions))
            .group_by(lp.version)
        ).all()
    )
    out: dict[int, dom.LiveMetrics] = {}
    for v in versions:
        n_logged = int(logged.get(v, 0))
        n_labelled = int(labelled.get(v, 0))
        score = dom.Score()
        sampled = 0
        if n_labelled:
            rows = s.execute(
                select(lp.predictions, fb.label)
                .join(fb, joined)
                .where(lp.model_id == model.id, lp.version == v)
                .order_by(lp.id.desc())
                .limit(LIVE_SAMPLE)
            ).all()
            for predictions, label in rows:
                dom.score_request(score, predictions, label)
                sampled += 1
        out[v] = dom.LiveMetrics(
            logged=n_logged,
            labelled=n_labelled,
            sampled=sampled,
            metrics=score.metrics(),
            scored=score.regression + score.classified,
            unscored=score.unscored,
        )
    return out


__all__ = ["LIVE_SAMPLE", "Item", "Outcome", "live_metrics", "record"]
