"""WSGI entry points for production servers, private data dir first (as `stackml up` does):

    gunicorn 'service.wsgi:app'                          # the API
    gunicorn -b 10.253.0.1:8080 'service.wsgi:gateway'   # the sandboxes' store gateway

Importing this module makes `data_dir` private (0700, umask 077 for the process and the workers
it forks: docs/security.md) before any app writes a file, and fails loudly when it cannot.
"""

from __future__ import annotations

from flask import Flask

from service.api import create_app
from service.api.store import create_gateway_app
from service.config import get_settings
from service.datadir import secure_data_dir

secure_data_dir(get_settings())


def __getattr__(name: str) -> Flask:
    # built on first use, so a server that serves one of them never builds the other
    if name == "app":
        globals()["app"] = create_app()
    elif name == "gateway":
        globals()["gateway"] = create_gateway_app()
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    app: Flask = globals()[name]
    return app
