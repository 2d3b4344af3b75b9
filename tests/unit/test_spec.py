"""The job spec schema, and the OpenAPI document generated from it."""

from __future__ import annotations

import re
from typing import Any

import pytest
from pydantic import ValidationError

from service.api.openapi import document
from service.domain import outputs
from service.domain.spec import MASKED, JobSpec, masked_spec, unbuilt_fields

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
        ({"output": {"register_as": "Mnist"}}, "output.register_as"),
        ({"output": {"register_as": "m:predict"}}, "output.register_as"),
        ({"env": {"TF_CONFIG": "{}"}}, "env"),
        ({"env": {"1BAD": "x"}}, "env.1BAD.[key]"),
        ({"hyperparameters": {"lr": [1]}}, "hyperparameters.lr.str"),
        ({"labels": {"k": "v\x07"}}, "labels"),
        ({"max_runtime_seconds": 8 * 24 * 3600}, "max_runtime_seconds"),
        ({"restart_policy": "Always"}, "restart_policy"),
        ({"restart_policy": "onfailure"}, "restart_policy"),
        ({"max_restarts": -1}, "max_restarts"),
        ({"max_restarts": 21}, "max_restarts"),
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
    assert schemas["JobSpec"]["required"] == ["name"]  # trainer or prediction, by type
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
        for seg in re.findall(r"\{(\w+)\}", path):  # e.g. /v1/models/{name}:{verb}
            assert seg in names, (path, seg)


# -- what is not built yet, masked env, output prefixes -----------------------------------


@pytest.mark.parametrize(
    ("over", "fields"),
    [
        ({"resources": {"workers": 2}}, []),  # distributed training is built
        ({"resources": {"workers": 64, "parameter_servers": 16}}, []),  # and parameter servers
    ],
)
def test_unbuilt_fields_are_named(over, fields):
    assert [f for f, _ in unbuilt_fields(make(**over))] == fields


BATCH = {
    "name": "b",
    "type": "batch_prediction",
    "prediction": {
        "model": "m",
        "input_uris": ["local://projects/p/in.jsonl"],
        "output_prefix": "local://projects/p/out/",
    },
}


def test_a_batch_job_refuses_resources_workers():
    with pytest.raises(ValidationError) as e:
        JobSpec.model_validate({**BATCH, "resources": {"workers": 2}})
    assert "resources.workers" in locs(e.value)
    JobSpec.model_validate({**BATCH, "resources": {"workers": 1}})
    with pytest.raises(ValidationError) as e:
        JobSpec.model_validate({**BATCH, "resources": {"evaluator": True}})
    assert "resources.evaluator" in locs(e.value)


def test_defaults_and_their_explicit_values_are_built():
    assert unbuilt_fields(make()) == []
    explicit = make(
        type="training",
        resources={"workers": 1, "parameter_servers": 0},
        output={"register_as": None},
    )
    assert unbuilt_fields(explicit) == []
    # registering the model is built (issue 9): a model name is accepted, not refused
    assert unbuilt_fields(make(output={"register_as": "mnist"})) == []


def test_masked_spec_keeps_names_not_values():
    data = make(env={"TOKEN": "hunter2", "MODE": "x"}).model_dump(mode="json")
    shown = masked_spec(data)
    assert shown["env"] == {"TOKEN": MASKED, "MODE": MASKED}
    assert "hunter2" not in str(shown)
    assert data["env"]["TOKEN"] == "hunter2"  # the stored spec is not changed
    assert masked_spec({"name": "x"}) == {"name": "x"}


AREA = "projects/p/"


@pytest.mark.parametrize(
    ("prefix", "why"),
    [
        (AREA + "staging/", "staging area"),
        (AREA + "staging/abc/", "staging area"),
        (AREA + "models/", "models area"),
        (AREA + "models/job-0123/", "default prefixes"),
        (AREA + "models/job-0123/deeper/", "default prefixes"),
        (AREA + "models/mine/", None),
        (AREA + "stagingx/", None),
        (AREA + "exports/v1/", None),
    ],
)
def test_output_prefix_problems(prefix, why):
    problem = outputs.prefix_problem(prefix, AREA)
    assert (problem is None) if why is None else (why in str(problem))


def test_output_prefix_helpers():
    assert outputs.default_prefix(AREA, "job-1") == AREA + "models/job-1/"
    assert outputs.as_prefix("a/b") == outputs.as_prefix("a/b/") == "a/b/"
    assert outputs.ancestors("a/b/c/") == ["a/", "a/b/", "a/b/c/"]
    assert outputs.overlaps("a/b/", "a/b/c/") and outputs.overlaps("a/b/c", "a/b")
    assert not outputs.overlaps("a/b/", "a/bc/")


def test_openapi_documents_what_a_submission_may_answer():
    doc = document()
    post = doc["paths"]["/v1/jobs"]["post"]["responses"]
    assert {"202", "409", "422"} <= set(post)
    props = doc["components"]["schemas"]
    assert (
        "ParameterServerStrategy"
        in (props["Resources"]["properties"]["parameter_servers"]["description"])
    )
    assert "gang" in props["Resources"]["properties"]["workers"]["description"]
    assert "ExitCode" in props["JobSpec"]["properties"]["restart_policy"]["description"]
    assert "gang" in props["Prediction"]["properties"]["max_workers"]["description"]
    assert "SUCCEEDS" in props["Output"]["properties"]["register_as"]["description"]
    assert "output_exists" in props["Output"]["properties"]["model_uri"]["description"]
    assert MASKED in props["JobSpec"]["properties"]["env"]["description"]


def test_restart_policy_defaults_to_never_and_which_exits_each_policy_retries():
    from service.domain.spec import retryable_exit

    s = make()
    assert (s.restart_policy, s.max_restarts) == ("Never", 3)
    assert make(restart_policy="ExitCode", max_restarts=0).max_restarts == 0
    codes = [1, 2, 41, 42, 43, 127, 128, 137, 143, 255]
    assert [c for c in codes if retryable_exit("Never", c)] == []
    assert [c for c in codes if retryable_exit("OnFailure", c)] == codes
    assert [c for c in codes if retryable_exit("ExitCode", c)] == [42, 128, 137, 143, 255]


@pytest.mark.parametrize("field", [{"restart_policy": "OnFailure"}, {"max_restarts": 5}])
def test_a_batch_job_refuses_the_restart_fields(field):
    with pytest.raises(ValidationError) as e:
        JobSpec.model_validate({**BATCH, **field})
    assert set(field) <= locs(e.value)
    # the defaults, as a stored spec repeats them, are accepted
    JobSpec.model_validate({**BATCH, "restart_policy": "Never", "max_restarts": 3})
