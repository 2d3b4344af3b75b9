"""POST /v1/models/<name>/feedback: ground-truth labels for a model's predictions, by the
request id the prediction answered with (X-Request-Id).

Roles as for the other model writes (members write). Late and batched (1..1000 items);
idempotent per (model, request id): a new request id is `created`, the same label again
`unchanged`, a different label replaces the stored one (`updated`, a correction). A request
id the serving log has not shown yet is stored anyway (the log is written in batches, and
indexed by the workers later). One bad item refuses the whole batch (422, the item's field
path), and nothing is stored. Another project's model is a 404.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from flask import Blueprint, Response, jsonify
from pydantic import BaseModel, ConfigDict, Field, StrictStr, field_validator

from service.api import ctx, json_body
from service.api.auth import current, current_project
from service.db import feedback as repo
from service.db import registry
from service.domain import feedback as dom

bp = Blueprint("feedback", __name__)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class FeedbackItem(_Strict):
    request_id: StrictStr = Field(
        description="The prediction's request id (its X-Request-Id answer header)."
    )
    label: Any = Field(
        description="The ground truth: a JSON scalar, or a list (one label per instance of a "
        "request with several instances)."
    )
    time: StrictStr | None = Field(
        default=None, description="When the truth was observed (ISO 8601; default: now)."
    )

    @field_validator("request_id")
    @classmethod
    def _rid(cls, v: str) -> str:
        why = dom.check_request_id(v)
        if why:
            raise ValueError(why)
        return v

    @field_validator("label")
    @classmethod
    def _label(cls, v: Any) -> Any:
        try:
            dom.check_label(v)
        except dom.LabelError as e:
            raise ValueError(str(e)) from e
        return v

    @field_validator("time")
    @classmethod
    def _time(cls, v: str | None) -> str | None:
        if v is not None:
            parse_time(v)
        return v


class PostFeedback(_Strict):
    feedback: list[FeedbackItem] = Field(min_length=1, max_length=dom.MAX_FEEDBACK_ITEMS)


def parse_time(raw: str) -> datetime:
    """An ISO 8601 time (a naive one is UTC); ValueError with a sentence otherwise."""
    try:
        at = datetime.fromisoformat(raw.strip().replace("Z", "+00:00"))
    except ValueError as e:
        raise ValueError("must be an ISO 8601 time, e.g. 2026-12-04T16:00:00Z") from e
    if at.tzinfo is None:
        at = at.replace(tzinfo=UTC)
    try:
        return at.astimezone(UTC)
    except OverflowError as e:
        raise ValueError("is out of range") from e


@bp.post("/v1/models/<name>/feedback")
def post_feedback(name: str) -> Response:
    body = PostFeedback.model_validate(json_body())
    items = [
        repo.Item(it.request_id, it.label, parse_time(it.time) if it.time else None)
        for it in body.feedback
    ]
    by = current().user_id or current_project()
    with ctx().session() as s:
        model = registry.find_model(s, current_project(), name)
        out = repo.record(s, model, items, by)
    return jsonify({"model": name, "received": len(items), **out.as_json()})


__all__ = ["FeedbackItem", "PostFeedback", "bp", "parse_time"]
