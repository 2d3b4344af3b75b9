"""The emulator's one Flask app: Nova at /compute, Neutron at /network, Glance at /image."""

from __future__ import annotations

import collections
import logging
import threading
from typing import Any

from flask import Flask, Response, g, jsonify, request
from werkzeug.exceptions import HTTPException

from devcloud.emulator import admin, glance, neutron, nova
from devcloud.emulator.auth import Authenticator, KeystoneUnavailable
from devcloud.emulator.catalog import MAX_MICROVERSION, MIN_MICROVERSION, EmulatorConfig
from devcloud.emulator.machines import Machines
from devcloud.emulator.state import StateStore
from devcloud.emulator.wire import (
    ApiError,
    glance_error,
    mv_str,
    neutron_error,
    nova_error,
    request_id,
    unauthorized,
)

log = logging.getLogger("stackml.emulator")
UNAUTHENTICATED = {"nova_versions", "nova_version", "neutron_versions", "glance_versions"}


class Emulator:
    """State, sandboxes and auth behind the app; `start()` recovers after a restart."""

    def __init__(self, cfg: EmulatorConfig) -> None:
        self.cfg = cfg
        self.store = StateStore(cfg.state_dir)
        self.machines = Machines(cfg, self.store)
        self.auth = Authenticator(cfg.keystone_url, cfg.token_cache_seconds, cfg.service_auth)
        self._calls: collections.Counter[str] = collections.Counter()
        self._calls_lock = threading.Lock()
        self.app = create_app(self)

    def start(self) -> None:
        self.machines.recover()

    def count_call(self, key: str) -> None:
        with self._calls_lock:
            self._calls[key] += 1

    def call_counts(self) -> dict[str, int]:
        with self._calls_lock:
            return dict(sorted(self._calls.items()))

    def reset_calls(self) -> None:
        with self._calls_lock:
            self._calls.clear()


def _service(path: str) -> str:
    return path.strip("/").split("/", 1)[0]


def _error(status: int, message: str, neutron_type: str | None = None) -> Response:
    service = _service(request.path)
    if service == "network":
        return neutron_error(status, message, neutron_type)
    if service == "image":
        return glance_error(status, message)
    return nova_error(status, message)


def _base() -> str:
    return request.host_url.rstrip("/")


def create_app(emu: Emulator) -> Flask:
    app = Flask("stackml-emulator")
    app.json.sort_keys = False  # type: ignore[attr-defined]

    @app.before_request
    def _authenticate() -> Response | None:
        g.request_id = request_id()
        if request.endpoint in UNAUTHENTICATED:
            return None
        try:
            ctx = emu.auth.authenticate(request.headers.get("X-Auth-Token"))
        except KeystoneUnavailable as e:
            log.warning("%s", e)
            return _error(503, "Keystone is unavailable to validate the token")
        if ctx is None:
            return unauthorized(emu.cfg.keystone_url)
        g.ctx = ctx
        return None

    @app.after_request
    def _finish(resp: Response) -> Response:
        rid = getattr(g, "request_id", None) or request_id()
        resp.headers["X-OpenStack-Request-Id"] = rid
        if _service(request.path) == "compute":
            resp.headers["X-Compute-Request-Id"] = rid
        rule = request.url_rule.rule if request.url_rule else request.path
        emu.count_call(f"{request.method} {rule}")
        return resp

    @app.errorhandler(ApiError)
    def _api_error(e: ApiError) -> Response:
        return _error(e.status, e.message, e.neutron_type)

    @app.errorhandler(HTTPException)
    def _http_error(e: HTTPException) -> Response:
        status = e.code or 500
        message = "The resource could not be found." if status == 404 else (e.description or "")
        return _error(status, message)

    @app.errorhandler(Exception)
    def _unexpected(e: Exception) -> Response:
        log.exception("unexpected error on %s %s", request.method, request.path)
        return _error(
            500, nova.UNEXPECTED_DELETE.replace("InstanceTerminationFailure", type(e).__name__)
        )

    # ---- version documents (no token needed, as with the real services)

    def nova_version_entry() -> dict[str, Any]:
        return {
            "id": "v2.1",
            "status": "CURRENT",
            "version": mv_str(MAX_MICROVERSION),
            "min_version": mv_str(MIN_MICROVERSION),
            "updated": "2013-07-23T11:33:21Z",
            "links": [{"rel": "self", "href": f"{_base()}/compute/v2.1/"}],
        }

    @app.get("/compute/", endpoint="nova_versions")
    @app.get("/compute", endpoint="nova_versions")
    def nova_versions() -> Any:
        v20 = {
            "id": "v2.0",
            "status": "DEPRECATED",
            "version": "",
            "min_version": "",
            "updated": "2025-07-04T12:00:00Z",
            "links": [{"rel": "self", "href": f"{_base()}/compute/v2/"}],
        }
        return {"versions": [v20, nova_version_entry()]}

    @app.get("/compute/v2.1/", endpoint="nova_version")
    @app.get("/compute/v2.1", endpoint="nova_version")
    def nova_version() -> Any:
        doc = nova_version_entry()
        doc["links"].append(
            {"rel": "describedby", "type": "text/html", "href": "http://docs.openstack.org/"}
        )
        doc["media-types"] = [
            {
                "base": "application/json",
                "type": "application/vnd.openstack.compute+json;version=2.1",
            }
        ]
        return {"version": doc}

    @app.get("/network/", endpoint="neutron_versions")
    @app.get("/network", endpoint="neutron_versions")
    def neutron_versions() -> Any:
        return neutron.version_document(f"{_base()}/network")

    @app.get("/network/v2.0/")
    @app.get("/network/v2.0")
    def neutron_resources() -> Any:
        return neutron.resources_document(f"{_base()}/network")

    @app.get("/image/", endpoint="glance_versions")
    @app.get("/image", endpoint="glance_versions")
    @app.get("/image/versions", endpoint="glance_versions")
    def glance_versions() -> Any:
        resp = jsonify(glance.version_document(f"{_base()}/image"))
        if request.path.rstrip("/") != "/image/versions":
            resp.status_code = 300  # Glance answers its root with Multiple Choices
        return resp

    app.register_blueprint(nova.blueprint(emu))
    app.register_blueprint(neutron.blueprint(emu))
    app.register_blueprint(glance.blueprint(emu))
    app.register_blueprint(admin.blueprint(emu))
    return app
