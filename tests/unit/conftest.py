"""Unit fixtures: settings in tmp_path, a real SQLite file database, the app and its client.

Helpers are handed out as fixtures (`tarball`, `spec`, `error_of`) so that test modules
need not import this file by name."""

from __future__ import annotations

import io
import tarfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result
from flask import Flask
from flask.testing import FlaskClient

from service.api import create_app
from service.backends.storage.local import LocalStore
from service.cli import cli
from service.config import Settings
from service.db.models import Base
from service.db.session import dispose_all, engine_for
from service.httpserver import ApiServer

PROJECT = "local"


class EnqueueRecorder:
    """Stands in for service.queue.enqueue: records (task, job_id); can act like a dead broker."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []
        self.fail = False

    def __call__(self, task: str, job_id: str) -> None:
        if self.fail:
            raise ConnectionError("broker down")
        self.calls.append((task, job_id))


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(
        data_dir=tmp_path / "data",
        database_url=f"sqlite:///{tmp_path / 'stackml.db'}",
        redis_url="redis://127.0.0.1:1/0",  # nothing listens: the broker check fails fast
        secret_key="unit-test-signing-key",
        auth="noauth",
        compute="sandbox",
        store="local",
        host="127.0.0.1",
        port=8080,
        public_url="",
        local_project=PROJECT,
        max_body_bytes=64 * 1024,
        max_package_bytes=256 * 1024,
    )


@pytest.fixture
def db_url(settings: Settings) -> Iterator[str]:
    Base.metadata.create_all(engine_for(settings.db_url))
    yield settings.db_url
    dispose_all()


@pytest.fixture
def enqueued() -> EnqueueRecorder:
    return EnqueueRecorder()


@pytest.fixture
def app(settings: Settings, db_url: str, enqueued: EnqueueRecorder) -> Flask:
    app = create_app(settings, enqueue=enqueued)
    app.config["LOG_FOLLOW_INTERVAL"] = 0.02
    return app


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    return app.test_client()


@pytest.fixture
def api_url(app: Flask) -> Iterator[str]:
    """The app served over real HTTP on an ephemeral loopback port, by the server `stackml up`
    uses (service/httpserver.py)."""
    server = ApiServer(app, "127.0.0.1", 0, access_log=None, name="test-api")
    server.start()
    yield f"http://127.0.0.1:{server.port}"
    server.stop()


@pytest.fixture
def run(api_url: str) -> Callable[..., Result]:
    """`run(*args, stdin=None, env=None)`: the `stackml` CLI (CliRunner) with `--url api_url`,
    200 columns wide, `stdin` as its input and `env` added to its environment."""
    runner = CliRunner()

    def invoke(*args: str, stdin: str | None = None, env: dict[str, str] | None = None) -> Result:
        return runner.invoke(
            cli,
            ["--url", api_url, *args],
            input=stdin,
            env={"COLUMNS": "200", **(env or {})},
        )

    return invoke


@pytest.fixture
def store(app: Flask) -> LocalStore:
    s = app.extensions["stackml"].store
    assert isinstance(s, LocalStore)
    return s


def make_tarball(
    files: dict[str, bytes] | None = None, extra: list[tarfile.TarInfo] | None = None
) -> bytes:
    """A .tar.gz holding `files` (name -> content) and `extra` raw members (links, devices)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for name, data in (files or {}).items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
        for info in extra or []:
            tf.addfile(info)
    return buf.getvalue()


TRAINER_FILES = {
    "trainer/__init__.py": b"",
    "trainer/task.py": b"print('training')\n",
}


@pytest.fixture
def package_uri(store: LocalStore) -> str:
    key = f"projects/{PROJECT}/staging/abc/trainer.tar.gz"
    store.put(key, make_tarball(TRAINER_FILES))
    return store.uri(key)


def job_spec(package_uri: str, **overrides: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "name": "mnist",
        "trainer": {"package_uri": package_uri, "module": "trainer.task", "args": ["--x=1"]},
        "hyperparameters": {"lr": 0.1},
        "labels": {"team": "vision"},
    }
    spec.update(overrides)
    return spec


def assert_error(resp: Any, status: int, code: str | None = None) -> dict[str, Any]:
    """The one error shape, with the request id that the header carries."""
    assert resp.status_code == status, resp.get_data(as_text=True)
    body = resp.get_json()
    assert set(body) == {"error"}
    err = body["error"]
    assert set(err) == {"code", "message", "details", "request_id"}
    assert err["request_id"] and err["request_id"] == resp.headers["X-Request-Id"]
    assert isinstance(err["details"], dict)
    if code is not None:
        assert err["code"] == code
    return err  # type: ignore[no-any-return]


@pytest.fixture
def tarball() -> Any:
    return make_tarball


@pytest.fixture
def spec() -> Any:
    return job_spec


@pytest.fixture
def error_of() -> Any:
    return assert_error
