"""The OpenAPI entries of the model registry, /v1/models (merged by service/api/openapi.py)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

from service.api.models import CreateModel, CreateVersion, Rollback, SetDefault, SetLabel


class TensorSpec(BaseModel):
    dtype: str = Field(description="TensorFlow's DataType name, e.g. DT_FLOAT.")
    shape: list[int] | None = Field(description="-1 for an unknown dimension; null: unknown rank.")


class Signature(BaseModel):
    method_name: str = Field(description="e.g. tensorflow/serving/predict.")
    inputs: dict[str, TensorSpec]
    outputs: dict[str, TensorSpec]


class EndpointSummary(BaseModel):
    id: str
    name: str
    state: str
    label: str | None
    version: int | None
    serving_version: int | None
    replicas: int


class ModelOut(BaseModel):
    id: str
    name: str
    project_id: str
    description: str
    created_by: str
    created_at: str | None
    versions: int = Field(description="How many versions it has (not deleted).")
    latest_version: int | None
    labels: dict[str, int] = Field(description="Each label and the version it points at.")
    endpoint: EndpointSummary | None = Field(
        default=None, description="Its endpoint that is not DELETED (GET of one model only)."
    )


class ModelList(BaseModel):
    models: list[ModelOut]


class Checksum(BaseModel):
    size: int
    md5: str


class DeclaredMetricOut(BaseModel):
    metric: str = Field(description="mae, mse, rmse or accuracy.")
    source: str = Field(
        description="gate: the metric of the version's evaluation gate; trainer: the first of "
        "the trainer's reported metrics that feedback computes too."
    )
    trained_as: str | None = Field(description="The trainer's metric name it was read from.")
    trained: float | None = Field(description="The trainer's final value (null: not reported).")
    live: float | None = Field(description="The value from feedback (null: nothing compares yet).")


class LiveMetricsOut(BaseModel):
    logged: int = Field(description="Logged predictions (requests) of the version.")
    labelled: int = Field(description="Of them, those with feedback.")
    label_coverage: float | None = Field(description="labelled / logged (null: none logged).")
    sampled: int = Field(description="Labelled requests the metric is over (the latest 5000).")
    scored: int = Field(description="Instances whose prediction was compared with its label.")
    unscored: int = Field(description="Instances whose label and prediction do not compare.")
    mae: float | None = Field(default=None, description="Numeric labels: mean absolute error.")
    rmse: float | None = Field(default=None, description="Numeric labels: root mean squared error.")
    mse: float | None = Field(default=None, description="Numeric labels: mean squared error.")
    accuracy: float | None = Field(default=None, description="Class labels: share correct.")
    declared: DeclaredMetricOut | None = Field(
        default=None,
        description="The metric the version is judged by, live against trained (null: neither "
        "its gate nor its trainer names one feedback computes).",
    )


class EvaluationOut(BaseModel):
    job_id: str = Field(description="The job whose gate it is.")
    state: str = Field(description="PENDING, BOOTING, SCORING or DONE.")
    metric: str | None
    direction: str | None
    threshold: float | None
    min_improvement: float | None
    label: str | None
    promote: bool
    holdout_uri: str | None
    holdout_rows: int | None = Field(
        description="Rows of the holdout both versions were scored on."
    )
    champion_version: int | None = Field(description="Where the label pointed when scored.")
    candidate_score: float | None
    champion_score: float | None
    decision: str | None = Field(description="promoted, passed (nothing moved) or refused.")
    reason: str | None = Field(
        description="A refusal's: below_threshold, not_better_than_champion, champion_changed, "
        "evaluation_failed."
    )
    message: str | None = Field(description="The decision in a sentence.")
    created_at: str | None
    finished_at: str | None


class VersionOut(BaseModel):
    model: str
    version: int
    state: str = Field(description="CREATING, READY or FAILED.")
    artifact_uri: str
    checksums: dict[str, Checksum] = Field(description="Per object, relative to the artifact.")
    signature: Signature | None = Field(description="serving_default (null until READY).")
    metrics: dict[str, float] = Field(description="The source job's final metrics.")
    source_job_id: str | None
    labels: list[str]
    created_by: str
    created_at: str | None
    updated_at: str | None
    failure_message: str | None
    live_metrics: LiveMetricsOut | None = Field(
        default=None, description="From logged predictions joined with feedback."
    )
    evaluation: EvaluationOut | None = Field(
        default=None, description="The gate's evaluation of this version (output.gate)."
    )


class VersionList(BaseModel):
    versions: list[VersionOut]


class LabelOut(BaseModel):
    model: str
    label: str
    version: int | None
    from_version: int | None
    moved: bool = Field(default=True, description="False when it already pointed there.")


class HistoryRow(BaseModel):
    label: str
    from_version: int | None
    to_version: int | None = Field(description="null: the label was removed.")
    at: str | None
    by: str
    why: str
    kind: str = Field(description="move, rollback, or refusal (a gate that moved nothing).")


class History(BaseModel):
    model: str
    history: list[HistoryRow] | None = Field(default=None, description="Without `at`.")
    at: str | None = Field(default=None, description="With `at`: the time asked about.")
    labels: dict[str, int | None] | None = Field(
        default=None,
        description="With `at`: the version each label pointed at then (null: removed by then).",
    )


MODELS: tuple[type[BaseModel], ...] = (
    CreateModel,
    CreateVersion,
    SetLabel,
    SetDefault,
    Rollback,
    ModelOut,
    ModelList,
    VersionOut,
    VersionList,
    LabelOut,
    History,
)


def paths() -> dict[str, Any]:
    from service.api.openapi import JSON_BODY, _json, _param, _ref, _responses

    name = _param("name", "path", {"type": "string"}, "The model's name.")
    version = _param("version", "path", {"type": "integer"}, "The version number.")
    label = _param("label", "path", {"type": "string"}, "The label's name.")

    def body(model: type[BaseModel]) -> dict[str, Any]:
        return {"required": True, "content": {"application/json": {"schema": _ref(model)}}}

    return {
        "/v1/models": {
            "post": {
                "summary": "Create a model (member).",
                "operationId": "createModel",
                "requestBody": body(CreateModel),
                "responses": _responses({"201": _json(ModelOut, "Created.")}, *JSON_BODY, "409"),
            },
            "get": {
                "summary": "The project's models (reader).",
                "operationId": "listModels",
                "responses": _responses({"200": _json(ModelList, "The models.")}),
            },
        },
        "/v1/models/{name}": {
            "parameters": [name],
            "get": {
                "summary": "One model with its labels and its endpoint (reader).",
                "operationId": "getModel",
                "responses": _responses({"200": _json(ModelOut, "The model.")}, "404"),
            },
            "delete": {
                "summary": "Delete the model and its versions' records (member); 409 "
                "endpoint_exists while it has an endpoint.",
                "operationId": "deleteModel",
                "responses": _responses({"204": {"description": "Deleted."}}, "404", "409"),
            },
        },
        "/v1/models/{name}/versions": {
            "parameters": [name],
            "post": {
                "summary": "Register a version from a SUCCEEDED job or a store URI (member); "
                "a worker checks it (checksums, signature) -> READY or FAILED.",
                "operationId": "createModelVersion",
                "requestBody": body(CreateVersion),
                "responses": _responses(
                    {"202": _json(VersionOut, "Accepted; the version is CREATING.")},
                    *JSON_BODY,
                    "404",
                    "409",
                ),
            },
            "get": {
                "summary": "The model's versions (reader).",
                "operationId": "listModelVersions",
                "responses": _responses({"200": _json(VersionList, "The versions.")}, "404"),
            },
        },
        "/v1/models/{name}/versions/{version}": {
            "parameters": [name, version],
            "get": {
                "summary": "One version (reader).",
                "operationId": "getModelVersion",
                "responses": _responses({"200": _json(VersionOut, "The version.")}, "404"),
            },
            "delete": {
                "summary": "Delete a version's record (member); 409 version_in_use while a "
                "label points at it or an endpoint serves it.",
                "operationId": "deleteModelVersion",
                "responses": _responses({"204": {"description": "Deleted."}}, "404", "409"),
            },
        },
        "/v1/models/{name}/labels/{label}": {
            "parameters": [name, label],
            "put": {
                "summary": "Point a label at a READY version (member); with expected_version, "
                "only if the label points there now (409 label_moved otherwise).",
                "operationId": "setModelLabel",
                "requestBody": body(SetLabel),
                "responses": _responses(
                    {"200": _json(LabelOut, "The label.")}, *JSON_BODY, "404", "409"
                ),
            },
            "delete": {
                "summary": "Remove a label (member); 409 label_in_use while an endpoint "
                "follows it.",
                "operationId": "deleteModelLabel",
                "parameters": [
                    _param("why", "query", {"type": "string"}, "Why (kept in the history).")
                ],
                "responses": _responses(
                    {"200": _json(LabelOut, "Removed.")}, "400", "404", "409", "415"
                ),
            },
        },
        "/v1/models/{name}/labels/{label}:rollback": {
            "parameters": [name, label],
            "post": {
                "summary": "Move the label back to the version it pointed at before its last "
                "move (member; body optional); 409 rollback_unavailable when there is none or "
                "it is no longer READY.",
                "operationId": "rollbackModelLabel",
                "requestBody": {
                    "required": False,
                    "content": {"application/json": {"schema": _ref(Rollback)}},
                },
                "responses": _responses(
                    {"200": _json(LabelOut, "The label, moved back.")}, *JSON_BODY, "404", "409"
                ),
            },
        },
        "/v1/models/{name}/default": {
            "parameters": [name],
            "post": {
                "summary": "Point the `default` label at a version (member): PUT labels/default.",
                "operationId": "setModelDefault",
                "requestBody": body(SetDefault),
                "responses": _responses(
                    {"200": _json(LabelOut, "The label.")}, *JSON_BODY, "404", "409"
                ),
            },
        },
        "/v1/models/{name}/history": {
            "parameters": [name],
            "get": {
                "summary": "Every move of the labels, oldest first; with `at`, the version "
                "each label pointed at, at that time (reader).",
                "operationId": "getModelHistory",
                "parameters": [
                    _param("label", "query", {"type": "string"}, "Only this label."),
                    _param(
                        "at",
                        "query",
                        {"type": "string", "format": "date-time"},
                        "An ISO 8601 time.",
                    ),
                ],
                "responses": _responses({"200": _json(History, "The history.")}, "400", "404"),
            },
        },
    }
