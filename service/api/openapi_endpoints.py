"""The OpenAPI entries of /v1/models/{name}/endpoints (merged by service/api/openapi.py)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

from service.api.endpoints import Deploy, EndpointCreate, EndpointUpdate
from service.domain.endpoints import EndpointState, ReplicaState


class EndpointServer(BaseModel):
    id: int
    name: str
    version: int | None
    replica_state: ReplicaState | None = Field(
        description="booting, provisioning, loading, ready (the proxy uses it), draining, failed."
    )
    state: str = Field(description="The server: booting, active, deleting or deleted.")
    server_id: str | None
    flavor: str
    address: str | None = Field(description="http://host:port of its model server.")
    health_failures: int
    created_at: str | None
    ready_at: str | None
    last_health_at: str | None


class EndpointOut(BaseModel):
    id: str
    model: str
    project_id: str
    name: str
    state: EndpointState
    label: str | None = Field(description="The label it follows (null: pinned to `version`).")
    version: int | None = Field(description="The version it pins (null: follows `label`).")
    target_version: int | None = Field(description="Where the label or pin points now.")
    serving_version: int | None = Field(
        description="The version receiving traffic; moves only once the target is ready."
    )
    traffic: dict[str, int] | None
    replicas: int
    flavor: str
    log_sample_rate: float
    failure_message: str | None
    created_by: str
    created_at: str | None
    updated_at: str | None
    servers: list[EndpointServer] = Field(description="Its replicas not yet deleted.")


class EndpointList(BaseModel):
    endpoints: list[EndpointOut]


MODELS: tuple[type[BaseModel], ...] = (
    EndpointCreate,
    EndpointUpdate,
    Deploy,
    EndpointServer,
    EndpointOut,
    EndpointList,
)


def paths() -> dict[str, Any]:
    from service.api.openapi import JSON_BODY, _json, _param, _ref, _responses

    name = _param("name", "path", {"type": "string"}, "The model's name.")
    eid = _param("endpoint_id", "path", {"type": "string"}, "The endpoint id (ep-...).")
    version = _param("version", "path", {"type": "integer"}, "The version number.")

    def body(model: type[BaseModel]) -> dict[str, Any]:
        return {"required": True, "content": {"application/json": {"schema": _ref(model)}}}

    return {
        "/v1/models/{name}/endpoints": {
            "parameters": [name],
            "post": {
                "summary": "Deploy the model on replicas (member): follow a label (default: "
                "`default`) or pin a version; quota-checked.",
                "description": "409 codes: endpoint_exists (the model has a live endpoint: "
                "PATCH it), version_not_ready (the version, the label's version or a split's "
                "version is not READY), quota_exceeded (the project's servers or GPUs, or the "
                "platform's max_servers, counting jobs' servers and live endpoints' replicas).",
                "operationId": "createEndpoint",
                "requestBody": body(EndpointCreate),
                "responses": _responses(
                    {"202": _json(EndpointOut, "Accepted; the endpoint is CREATING.")},
                    *JSON_BODY,
                    "404",
                    "409",
                ),
            },
            "get": {
                "summary": "The model's endpoints that are not DELETED (reader).",
                "operationId": "listEndpoints",
                "responses": _responses({"200": _json(EndpointList, "The endpoints.")}, "404"),
            },
        },
        "/v1/models/{name}/endpoints/{endpoint_id}": {
            "parameters": [name, eid],
            "get": {
                "summary": "One endpoint with its replicas (reader).",
                "operationId": "getEndpoint",
                "responses": _responses({"200": _json(EndpointOut, "The endpoint.")}, "404"),
            },
            "patch": {
                "summary": "Scale, switch (label or version), split traffic, set the log "
                "sample rate (member).",
                "description": "409 codes: endpoint_deleting, version_not_ready, "
                "quota_exceeded. The switch is rolling: serving_version moves only once the "
                "new version's replicas are ready and warmed.",
                "operationId": "updateEndpoint",
                "requestBody": body(EndpointUpdate),
                "responses": _responses(
                    {"202": _json(EndpointOut, "Accepted; the endpoint is UPDATING.")},
                    *JSON_BODY,
                    "404",
                    "409",
                ),
            },
            "delete": {
                "summary": "Drain and delete every replica (member).",
                "operationId": "deleteEndpoint",
                "responses": _responses(
                    {"202": _json(EndpointOut, "Accepted; the endpoint is DELETING.")},
                    "404",
                    "415",
                ),
            },
        },
        "/v1/models/{name}/versions/{version}/deploy": {
            "parameters": [name, version],
            "post": {
                "summary": "Deploy this version (member): a new pinned endpoint, or a switch "
                "of the model's endpoint.",
                "operationId": "deployVersion",
                "requestBody": body(Deploy),
                "responses": _responses(
                    {"202": _json(EndpointOut, "Accepted.")}, *JSON_BODY, "404", "409"
                ),
            },
        },
    }
