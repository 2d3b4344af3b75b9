"""The OpenAPI entries of feedback (/v1/models/{name}/feedback) and /v1/datasets (merged by
service/api/openapi.py)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

from service.api.datasets import CreateDataset, Window
from service.api.feedback import FeedbackItem, PostFeedback


class FeedbackOut(BaseModel):
    model: str
    received: int = Field(description="Items in the request.")
    created: int = Field(description="Request ids labelled for the first time.")
    updated: int = Field(description="Request ids whose stored label was replaced (a correction).")
    unchanged: int = Field(description="Items whose label was already stored.")


class DatasetVersionOut(BaseModel):
    dataset: str
    version: int
    state: str = Field(description="BUILDING, READY or FAILED.")
    model: str
    window: dict[str, str | None] = Field(description="start (null: the beginning) and end.")
    holdout_fraction: float
    format: str = Field(description="csv or jsonl.")
    uri: str = Field(description="The version's prefix in the store.")
    data_uri: str | None = Field(description="Its train/ prefix: a job's inputs.data_uri.")
    holdout_uri: str | None = Field(description="Its holdout/ prefix.")
    manifest: dict[str, Any] | None = Field(description="manifest.json (READY only).")
    failure_message: str | None
    created_by: str
    created_at: str | None
    updated_at: str | None


class DatasetOut(BaseModel):
    id: str
    name: str
    project_id: str
    created_by: str
    created_at: str | None
    versions: int
    latest_version: int | None
    latest_state: str | None
    latest_ready_version: int | None
    version_list: list[DatasetVersionOut] | None = Field(
        default=None, description="Every version (GET of one dataset only)."
    )


class DatasetList(BaseModel):
    datasets: list[DatasetOut]


MODELS: tuple[type[BaseModel], ...] = (
    FeedbackItem,
    PostFeedback,
    FeedbackOut,
    Window,
    CreateDataset,
    DatasetVersionOut,
    DatasetOut,
    DatasetList,
)


def paths() -> dict[str, Any]:
    from service.api.openapi import JSON_BODY, _json, _param, _ref, _responses

    model = _param("name", "path", {"type": "string"}, "The model's name.")
    name = _param("name", "path", {"type": "string"}, "The dataset's name.")
    version = _param("version", "path", {"type": "integer"}, "The version number.")

    def body(m: type[BaseModel]) -> dict[str, Any]:
        return {"required": True, "content": {"application/json": {"schema": _ref(m)}}}

    return {
        "/v1/models/{name}/feedback": {
            "parameters": [model],
            "post": {
                "summary": "Ground-truth labels for the model's predictions, by request id "
                "(member): 1..1000 items; idempotent per request id (the same label again is "
                "unchanged, another one replaces it).",
                "description": "422 with the bad item's field path (feedback.<i>.label...): "
                "nothing is stored when any item is bad.",
                "operationId": "postFeedback",
                "requestBody": body(PostFeedback),
                "responses": _responses({"200": _json(FeedbackOut, "Stored.")}, *JSON_BODY, "404"),
            },
        },
        "/v1/datasets": {
            "post": {
                "summary": "Build a new version of a dataset (member): the model's logged "
                "predictions in the window joined with their feedback, split into train/ and "
                "holdout/ by a hash of the request id.",
                "description": "404 for a model the project does not have; 422 not_implemented "
                "with keystone auth and per-project tenancy.",
                "operationId": "createDataset",
                "requestBody": body(CreateDataset),
                "responses": _responses(
                    {"202": _json(DatasetVersionOut, "Building.")}, *JSON_BODY, "404"
                ),
            },
            "get": {
                "summary": "The project's datasets (reader).",
                "operationId": "listDatasets",
                "responses": _responses({"200": _json(DatasetList, "The datasets.")}),
            },
        },
        "/v1/datasets/{name}": {
            "parameters": [name],
            "get": {
                "summary": "One dataset with its versions (reader).",
                "operationId": "getDataset",
                "responses": _responses({"200": _json(DatasetOut, "The dataset.")}, "404"),
            },
        },
        "/v1/datasets/{name}/versions/{version}": {
            "parameters": [name, version],
            "get": {
                "summary": "One version: its state, manifest and data_uri (reader).",
                "operationId": "getDatasetVersion",
                "responses": _responses({"200": _json(DatasetVersionOut, "The version.")}, "404"),
            },
        },
    }
