"""/v1/flavors: what the configured compute backend offers, with GPU count/type and price."""

from __future__ import annotations

import re
from typing import Any

from flask import Blueprint, Response, jsonify, request

from service.api import ctx
from service.api.auth import current_project
from service.backends import registry
from service.backends.interfaces import Flavor
from service.domain.errors import BackendError, InvalidRequest, ServiceUnavailable

bp = Blueprint("flavors", __name__)

MAX_GPUS = 1024
# GPU type names as operators write them in flavor extra specs (e.g. "A100", "h100-80gb")
GPU_TYPE_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,63}")


class BackendUnavailable(ServiceUnavailable):
    """The compute backend did not answer (Nova down, bad credentials, ...): retry later."""

    code = "backend_unavailable"


@bp.get("/v1/flavors")
def list_() -> Response:
    current_project()  # any authenticated caller may see the catalogue
    gpus = _gpus_arg()
    gpu_type = _gpu_type_arg()
    settings = ctx().settings
    try:
        flavors = registry.compute(settings).flavors()
    except BackendError as e:
        raise BackendUnavailable(
            f"the {settings.compute} compute backend cannot list flavors: {e.message}",
            details={"backend": settings.compute, "reason": e.reason},
        ) from e
    if gpus is not None:
        flavors = [f for f in flavors if f.gpus == gpus]
    if gpu_type is not None:
        flavors = [f for f in flavors if (f.gpu_type or "").lower() == gpu_type.lower()]
    ordered = sorted(flavors, key=lambda f: (f.gpus, f.price_per_hour, f.name))
    return jsonify({"flavors": [serialize(f) for f in ordered]})


def serialize(f: Flavor) -> dict[str, Any]:
    return {
        "name": f.name,
        "vcpus": f.vcpus,
        "ram_mb": f.ram_mb,
        "disk_gb": f.disk_gb,
        "gpus": f.gpus,
        "gpu_type": f.gpu_type,
        "price_per_hour": f.price_per_hour,
    }


def _gpus_arg() -> int | None:
    raw = request.args.get("gpus")
    if raw is None or raw == "":
        return None
    try:
        val = int(raw)
    except ValueError as e:
        raise InvalidRequest(
            "gpus must be an integer", details={"parameter": "gpus", "value": raw[:64]}
        ) from e
    if not 0 <= val <= MAX_GPUS:
        raise InvalidRequest(
            f"gpus must be between 0 and {MAX_GPUS}", details={"parameter": "gpus", "value": val}
        )
    return val


def _gpu_type_arg() -> str | None:
    raw = request.args.get("gpu_type")
    if raw is None or raw == "":
        return None
    if not GPU_TYPE_RE.fullmatch(raw):
        raise InvalidRequest(
            "gpu_type must be 1-64 letters, digits, '.', '_', ':' or '-'",
            details={"parameter": "gpu_type"},
        )
    return raw
