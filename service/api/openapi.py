"""GET /v1/openapi.json: the OpenAPI 3.1 document, generated from the pydantic models that
validate requests (JobSpec) and the response models below, which mirror the serializers."""

from __future__ import annotations

import copy
import functools
from typing import Any

from flask import Blueprint, Response, jsonify
from pydantic import BaseModel, ConfigDict, Field
from pydantic.json_schema import models_json_schema

from service.api.auth import public
from service.api.openapi_models import MODELS as REGISTRY_MODELS
from service.api.quotas import QuotaUpdate
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


class Metered(BaseModel):
    vm_seconds: float
    gpu_hours: float
    cost: float


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
    queue_reason: str | None = Field(
        default=None, description="Why a QUEUED job waits (capacity, quota, backoff)."
    )
    usage: Metered = Field(description="VM-seconds, GPU-hours and cost of its servers so far.")


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


class QuotaValues(BaseModel):
    jobs: int = Field(description="Jobs holding (or getting) servers at once.")
    servers: int = Field(description="Servers (VMs) at once.")
    gpus: int = Field(description="GPUs of those servers.")


class QuotaOverrides(BaseModel):
    jobs: int | None
    servers: int | None
    gpus: int | None


class Quota(BaseModel):
    project_id: str
    limits: QuotaValues = Field(description="The overrides over the configured defaults.")
    in_use: QuotaValues
    queued: int = Field(description="Jobs waiting in QUEUED.")
    defaults: QuotaValues
    overrides: QuotaOverrides = Field(description="null: the default applies.")


class UsageTotals(Metered):
    jobs: int


class ProjectUsage(UsageTotals):
    project_id: str


class JobUsage(Metered):
    id: str
    name: str
    project_id: str
    state: str


class UsageReport(BaseModel):
    project_id: str | None = Field(description="null with all_projects=true.")
    since: str
    until: str
    totals: UsageTotals
    projects: list[ProjectUsage]
    jobs: list[JobUsage]
    endpoints: list[JobUsage] = Field(
        description="Model-serving endpoints (id, name <model>/<endpoint>, state): their "
        "replica servers, counted in totals and projects like jobs' servers."
    )


MODELS: tuple[type[BaseModel], ...] = (
    JobSpec,
    Job,
    JobList,
    EventList,
    Metrics,
    Package,
    FlavorList,
    Health,
    Quota,
    QuotaUpdate,
    UsageReport,
    Error,
    *REGISTRY_MODELS,
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
    "400": "Malformed request (bad JSON, bad query parameter; host_not_allowed: a Host the "
    "API does not answer to).",
    "401": "No token, or a token Keystone does not accept (invalid, expired, revoked); for "
    "/v1/store, a bad or expired signature.",
    "403": "The caller's roles do not allow this (reader writing, all_projects without admin); "
    "cross_origin_refused: a write from a page of another origin; loopback_only: a non-loopback "
    "peer of an auth=noauth API.",
    "404": "No such resource in the caller's project.",
    "405": "The route does not take this method.",
    "409": "The resource's state does not allow this (for a submission: output_exists, the "
    "output prefix holds objects or another job's output).",
    "411": "Length required.",
    "413": "The body is too large.",
    "415": "Unsupported Content-Type (a form type on a route that takes JSON or no body).",
    "422": "Semantically invalid: `details.fields` lists each wrong field (not_implemented: "
    "a field asks for something not available yet).",
    "429": "Too many job submissions or package uploads for the project (per-minute limit); "
    "see Retry-After.",
    "500": "Internal error; quote the request id.",
    "503": "Unavailable (database, backend, or Keystone cannot validate tokens); see Retry-After.",
}
SHARED = {"401": "Unauthorized", "503": "Unavailable"}


def _responses(ok: dict[str, Any], *errors: str, auth: bool = True) -> dict[str, Any]:
    """`ok` plus the listed errors and 500; with `auth`, 401, 403 and 503 too (every
    protected operation can answer them)."""
    out = dict(ok)
    codes = set(errors) | {"500"}
    if auth:
        codes |= {"401", "403", "503"}
    for code in sorted(codes):
        shared = SHARED.get(code)
        out[code] = (
            {"$ref": f"#/components/responses/{shared}"}
            if shared
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


def _any_case(words: list[str]) -> str:
    """A JSON Schema (ECMA 262) pattern matching `words` in any letter case, or nothing."""
    alts = ["".join(f"[{c.lower()}{c.upper()}]" if c.isalpha() else c for c in w) for w in words]
    return "^(" + "|".join(alts) + ")?$"


# how the API reads a boolean query parameter: these words in any case; empty is false
BOOL_WORDS = ["true", "false", "1", "0", "yes", "no", "on", "off"]
BOOL = {"type": "string", "pattern": _any_case(BOOL_WORDS), "default": "false"}
JOB_ID = _param("job_id", "path", {"type": "string"}, "The job id.")
PROJECT = _param("project", "path", {"type": "string"}, "A project id.")
ALL_PROJECTS = _param(
    "all_projects",
    "query",
    BOOL,
    "true: every project's rows (admin only; 403 otherwise).",
)
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
JSON_BODY = "400", "413", "415", "422"


def _paths() -> dict[str, Any]:
    from service.api.openapi_models import paths as model_paths

    job_states = [s.value for s in JobState]
    return {
        **model_paths(),
        "/healthz": {
            "get": {
                "summary": "The process is alive.",
                "operationId": "healthz",
                "security": [],
                "responses": _responses({"200": _json(Health, "Alive.")}, auth=False),
            }
        },
        "/readyz": {
            "get": {
                "summary": "Database, broker and object store are usable.",
                "operationId": "readyz",
                "security": [],
                "responses": _responses({"200": _json(Health, "Ready.")}, "503", auth=False),
            }
        },
        "/metrics": {
            "get": {
                "summary": "Prometheus metrics of the platform (text exposition format 0.0.4); "
                "open with auth=noauth, else a Keystone admin token or the `metrics_token` "
                "as a Bearer token.",
                "operationId": "metrics",
                "security": [],
                "responses": _responses(
                    {
                        "200": {
                            "description": "The metrics.",
                            "headers": _request_id_header(),
                            "content": {"text/plain": {"schema": {"type": "string"}}},
                        }
                    },
                    auth=True,
                ),
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
                    },
                    auth=False,
                ),
            }
        },
        "/v1/jobs": {
            "post": {
                "summary": "Submit a job (member).",
                "operationId": "submitJob",
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": _ref(JobSpec)}},
                },
                "responses": _responses(
                    {"202": _json(Job, "Accepted; the job is QUEUED.")}, *JSON_BODY, "409", "429"
                ),
            },
            "get": {
                "summary": "List the project's jobs, newest first (reader).",
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
                        {"type": "array", "items": {"type": "string", "pattern": "^[^=]+=.*$"}},
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
                    ALL_PROJECTS,
                ],
                "responses": _responses({"200": _json(JobList, "A page of jobs.")}, "400"),
            },
        },
        "/v1/jobs/{job_id}": {
            "parameters": [JOB_ID],
            "get": {
                "summary": "One job (reader).",
                "operationId": "getJob",
                "responses": _responses({"200": _json(Job, "The job.")}, "404"),
            },
            "delete": {
                "summary": "Forget a finished job whose servers are all deleted (member).",
                "operationId": "deleteJob",
                "responses": _responses({"204": {"description": "Deleted."}}, "404", "409", "415"),
            },
        },
        "/v1/jobs/{job_id}/cancel": {
            "parameters": [JOB_ID],
            "post": {
                "summary": "Cancel a job (member; idempotent while it is cancelling).",
                "operationId": "cancelJob",
                "responses": _responses(
                    {"202": _json(Job, "Cancelling or cancelled.")}, "400", "404", "409", "415"
                ),
            },
        },
        "/v1/jobs/{job_id}/logs": {
            "parameters": [JOB_ID],
            "get": {
                "summary": "The trainer's log from a byte offset (reader).",
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
                        {"type": "integer", "minimum": 1, "maximum": 8 << 20},
                        "Most bytes to return (not with follow).",
                    ),
                    _param("follow", "query", BOOL, "true: stream new bytes until the job ends."),
                    _param(
                        "timeout",
                        "query",
                        {
                            "type": "number",
                            "exclusiveMinimum": 0,
                            "maximum": 86400,
                            "default": 3600,
                        },
                        "Longest a followed stream stays open, in seconds.",
                    ),
                    _param(
                        "replica",
                        "query",
                        {
                            "type": "string",
                            "default": "chief",
                            "pattern": "^(chief|worker-[1-9][0-9]*)$",
                        },
                        "Whose log: `chief` (the trainer's), or `worker-<k>` (a distributed "
                        "job's replica k, a batch job's worker k).",
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
                "summary": "The job's timeline (reader).",
                "operationId": "jobEvents",
                "responses": _responses({"200": _json(EventList, "Oldest first.")}, "404"),
            },
        },
        "/v1/jobs/{job_id}/metrics": {
            "parameters": [JOB_ID],
            "get": {
                "summary": "Metric series parsed from the trainer's metric lines (reader).",
                "operationId": "jobMetrics",
                "responses": _responses({"200": _json(Metrics, "Series by name.")}, "404"),
            },
        },
        "/v1/packages": {
            "post": {
                "summary": "Stage a trainer package (.tar.gz) in the project's staging area "
                "(member).",
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
                "responses": _responses({"201": _json(Package, "Stored.")}, *JSON_BODY, "429"),
            }
        },
        "/v1/flavors": {
            "get": {
                "summary": "What the compute backend offers, with GPU count/type and price "
                "(reader).",
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
                "responses": _responses({"200": _json(FlavorList, "The flavors.")}, "400"),
            }
        },
        "/v1/quotas": {
            "get": {
                "summary": "The caller's project's limits and use (reader); admins may name "
                "another project.",
                "operationId": "getOwnQuota",
                "parameters": [
                    _param("project", "query", {"type": "string"}, "Another project (admin).")
                ],
                "responses": _responses({"200": _json(Quota, "The quota.")}, "400"),
            }
        },
        "/v1/quotas/{project}": {
            "parameters": [PROJECT],
            "get": {
                "summary": "A project's limits and use (its members; admins: any).",
                "operationId": "getQuota",
                "responses": _responses({"200": _json(Quota, "The quota.")}, "400"),
            },
            "put": {
                "summary": "Override a project's limits (admin); null drops an override.",
                "operationId": "setQuota",
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": _ref(QuotaUpdate)}},
                },
                "responses": _responses({"200": _json(Quota, "The new quota.")}, *JSON_BODY),
            },
            "delete": {
                "summary": "Drop a project's overrides: back to the defaults (admin).",
                "operationId": "resetQuota",
                "responses": _responses({"204": {"description": "Reset."}}, "400"),
            },
        },
        "/v1/usage": {
            "get": {
                "summary": "VM-seconds, GPU-hours and cost in a window: in total, per project "
                "and per job (reader; admins: any project, or all).",
                "operationId": "getUsage",
                "parameters": [
                    _param(
                        "since",
                        "query",
                        {"type": "string"},
                        "Start, ISO 8601 (a date or a date-time; UTC when no zone is given). "
                        "Default: 30 days before until.",
                    ),
                    _param(
                        "until",
                        "query",
                        {"type": "string"},
                        "End, ISO 8601. Default: now.",
                    ),
                    _param("project", "query", {"type": "string"}, "Another project (admin)."),
                    ALL_PROJECTS,
                ],
                "responses": _responses({"200": _json(UsageReport, "The report.")}, "400"),
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
                    auth=False,
                ),
            },
            "head": {
                "summary": "An object's size and md5 (a read or write grant).",
                "operationId": "headObject",
                "security": [],
                "responses": _responses(
                    {"200": {"description": "Exists."}}, "401", "404", auth=False
                ),
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
                    "404",
                    "409",
                    "411",
                    "413",
                    "422",
                    auth=False,
                ),
            },
        },
    }


def _schemas() -> dict[str, Any]:
    from service.api.openapi_datasets import MODELS as DATASET_MODELS
    from service.api.openapi_endpoints import MODELS as ENDPOINT_MODELS
    from service.api.openapi_schedules import MODELS as SCHEDULE_MODELS

    models = (*MODELS, *ENDPOINT_MODELS, *SCHEDULE_MODELS, *DATASET_MODELS)
    _, top = models_json_schema([(m, "validation") for m in models], ref_template=REF)
    schemas: dict[str, Any] = dict(top.get("$defs", {}))
    return schemas


def _endpoint_paths() -> dict[str, Any]:
    from service.api.openapi_endpoints import paths

    return paths()


def _predict_paths() -> dict[str, Any]:
    from service.api.openapi_predict import paths

    return paths()


def _schedule_paths() -> dict[str, Any]:
    from service.api.openapi_schedules import paths

    return paths()


def _dataset_paths() -> dict[str, Any]:
    from service.api.openapi_datasets import paths

    return paths()


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
        "paths": {
            **_paths(),
            **_endpoint_paths(),
            **_predict_paths(),
            **_schedule_paths(),
            **_dataset_paths(),
        },
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
                },
                "Unauthorized": {
                    "description": ERROR_TEXT["401"],
                    "headers": {
                        **_request_id_header(),
                        "WWW-Authenticate": {
                            "description": 'With keystone auth: Keystone uri="<identity URL>".',
                            "schema": {"type": "string"},
                        },
                    },
                    "content": {"application/json": {"schema": _ref(Error)}},
                },
            },
            "securitySchemes": {
                "keystone": {
                    "type": "apiKey",
                    "in": "header",
                    "name": "X-Auth-Token",
                    "description": "A Keystone token scoped to the project (auth=keystone); "
                    "ignored with auth=noauth.",
                }
            },
        },
        "security": [{"keystone": []}],
    }


def document() -> dict[str, Any]:
    """The OpenAPI document (a fresh copy)."""
    return copy.deepcopy(_document())


@bp.get("/v1/openapi.json")
@public
def openapi() -> Response:
    return jsonify(_document())
