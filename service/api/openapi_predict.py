"""The OpenAPI paths of online prediction (service/api/predict.py), merged into
/v1/openapi.json by service/api/openapi.py."""

from __future__ import annotations

from typing import Any

from service.api.predict import VERBS

ERROR = {"$ref": "#/components/schemas/Error"}
TF_ERROR = {
    "type": "object",
    "properties": {"error": {"type": "string"}},
    "required": ["error"],
    "description": "TF Serving's error shape: the replica's own answer, passed through.",
}
EITHER = {"anyOf": [ERROR, TF_ERROR]}
HEADERS = {
    "X-Request-Id": {"$ref": "#/components/headers/X-Request-Id"},
    "X-Model-Version": {
        "description": "The model version that answered (or was asked for); empty when the "
        "request was refused before a version was chosen.",
        "schema": {"type": "string"},
    },
}
NAME = {
    "name": "name",
    "in": "path",
    "required": True,
    "schema": {"type": "string"},
    "description": "The model's name (404 for a name of no model of the caller's project).",
}
VERB = {
    "name": "verb",
    "in": "path",
    "required": True,
    "schema": {"type": "string", "enum": list(VERBS)},
    "description": "TF Serving's method: predict, classify or regress (anything else: 404).",
}
VERSION = {
    "name": "version",
    "in": "path",
    "required": True,
    "schema": {"type": "integer", "minimum": 0},
    "description": "A version of the model.",
}
LABEL = {
    "name": "label",
    "in": "path",
    "required": True,
    "schema": {"type": "string"},
    "description": "A label of the model (e.g. default); the request goes to its version.",
}
BODY = {
    "required": True,
    "content": {
        "application/json": {
            "schema": {
                "type": "object",
                "description": 'TF Serving\'s request: {"instances": [...]} (rows) or '
                '{"inputs": ...} (columns), optional "signature_name"; for classify/regress '
                '{"examples": [...]}. Passed to the replica as sent.',
            }
        }
    },
}


def _reply(description: str, schema: dict[str, Any], retry: bool = False) -> dict[str, Any]:
    headers = dict(HEADERS)
    if retry:
        headers["Retry-After"] = {"schema": {"type": "integer"}}
    return {
        "description": description,
        "headers": headers,
        "content": {"application/json": {"schema": schema}},
    }


def _responses(post: bool) -> dict[str, Any]:
    out = {
        "200": _reply("The replica's answer (TF Serving's shape), unchanged.", {"type": "object"}),
        "400": _reply(
            "The replica refused the request (TF Serving's {error}), or host_not_allowed.", EITHER
        ),
        "401": _reply("No token, or a token Keystone does not accept.", ERROR),
        "403": _reply("The caller lacks the reader role in the project.", ERROR),
        "404": _reply(
            "No such model, version, label or method in the caller's project (not_found); "
            "no_endpoint: the model has no endpoint (deploy first); or the replica's own 404.",
            EITHER,
        ),
        "500": _reply("Internal error, or the replica's own 500.", EITHER),
        "503": _reply(
            "no_replica: no ready replica serves the version (yet), or none answered; or "
            "the database or Keystone is unavailable; or the replica's own 503. See Retry-After.",
            EITHER,
            retry=True,
        ),
        "504": _reply("replica_timeout: the replica did not answer in time.", ERROR),
    }
    if post:
        out["413"] = _reply("The body is larger than predict_max_body_bytes.", ERROR)
        out["415"] = _reply("A form content type (send application/json).", ERROR)
        out["429"] = _reply("Too many predictions for the project; see Retry-After.", ERROR, True)
    return out


def _post(summary: str, op_id: str) -> dict[str, Any]:
    return {
        "post": {
            "summary": summary,
            "operationId": op_id,
            "requestBody": BODY,
            "responses": _responses(post=True),
        }
    }


def _get(summary: str, op_id: str) -> dict[str, Any]:
    return {"get": {"summary": summary, "operationId": op_id, "responses": _responses(False)}}


def paths() -> dict[str, Any]:
    return {
        "/v1/models/{name}:{verb}": {
            "parameters": [NAME, VERB],
            **_post(
                "Predict with the model's endpoint: its serving version, or the version the "
                "traffic split gives the caller (X-Stackml-Caller, else the user, else the "
                "address; sticky).",
                "predict",
            ),
        },
        "/v1/models/{name}/versions/{version}:{verb}": {
            "parameters": [NAME, VERSION, VERB],
            **_post(
                "Predict with one version (a replica of the endpoint must serve it).",
                "predictVersion",
            ),
        },
        "/v1/models/{name}/labels/{label}:{verb}": {
            "parameters": [NAME, LABEL, VERB],
            **_post("Predict with the version a label points at.", "predictLabel"),
        },
        "/v1/models/{name}/metadata": {
            "parameters": [NAME],
            **_get("The serving version's signature metadata (TF Serving's).", "modelMetadata"),
        },
        "/v1/models/{name}/versions/{version}/metadata": {
            "parameters": [NAME, VERSION],
            **_get("One version's signature metadata (TF Serving's).", "versionMetadata"),
        },
    }


__all__ = ["paths"]
