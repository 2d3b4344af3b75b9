"""`stackml models deploy|endpoints|scale|undeploy` against the real API (a loopback port,
SQLite, a queue recorder): each command's request reaches the API and its answer is shown;
`-o json` is the API's JSON; a bad --traffic is a usage error before any request."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from click.testing import Result

from service.db.models import Endpoint, Model, ModelLabel, ModelVersion
from service.db.session import session_scope

CONVERGE = "stackml.converge_endpoint"


def seed(db_url: str) -> None:
    with session_scope(db_url) as s:
        s.add(Model(id="mdl-000000000001", project_id="local", name="m", created_by="u"))
        s.flush()
        for v in (1, 2):
            s.add(
                ModelVersion(
                    model_id="mdl-000000000001",
                    version=v,
                    state="READY",
                    artifact_uri=f"local://projects/local/models/{v}/",
                    created_by="u",
                )
            )
        s.add(ModelLabel(model_id="mdl-000000000001", name="default", version=1))


def test_deploy_list_scale_undeploy(run: Callable[..., Result], db_url: str, enqueued: Any) -> None:
    seed(db_url)
    res = run("models", "deploy", "m", "--replicas", "2", "--traffic", "1=90,2=10")
    assert res.exit_code == 0, res.output
    assert "CREATING" in res.output and "label default" in res.output
    assert "v1 90%" in res.output and "v2 10%" in res.output
    with session_scope(db_url) as s:
        (ep,) = s.query(Endpoint).all()
        ep_id = ep.id
        assert ep.replicas == 2 and ep.traffic == {"1": 90, "2": 10}
    res = run("models", "endpoints", "m", "-o", "json")
    assert res.exit_code == 0, res.output
    assert [e["id"] for e in json.loads(res.output)["endpoints"]] == [ep_id]
    res = run("models", "scale", "m", "3")
    assert res.exit_code == 0, res.output
    assert "3 x local.small" in res.output
    res = run("models", "undeploy", "m", "--endpoint", ep_id)
    assert res.exit_code == 0 and "DELETING" in res.output, res.output
    assert enqueued.calls == [(CONVERGE, ep_id)] * 3


def test_bad_traffic_and_api_refusals_are_clear(
    run: Callable[..., Result], db_url: str, enqueued: Any
) -> None:
    seed(db_url)
    res = run("models", "deploy", "m", "--traffic", "1:90")
    assert res.exit_code == 2 and "VERSION=PERCENT" in res.output
    res = run("models", "deploy", "m", "--label", "default", "--version", "1")
    assert res.exit_code == 2
    res = run("models", "deploy", "m", "--version", "7")
    assert res.exit_code != 0 and "no version 7" in res.output
    res = run("models", "scale", "m", "2")
    assert res.exit_code != 0 and "has no endpoint" in res.output
    assert enqueued.calls == []
