"""Schemathesis against the app's own /v1/openapi.json, in process (WSGI, SQLite in tmp, a
recorder for the queue, no network): every operation, positive and negative examples, a
bounded number each. Checks: no 5xx, every status documented, bodies, content types and
headers as documented, and invalid input refused with a 4xx."""

from __future__ import annotations

import time
from typing import Any

import pytest
import schemathesis
from flask import Flask
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.core.failures import Failure, FailureGroup
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from service.api import auth, create_app
from service.api.auth import Caller, NotAuthenticated
from service.config import Settings
from service.db import jobs as repo
from service.db.session import session_scope
from service.domain.spec import JobSpec

# examples per operation and generation mode; ~20 operations x 2 modes stay well under 60 s
EXAMPLES = 40
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    response_headers_conformance,
]


def _seed(db_url: str, package_uri: str) -> dict[str, str]:
    """Jobs for the path parameters: one of this project, one terminal, one of another."""
    spec = JobSpec.model_validate(
        {"name": "seed", "trainer": {"package_uri": package_uri, "module": "trainer.task"}}
    )
    with session_scope(db_url) as s:
        mine = repo.create_job(s, "local", spec).id
        done = repo.create_job(s, "local", spec).id
        theirs = repo.create_job(s, "other", spec).id
        repo.append_log(s, mine, 0, b'starting\n{"stackml_metric": 1, "epoch": 1, "loss": 0.5}\n')
    return {"mine": mine, "done": done, "theirs": theirs}


def _strategy(op: Any, mode: GenerationMode, ids: dict[str, str], valid_spec: dict) -> Any:
    options = [op.as_strategy(generation_mode=mode)]
    params = [p.name for p in op.path_parameters]
    if "job_id" in params and mode is GenerationMode.POSITIVE:
        options += [op.as_strategy(path_parameters={"job_id": i}) for i in ids.values()]
    if "project" in params and mode is GenerationMode.POSITIVE:
        options += [op.as_strategy(path_parameters={"project": p}) for p in ("local", "other")]
    if op.method.upper() == "POST" and op.path == "/v1/jobs" and mode is GenerationMode.POSITIVE:
        options.append(op.as_strategy(body=valid_spec, media_type="application/json"))
    return st.one_of(options)


class Tally:
    def __init__(self) -> None:
        self.ran: dict[str, int] = {}
        self.server_errors = 0
        self.failures: list[str] = []


def _fuzz(op: Any, mode: GenerationMode, strategy: Any, tally: Tally) -> None:
    """Up to EXAMPLES cases of one operation in one mode; at most two failures kept."""
    checks = CHECKS + ([negative_data_rejection] if mode.is_negative else [])
    seen: list[str] = []

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        database=None,
        derandomize=True,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(case=strategy)
    def run(case: Any) -> None:
        tally.ran[op.label] = tally.ran.get(op.label, 0) + 1
        response = case.call()
        if response.status_code >= 500:
            tally.server_errors += 1
        if mode.is_negative and response.status_code == 413:
            return  # a body over the API's limit is refused unread: a rejection too
        try:
            case.validate_response(response, checks=checks)
        except (FailureGroup, Failure) as e:  # collect every failure, report them all
            if len(seen) < 2:
                seen.append(f"{op.label} [{mode.value}]: {str(e)[:1500]}")

    try:
        run()
    except Unsatisfiable:
        pass  # nothing to make invalid (an operation without parameters, in negative mode)
    except Exception as e:  # noqa: BLE001 - any other hypothesis error is a failure to report
        seen.append(f"{op.label} [{mode.value}]: {type(e).__name__}: {str(e)[:500]}")
    tally.failures += seen


class AnyTokenAuth:
    """Keystone's contract without Keystone: a request with no X-Auth-Token is 401 (so that
    requests the document calls invalid for lack of one are refused); any token is a caller
    of project `local` with every role."""

    def wrap(self, app: Any) -> Any:
        return app

    def caller(self, request: Any) -> Caller:
        token = request.headers.get("X-Auth-Token")
        if not token:
            raise NotAuthenticated("no token", challenge='Keystone uri="http://k.invalid/v3"')
        return Caller("local", "fuzzer", frozenset({"admin", "member", "reader"}), token)


@pytest.fixture
def fuzz_app(settings: Settings, db_url: str, enqueued: Any) -> Flask:
    # a broker /readyz can check without a server, so that readyz answers 200 here
    app = create_app(settings.model_copy(update={"redis_url": "memory://"}), enqueue=enqueued)
    app.extensions[auth.EXTENSION] = AnyTokenAuth()
    return app


def test_openapi_fuzz(
    fuzz_app: Flask, db_url: str, package_uri: str, spec: Any, capsys: Any
) -> None:
    schema = schemathesis.openapi.from_wsgi("/v1/openapi.json", fuzz_app)
    ids = _seed(db_url, package_uri)
    valid_spec = spec(package_uri)
    tally = Tally()
    started = time.monotonic()
    operations = [r.ok() for r in schema.get_all_operations()]
    assert len(operations) >= 20, [o.label for o in operations]
    for op in operations:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            _fuzz(op, mode, _strategy(op, mode, ids, valid_spec), tally)

    total = sum(tally.ran.values())
    elapsed = time.monotonic() - started
    line = (
        f"schemathesis: {total} examples over {len(tally.ran)} operations in {elapsed:.1f}s; "
        f"5xx: {tally.server_errors}; failures: {len(tally.failures)}"
    )
    with capsys.disabled():  # the figure for the closing note, also under -q
        print(f"\n{line}")
    assert tally.server_errors == 0, "\n\n".join(tally.failures)
    assert not tally.failures, "\n\n".join(tally.failures)
    assert len(tally.ran) == len(operations)
