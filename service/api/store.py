"""/v1/store: the local store's stand-in for Swift TempURLs, used by sandboxes directly.

`GET|HEAD|PUT /v1/store/<key>?temp_url_sig=&temp_url_expires=&temp_url_prefix=`. The
signature is the authorisation (no auth header): a read grant signs GET, a write grant
signs PUT, HEAD takes either. A bad, expired or out-of-prefix signature answers 401, as
Swift does. PUT streams to a temporary file and renames it into place, answering 201 with
the body's md5 as `Etag`; a request `Etag` header that does not match answers 422.
"""

from __future__ import annotations

from flask import Blueprint, Flask, Response, request, send_file

from service.api import ctx
from service.api.auth import public
from service.api.errors import TempUrlDenied
from service.backends.interfaces import ObjectStore
from service.backends.storage.local import LocalStore
from service.config import Settings
from service.domain.errors import (
    Conflict,
    GrantDenied,
    InvalidRequest,
    NotFound,
    StoreError,
    ValidationFailed,
)

bp = Blueprint("store", __name__)

# Swift's largest single object; bigger models go up in parts (not offered locally)
MAX_OBJECT_BYTES = 5 * 1024**3


def _store() -> LocalStore:
    store = ctx().store
    if not isinstance(store, LocalStore):
        raise NotFound("this deployment's object store serves its own signed URLs")
    return store


def _verify(store: LocalStore, method: str, key: str) -> None:
    args = request.args
    try:
        store.verify(
            method,
            key,
            args.get("temp_url_sig", ""),
            args.get("temp_url_expires", ""),
            args.get("temp_url_prefix", ""),
        )
    except GrantDenied as e:
        raise TempUrlDenied(e.message, details=e.details) from e


@bp.route("/v1/store/<path:key>", methods=["GET", "HEAD"])
@public  # the signature is the authorisation
def get_object(key: str) -> Response:
    store = _store()
    _verify(store, request.method, key)
    info = store.info(key)
    if info is None:
        raise NotFound(f"no object {key}")
    resp = send_file(
        store.path(key),
        mimetype="application/octet-stream",
        etag=info.etag,
        conditional=True,
        max_age=0,
    )
    return resp


@bp.put("/v1/store/<path:key>")
@public  # the signature is the authorisation
def put_object(key: str) -> Response:
    store = _store()
    _verify(store, "PUT", key)
    request.max_content_length = MAX_OBJECT_BYTES
    if request.content_length is None and not request.environ.get("wsgi.input_terminated"):
        raise InvalidRequest("a PUT needs Content-Length or chunked transfer encoding")
    expected = request.headers.get("Etag")
    try:
        info = store.put_stream(key, request.stream, expected_md5=expected)
    except StoreError as e:
        if e.reason == "etag_mismatch":
            raise ValidationFailed(e.message, details=e.details) from e
        raise Conflict(e.message) from e
    resp = Response(status=201)
    resp.set_etag(info.etag)
    return resp


def _no_enqueue(task: str, job_id: str) -> None:
    raise RuntimeError("the store gateway enqueues nothing")


def create_gateway_app(settings: Settings | None = None, store: ObjectStore | None = None) -> Flask:
    """The sandbox store gateway (sandbox_net.py): the signed `/v1/store` routes and nothing
    else (no jobs, no packages, no health), for the one host address isolated sandboxes reach.
    Open to any peer and any Host: the signature is the authorisation. `stackml up` serves it;
    elsewhere serve it on <gateway>:<store port>, e.g. gunicorn -b 10.253.0.1:8080
    'service.wsgi:gateway'."""
    from service.api import EXTENSION, Context
    from service.api import errors as api_errors
    from service.backends import registry
    from service.config import get_settings

    settings = settings or get_settings()

    app = Flask("stackml.store_gateway", static_folder=None)
    app.url_map.strict_slashes = False
    app.extensions[EXTENSION] = Context(
        settings=settings, store=store or registry.store(settings), enqueue=_no_enqueue
    )
    api_errors.install(app)
    app.register_blueprint(bp)
    return app
