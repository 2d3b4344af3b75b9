"""Glance's image API v2, read-only: the configured images (name -> stackml runtime key)."""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING, Any

from flask import Blueprint, request

from devcloud.emulator.catalog import ImageDef
from devcloud.emulator.wire import ApiError, isotime

if TYPE_CHECKING:
    from devcloud.emulator.app import Emulator

MADE = 1_700_000_000.0
FILTERS = ("name", "id", "status", "visibility", "owner", "disk_format", "container_format")


def image_view(image: ImageDef) -> dict[str, Any]:
    digest = hashlib.sha512(image.name.encode()).hexdigest()
    view: dict[str, Any] = {
        "id": image.id,
        "name": image.name,
        "status": "active",
        "visibility": "public",
        "protected": False,
        "os_hidden": False,
        "disk_format": "qcow2",
        "container_format": "bare",
        "size": 1 << 30,
        "virtual_size": 10 << 30,
        "min_disk": 0,
        "min_ram": 0,
        "checksum": hashlib.md5(image.name.encode(), usedforsecurity=False).hexdigest(),
        "os_hash_algo": "sha512",
        "os_hash_value": digest,
        "owner": "admin",
        "tags": [],
        "created_at": isotime(MADE),
        "updated_at": isotime(MADE),
        "self": f"/v2/images/{image.id}",
        "file": f"/v2/images/{image.id}/file",
        "schema": "/v2/schemas/image",
    }
    if image.runtime:
        view["stackml_runtime"] = image.runtime
    return view


def blueprint(emu: Emulator) -> Blueprint:
    bp = Blueprint("glance", __name__, url_prefix="/image/v2")

    @bp.get("/images")
    def list_images() -> Any:
        images = [image_view(i) for i in emu.cfg.images]
        for key in FILTERS:
            if key in request.args:
                value = request.args[key]
                if key in ("name", "id") and value.startswith("in:"):
                    wanted = set(value[3:].split(","))
                    images = [i for i in images if i[key] in wanted]
                else:
                    images = [i for i in images if str(i[key]) == value]
        images.sort(key=lambda i: i["created_at"] + i["id"], reverse=True)
        marker = request.args.get("marker")
        if marker is not None:
            idx = next((n for n, i in enumerate(images) if i["id"] == marker), None)
            if idx is None:
                raise ApiError(400, f"Invalid marker. Image {marker} could not be found.")
            images = images[idx + 1 :]
        body: dict[str, Any] = {"first": "/v2/images", "schema": "/v2/schemas/images"}
        limit = request.args.get("limit")
        if limit is not None and limit.isdigit() and len(images) > int(limit):
            images = images[: int(limit)]
            body["next"] = f"/v2/images?marker={images[-1]['id']}&limit={limit}"
        body["images"] = images
        return body

    @bp.get("/images/<image_id>")
    def show_image(image_id: str) -> Any:
        image = emu.cfg.image(image_id)
        if image is None:
            raise ApiError(404, f"No image found with ID {image_id}")
        return image_view(image)

    return bp


def version_document(base: str) -> dict[str, Any]:
    minors = range(16, -1, -1)
    return {
        "versions": [
            {
                "id": f"v2.{m}",
                "status": "CURRENT" if m == 16 else "SUPPORTED",
                "links": [{"rel": "self", "href": f"{base}/v2/"}],
            }
            for m in minors
        ]
    }
