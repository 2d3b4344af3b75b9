"""The job spec schema, and the OpenAPI document generated from it."""

from __future__ import annotations

import re
from typing import Any

import pytest
from pydantic import ValidationError

from service.api.openapi import document
from service.domain.spec import JobSpec

PKG = "local://projects/p/staging/x/pkg.tar.gz"


def make(**over: Any) -> JobSpec:
    body: dict[str, Any] = {"name": "job", "trainer": {"package_uri": PKG, "module": "t.task"}}
    body.update(over)
    return JobSpec.model_validate(body)


def locs(exc: ValidationError) -> set[str]:
    return {".".join(str(p) for p in e["loc"]) for e in exc.errors()}


def test_defaults():
    s = make()
    assert s.type == "training"
    assert s.runtime.key == "tensorflow-2.21"
    assert s.resources.flavor is None and s.resources.workers == 1
    assert s.output.model_uri is None
    assert s.max_runtime_seconds == 3600


def test_trainer_argv_appends_sorted_hyperparameters():
    s = make(
        trainer={"package_uri": PKG, "module": "t", "args": ["--a", "b"]},
        hyperparameters={"lr": 0.5, "deep": True, "act": "relu", "n": 3},
    )
    assert s.trainer_argv() == ["--a", "b", "--act=relu", "--deep=true", "--lr=0.5", "--n=3"]


@pytest.mark.parametrize(
    ("over", "loc"),
    [
        ({"name": "-lead"}, "name"),
        ({"name": "x" * 64}, "name"),
        ({"trainer": {"package_uri": "local://a/./b", "module": "t"}}, "trainer.package_uri"),
        ({"trainer": {"package_uri": "local:///abs", "module": "t"}}, "trainer.package_uri"),
        ({"trainer": {"package_uri": "file:///etc/passwd", "module": "t"}}, "trainer.package_uri"),
        ({"trainer": {"package_uri": PKG, "module": "t;rm -rf /"}}, "trainer.module"),
        ({"trainer": {"package_uri": PKG, "module": "t", "extra": 1}}, "trainer.extra"),
        ({"runtime": {"framework": "pytorch"}}, "runtime.framework"),
        ({"runtime": {"version": "latest"}}, "runtime.version"),
        ({"resources": {"gpu_type": "a100"}}, "resources"),
        ({"resources": {"gpus": -1}}, "resources.gpus"),
        ({"resources": {"parameter_servers": 17}}, "resources.parameter_servers"),
        ({"inputs": {"data_uri": "local://a/../b"}}, "inputs.data_uri"),
        ({"output": {"register_as": "bad name"}}, "output.register_as"),
        ({"env": {"TF_CONFIG": "{}"}}, "env"),
        ({"env": {"1BAD": "x"}}, "env.1BAD.[key]"),
        ({"hyperparameters": {"lr": [1]}}, "hyperparameters.lr.str"),
        ({"labels": {"k": "v\x07"}}, "labels"),
        ({"max_runtime_seconds": 8 * 24 * 3600}, "max_runtime_seconds"),
    ],
)
def test_invalid_specs(over, loc):
    with pytest.raises(ValidationError) as e:
        make(**over)
    assert loc in locs(e.value)


def test_spec_is_frozen():
    s = make()
    with pytest.raises(ValidationError):
        s.name = "other"  # type: ignore[misc]


# -- OpenAPI ------------------------------------------------------------------------------


def _refs(node: Any) -> list[str]:
    if isinstance(node, dict):
        out = [node["$ref"]] if isinstance(node.get("$ref"), str) else []
        return out + [r for v in node.values() for r in _refs(v)]
    if isinstance(node, list):
        return [r for v in node for r in _refs(v)]
    return []


def _has_key(node: Any, key: str) -> bool:
    if isinstance(node, dict):
        return key in node or any(_has_key(v, key) for v in node.values())
    if isinstance(node, list):
        return any(_has_key(v, key) for v in node)
    return False


def test_openapi_document_is_well_formed(client):
    resp = client.get("/v1/openapi.json")
    assert resp.status_code == 200
    doc = resp.get_json()
    assert doc == document()
    assert doc["openapi"].startswith("3.1")
    assert doc["info"]["title"] and doc["info"]["version"]
    schemas = doc["components"]["schemas"]
    # JobSpec is the very model that validates POST /v1/jobs, $defs hoisted to components
    assert schemas["JobSpec"]["required"] == ["name", "trainer"]
    assert set(schemas["JobSpec"]["properties"]) == set(JobSpec.model_fields)
    assert not _has_key(doc, "$defs")
    for ref in _refs(doc):
        assert ref.startswith("#/components/")
        _, _, section, name = ref.split("/")
        assert name in doc["components"][section], ref
    body = doc["paths"]["/v1/jobs"]["post"]["requestBody"]["content"]["application/json"]
    assert body["schema"] == {"$ref": "#/components/schemas/JobSpec"}
    assert set(schemas["Error"]["properties"]) == {"error"}
    assert set(schemas["ErrorDetail"]["required"]) == {"code", "message", "details", "request_id"}


def test_openapi_lists_every_route(app):
    doc = document()
    op_ids = []
    for rule in app.url_map.iter_rules():
        path = re.sub(r"<(?:\w+:)?(\w+)>", r"{\1}", rule.rule)
        assert path in doc["paths"], path
        for method in rule.methods - {"OPTIONS", "HEAD"}:  # type: ignore[operator]
            op = doc["paths"][path][method.lower()]
            op_ids.append(op["operationId"])
            assert any(code.startswith("2") for code in op["responses"])
            assert "500" in op["responses"]
    assert len(op_ids) == len(set(op_ids))
    for path, item in doc["paths"].items():
        names = {p["name"] for p in item.get("parameters", [])}
        for seg in (s[1:-1] for s in path.split("/") if s.startswith("{")):
            assert seg in names, (path, seg)
