"""The OpenAPI entries of /v1/schedules (merged by service/api/openapi.py)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

from service.api.schedules import CreateSchedule, UpdateSchedule
from service.domain.schedules import Catchup, Concurrency, Outcome


class ScheduleRunOut(BaseModel):
    fire_time: str = Field(description="The slot (UTC).")
    outcome: Outcome = Field(
        description="started, skipped or failed; building while the slot's dataset is being "
        "rebuilt (its job starts when the version is READY)."
    )
    reason: str = Field(description="Why it was skipped or failed; what Replace cancelled.")
    job_id: str | None = Field(description="The job the slot started.")
    missed: int = Field(
        description="Earlier slots this pass passed over (catchup none, or past max_catchup); "
        "counted up to 2000."
    )
    dataset_version: int | None = Field(
        description="The version of the schedule's dataset the slot rebuilt (null: none)."
    )
    recorded_at: str


class ScheduleOut(BaseModel):
    id: str
    project_id: str
    name: str
    cron: str = Field(description="The 5-field expression (a macro is shown expanded).")
    timezone: str
    concurrency: Concurrency
    catchup: Catchup
    max_catchup: int
    paused: bool
    dataset: str | None = Field(description="The dataset each slot rebuilds first (or null).")
    next_fire_at: str | None = Field(description="The next slot to handle (null: paused).")
    next_fire_times: list[str] = Field(description="The next 5 fire times (UTC; none paused).")
    last_run: ScheduleRunOut | None
    created_by: str
    created_at: str | None
    updated_at: str | None
    job: dict[str, Any] | None = Field(
        default=None, description="The job template (env values masked); one schedule only."
    )
    live_jobs: list[str] | None = Field(
        default=None, description="Its jobs not yet finished; one schedule only."
    )


class ScheduleList(BaseModel):
    schedules: list[ScheduleOut]


class ScheduleRunList(BaseModel):
    runs: list[ScheduleRunOut]


MODELS: tuple[type[BaseModel], ...] = (
    CreateSchedule,
    UpdateSchedule,
    ScheduleRunOut,
    ScheduleOut,
    ScheduleList,
    ScheduleRunList,
)


def paths() -> dict[str, Any]:
    from service.api.openapi import ALL_PROJECTS, JSON_BODY, _json, _param, _ref, _responses

    ref = _param("ref", "path", {"type": "string"}, "The schedule's id (sch-...) or name.")
    limit = _param(
        "limit", "query", {"type": "integer", "minimum": 1, "maximum": 200}, "Default 50."
    )

    def body(model: type[BaseModel]) -> dict[str, Any]:
        return {"required": True, "content": {"application/json": {"schema": _ref(model)}}}

    return {
        "/v1/schedules": {
            "post": {
                "summary": "Create a schedule (member): a cron expression in a time zone that "
                "submits `job` (a job spec as POST /v1/jobs takes it) at each slot.",
                "description": "422: a bad cron expression, time zone, policy or job spec "
                "(fields named job.*); 422 not_implemented with keystone auth and per-project "
                "tenancy; 409 schedule_exists for a name the project has.",
                "operationId": "createSchedule",
                "requestBody": body(CreateSchedule),
                "responses": _responses(
                    {"201": _json(ScheduleOut, "Created.")}, *JSON_BODY, "409", "503"
                ),
            },
            "get": {
                "summary": "The project's schedules (reader).",
                "operationId": "listSchedules",
                "parameters": [ALL_PROJECTS],
                "responses": _responses({"200": _json(ScheduleList, "The schedules.")}, "400"),
            },
        },
        "/v1/schedules/{ref}": {
            "parameters": [ref],
            "get": {
                "summary": "One schedule with its job template and live jobs (reader).",
                "operationId": "getSchedule",
                "responses": _responses({"200": _json(ScheduleOut, "The schedule.")}, "404"),
            },
            "patch": {
                "summary": 'Pause or resume (member): {"paused": true|false}. Slots that '
                "pass while paused never fire.",
                "operationId": "updateSchedule",
                "requestBody": body(UpdateSchedule),
                "responses": _responses(
                    {"200": _json(ScheduleOut, "The schedule.")}, *JSON_BODY, "404"
                ),
            },
            "delete": {
                "summary": "Delete the schedule and its slot records (member); the jobs it "
                "started are left as they are.",
                "operationId": "deleteSchedule",
                "responses": _responses({"204": {"description": "Deleted."}}, "404"),
            },
        },
        "/v1/schedules/{ref}/runs": {
            "parameters": [ref],
            "get": {
                "summary": "The slots the schedule handled, latest first (reader).",
                "operationId": "listScheduleRuns",
                "parameters": [limit],
                "responses": _responses(
                    {"200": _json(ScheduleRunList, "The slots.")}, "400", "404"
                ),
            },
        },
    }
