"""GET /v1/openapi.json: the OpenAPI 3.1 document, generated from the pydantic models that
validate requests (JobSpec) and the response models below, which mirror the serializers."""

from __future__ import annotations

import copy
import functools
from typing import Any

from flask import Blueprint, Response, jsonify
from pydantic import BaseModel, ConfigDict, Field
from pydantic.json_schema import models_json_schema

from service.domain.spec import JobSpec
from service.domain.states import JobState

bp = Blueprint("openapi", __name__)

REF = "#/components/schemas/{model}"
VERSION = "1.0.0"

# -- response models (documentation of what the views return) ----------------------------


class ErrorDetail(BaseModel):
    code: str = Field(description="A stable slug, e.g. validation_failed, job_terminal.")
    message: str
    details: dict[str, Any] = Field(
        description="Context; for 422, `fields` lists each wrong field as {field, message} "
        "with a dotted path."
    )
    request_id: str = Field(description="Also in the X-Request-Id header.")


class Error(BaseModel):
    """Every error has this shape."""

    error: ErrorDetail


class Failure(BaseModel):
    phase: str = Field(description="admit, allocate, provision, train, export or teardown.")
    reason: str = Field(description="A stable slug: no_valid_host, timeout, ...")
    message: str | None


class JobResource(BaseModel):
    name: str
    server_id: str | None
    backend: str
    role: str
    flavor: str
    state: str = Field(description="booting, active, deleting or deleted.")
    created_at: str | None
    deleted_at: str | None


class Job(BaseModel):
    id: str
    name: str
    project_id: str
    type: str
    state: JobState
    failure: Failure | None
    spec: JobSpec
    created_at: str | None
    started_at: str | None
    finished_at: str | None
    resources: list[JobResource]
    output: dict[str, Any] = Field(description="model_uri, and what export recorded.")
    metrics: dict[str, float] = Field(description="The latest value of each metric.")
    cancel_requested: bool


class JobList(BaseModel):
    jobs: list[Job]
    next: str | None = Field(description="Pass as `marker` for the next page; null at the end.")


class Event(BaseModel):
    model_config = ConfigDict(populate_by_name=True)

    at: str | None
    kind: str
    from_: str | None = Field(alias="from")
    to: str | None
    message: str


class EventList(BaseModel):
    events: list[Event]


class MetricPoint(BaseModel):
    value: float
    step: int | None
    epoch: int | None
    at: str | None


class Metrics(BaseModel):
    metrics: dict[str, list[MetricPoint]]


class Package(BaseModel):
    package_uri: str = Field(description="Use as trainer.package_uri.")
    sha256: str
    size: int


class Flavor(BaseModel):
    name: str
    vcpus: int
    ram_mb: int
    disk_gb: int
    gpus: int = Field(description="GPUs passed through to (or virtualised for) each server.")
    gpu_type: str | None = Field(description="e.g. A100; null for CPU-only flavors.")
    price_per_hour: float = Field(description="The configured price, for usage reports.")


class FlavorList(BaseModel):
    flavors: list[Flavor] = Field(description="Sorted by gpus, then price, then name.")


class Health(BaseModel):
    status: str
    checks: dict[str, str] = Field(default_factory=dict)


MODELS: tuple[type[BaseModel], ...] = (
    JobSpec,
    Job,
    JobList,
    EventList,
    Metrics,
    Package,
    FlavorList,
    Health,
    Error,
)

# -- the document -------------------------------------------------------------------------


def _ref(model: type[BaseModel]) -> dict[str, str]:
    return {"$ref": REF.format(model=model.__name__)}


def _json(model: type[BaseModel], description: str) -> dict[str, Any]:
    return {
        "description": description,
        "headers": _request_id_header(),
        "content": {"application/json": {"schema": _ref(model)}},
    }


def _request_id_header() -> dict[str, Any]:
    return {"X-Request-Id": {"$ref": "#/components/headers/X-Request-Id"}}


ERROR_TEXT = {
    "400": "Malformed request (bad JSON, bad query parameter).",
    "401": "Not authenticated, or a bad/expired signature.",
    "404": "No such resource in the caller's project.",
    "409": "The resource's state does not allow this.",
    "411": "Length required.",
    "413": "The body is too large.",
    "415": "Unsupported Content-Type.",
    "422": "Semantically invalid: `details.fields` lists each wrong field.",
    "429": "Too many requests; see Retry-After.",
    "500": "Internal error; quote the request id.",
    "503": "Unavailable; see Retry-After.",
}


def _responses(ok: dict[str, Any], *errors: str) -> dict[str, Any]:
    out = dict(ok)
    for code in (*errors, "500"):
        ref = "#/components/responses/Unavailable" if code == "503" else None
        out[code] = (
            {"$ref": ref}
            if ref
            else {
                "description": ERROR_TEXT[code],
                "headers": _request_id_header(),
                "content": {"application/json": {"schema": _ref(Error)}},
            }
        )
    return out


def _param(
    name: str, where: str, schema: dict[str, Any], description: str, required: bool = False
) -> dict[str, Any]:
    return {
        "name": name,
        "in": where,
        "required": required or where == "path",
        "schema": schema,
        "description": description,
    }


JOB_ID = _param("job_id", "path", {"type": "string"}, "The job id.")
SIGNED = [
    _param("key", "path", {"type": "string"}, "The object key (may contain '/')."),
    _param(
        "temp_url_sig",
        "query",
        {"type": "string"},
        'HMAC-SHA256 hex of "{METHOD}\\n{expires}\\nprefix:{prefix}".',
        True,
    ),
    _param("temp_url_expires", "query", {"type": "integer"}, "Unix seconds.", True),
    _param("temp_url_prefix", "query", {"type": "string"}, "The signed key prefix.", True),
]
TEXT = {"text/plain": {"schema": {"type": "string"}}}
OCTETS = {
    "application/octet-stream": {
        "schema": {"type": "string", "contentMediaType": "application/octet-stream"}
    }
}


def _paths() -> dict[str, Any]:
    job_states = [s.value for s in JobState]
    return {
        "/healthz": {
            "get": {
                "summary": "The process is alive.",
                "operationId": "healthz",
                "security": [],
                "responses": _responses({"200": _json(Health, "Alive.")}),
            }
        },
        "/readyz": {
            "get": {
                "summary": "Database, broker and object store are usable.",
                "operationId": "readyz",
                "security": [],
                "responses": _responses({"200": _json(Health, "Ready.")}, "503"),
            }
        },
        "/v1/openapi.json": {
            "get": {
                "summary": "This document.",
                "operationId": "openapi",
                "security": [],
                "responses": _responses(
                    {
                        "200": {
                            "description": "OpenAPI 3.1.",
                            "headers": _request_id_header(),
                            "content": {"application/json": {"schema": {"type": "object"}}},
                        }
                    }
                ),
            }
        },
        "/v1/jobs": {
            "post": {
                "summary": "Submit a job.",
                "operationId": "submitJob",
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": _ref(JobSpec)}},
                },
                "responses": _responses(
                    {"202": _json(Job, "Accepted; the job is QUEUED.")},
                    "400",
                    "413",
                    "415",
                    "422",
                    "429",
                    "503",
                ),
            },
            "get": {
                "summary": "List the project's jobs, newest first.",
                "operationId": "listJobs",
                "parameters": [
                    _param(
                        "state",
                        "query",
                        {"type": "array", "items": {"enum": job_states}},
                        "Only these states (repeat, or comma-separate).",
                    ),
                    _param(
                        "label",
                        "query",
                        {"type": "array", "items": {"type": "string"}},
                        "key=value; repeat to require several.",
                    ),
                    _param(
                        "limit",
                        "query",
                        {"type": "integer", "minimum": 1, "maximum": 200, "default": 50},
                        "Page size.",
                    ),
                    _param(
                        "marker", "query", {"type": "string"}, "The `next` of the previous page."
                    ),
                ],
                "responses": _responses({"200": _json(JobList, "A page of jobs.")}, "400"),
            },
        },
        "/v1/jobs/{job_id}": {
            "parameters": [JOB_ID],
            "get": {
                "summary": "One job.",
                "operationId": "getJob",
                "responses": _responses({"200": _json(Job, "The job.")}, "404"),
            },
            "delete": {
                "summary": "Forget a finished job whose servers are all deleted.",
                "operationId": "deleteJob",
                "responses": _responses({"204": {"description": "Deleted."}}, "404", "409"),
            },
        },
        "/v1/jobs/{job_id}/cancel": {
            "parameters": [JOB_ID],
            "post": {
                "summary": "Cancel a job (idempotent while it is cancelling).",
                "operationId": "cancelJob",
                "responses": _responses(
                    {"202": _json(Job, "Cancelling or cancelled.")}, "404", "409"
                ),
            },
        },
        "/v1/jobs/{job_id}/logs": {
            "parameters": [JOB_ID],
            "get": {
                "summary": "The trainer's log from a byte offset.",
                "operationId": "jobLogs",
                "parameters": [
                    _param(
                        "offset",
                        "query",
                        {"type": "integer", "minimum": 0, "default": 0},
                        "First byte to return.",
                    ),
                    _param(
                        "limit",
                        "query",
                        {"type": "integer", "minimum": 1},
                        "Most bytes to return (not with follow).",
                    ),
                    _param(
                        "follow",
                        "query",
                        {"type": "boolean", "default": False},
                        "Stream new bytes until the job ends.",
                    ),
                    _param(
                        "timeout",
                        "query",
                        {"type": "number", "default": 3600},
                        "Longest a followed stream stays open, in seconds.",
                    ),
                ],
                "responses": _responses(
                    {
                        "200": {
                            "description": "Log bytes. Without follow, X-Next-Offset is the offset "
                            "to ask for next.",
                            "headers": {
                                **_request_id_header(),
                                "X-Next-Offset": {"schema": {"type": "integer"}},
                                "X-Job-State": {"schema": {"enum": job_states}},
                            },
                            "content": TEXT,
                        }
                    },
                    "400",
                    "404",
                ),
            },
        },
        "/v1/jobs/{job_id}/events": {
            "parameters": [JOB_ID],
            "get": {
                "summary": "The job's timeline.",
                "operationId": "jobEvents",
                "responses": _responses({"200": _json(EventList, "Oldest first.")}, "404"),
            },
        },
        "/v1/jobs/{job_id}/metrics": {
            "parameters": [JOB_ID],
            "get": {
                "summary": "Metric series parsed from the trainer's metric lines.",
                "operationId": "jobMetrics",
                "responses": _responses({"200": _json(Metrics, "Series by name.")}, "404"),
            },
        },
        "/v1/packages": {
            "post": {
                "summary": "Stage a trainer package (.tar.gz) in the project's staging area.",
                "operationId": "uploadPackage",
                "parameters": [
                    _param(
                        "filename", "query", {"type": "string"}, "Name to store a raw upload under."
                    )
                ],
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/gzip": {
                            "schema": {"type": "string", "contentMediaType": "application/gzip"}
                        },
                        "application/x-gzip": {"schema": {"type": "string"}},
                        "application/octet-stream": {"schema": {"type": "string"}},
                        "multipart/form-data": {
                            "schema": {
                                "type": "object",
                                "required": ["file"],
                                "properties": {
                                    "file": {
                                        "type": "string",
                                        "contentMediaType": "application/gzip",
                                    }
                                },
                            }
                        },
                    },
                },
                "responses": _responses({"201": _json(Package, "Stored.")}, "413", "415", "422"),
            }
        },
        "/v1/flavors": {
            "get": {
                "summary": "What the compute backend offers, with GPU count/type and price.",
                "operationId": "listFlavors",
                "parameters": [
                    _param(
                        "gpus",
                        "query",
                        {"type": "integer", "minimum": 0, "maximum": 1024},
                        "Only flavors with exactly this many GPUs.",
                    ),
                    _param(
                        "gpu_type",
                        "query",
                        {"type": "string", "pattern": "^[A-Za-z0-9][A-Za-z0-9._:-]{0,63}$"},
                        "Only flavors with this GPU type (case-insensitive).",
                    ),
                ],
                "responses": _responses({"200": _json(FlavorList, "The flavors.")}, "400", "503"),
            }
        },
        "/v1/store/{key}": {
            "parameters": SIGNED,
            "get": {
                "summary": "Read an object with a signed URL (a read grant).",
                "operationId": "getObject",
                "security": [],
                "responses": _responses(
                    {
                        "200": {
                            "description": "The object; ETag is its md5.",
                            "headers": _request_id_header(),
                            "content": OCTETS,
                        }
                    },
                    "401",
                    "404",
                ),
            },
            "head": {
                "summary": "An object's size and md5 (a read or write grant).",
                "operationId": "headObject",
                "security": [],
                "responses": _responses({"200": {"description": "Exists."}}, "401", "404"),
            },
            "put": {
                "summary": "Write an object with a signed URL (a write grant).",
                "operationId": "putObject",
                "security": [],
                "requestBody": {"required": True, "content": OCTETS},
                "responses": _responses(
                    {
                        "201": {
                            "description": "Stored; ETag is the body's md5.",
                            "headers": _request_id_header(),
                        }
                    },
                    "400",
                    "401",
                    "409",
                    "411",
                    "413",
                    "422",
                ),
            },
        },
    }


def _schemas() -> dict[str, Any]:
    _, top = models_json_schema([(m, "validation") for m in MODELS], ref_template=REF)
    schemas: dict[str, Any] = dict(top.get("$defs", {}))
    return schemas


@functools.cache
def _document() -> dict[str, Any]:
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "stackml",
            "version": VERSION,
            "description": "Cloud ML on OpenStack: training jobs, packages, models.",
        },
        "servers": [{"url": "/"}],
        "paths": _paths(),
        "components": {
            "schemas": _schemas(),
            "headers": {
                "X-Request-Id": {
                    "description": "Identifies the request in logs.",
                    "schema": {"type": "string"},
                }
            },
            "responses": {
                "Unavailable": {
                    "description": ERROR_TEXT["503"],
                    "headers": {
                        **_request_id_header(),
                        "Retry-After": {"schema": {"type": "integer"}},
                    },
                    "content": {"application/json": {"schema": _ref(Error)}},
                }
            },
        },
    }


def document() -> dict[str, Any]:
    """The OpenAPI document (a fresh copy)."""
    return copy.deepcopy(_document())


@bp.get("/v1/openapi.json")
def openapi() -> Response:
    return jsonify(_document())
