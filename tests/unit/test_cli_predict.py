"""`stackml models predict` and StackMLClient.predict against a real API (werkzeug on a
loopback port) proxying to a stand-in replica (a stdlib server speaking TF Serving's shapes)."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path

import click
import pytest

from service.cli.predict import read_instances
from service.client import APIError, StackMLClient
from tests.unit.replicas import FakeReplica, add_model, add_replica


@pytest.fixture
def replica() -> Iterator[FakeReplica]:
    r = FakeReplica("r")
    yield r
    r.kill()


@pytest.fixture
def served(db_url: str, replica: FakeReplica) -> FakeReplica:
    _, ep = add_model(db_url, "iris", versions=(1, 2), labels={"canary": 2})
    add_replica(db_url, ep, replica.port, 1)
    add_replica(db_url, ep, replica.port, 2)
    return replica


def test_predict_reads_a_file_of_instances(run, served, tmp_path: Path):
    f = tmp_path / "rows.json"
    f.write_text(json.dumps([[1.0, 2.0], [3.0, 4.0]]))
    r = run("models", "predict", "iris", "--json-instances", str(f))
    assert r.exit_code == 0, r.output
    answer = json.loads(r.stdout)
    assert answer["predictions"] == [[2.0], [2.0]] and answer["version"] == 1
    assert "version 1 (request req-" in r.stderr
    assert json.loads(served.seen[-1]["body"]) == {"instances": [[1.0, 2.0], [3.0, 4.0]]}


def test_predict_reads_json_lines_from_stdin_with_a_version_or_label(run, served):
    r = run("models", "predict", "iris", "--version", "2", "--json-instances", "-",
            stdin='[1.0, 2.0]\n[3.0, 4.0]\n[5.0, 6.0]\n')  # fmt: skip
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["version"] == 2 and len(json.loads(r.stdout)["predictions"]) == 3
    r = run("models", "predict", "iris", "--label", "canary", "--method", "regress",
            "--json-instances", "-", stdin='{"instances": [[1.0]]}')  # fmt: skip
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["verb"] == "regress" and "version 2" in r.stderr


def test_predict_errors_are_clear(run, served, tmp_path: Path):
    served.mode = "error"
    r = run("models", "predict", "iris", "--json-instances", "-", stdin="[[1.0]]")
    assert r.exit_code != 0 and "model server refused" in r.output
    served.mode = "ok"
    r = run("models", "predict", "nope", "--json-instances", "-", stdin="[[1.0]]")
    assert r.exit_code != 0 and "nope" in r.output
    r = run("models", "predict", "iris", "--version", "1", "--label", "x", "--json-instances", "-",
            stdin="[[1.0]]")  # fmt: skip
    assert r.exit_code != 0 and "not both" in r.output
    r = run("models", "predict", "iris", "--json-instances", "-", stdin="[1.0]\nnot json\n")
    assert r.exit_code != 0 and "line 2 is not JSON" in r.output


def test_client_predict_returns_the_answer_and_its_version(api_url, served):
    client = StackMLClient(api_url)
    answer, meta = client.predict("iris", {"instances": [[1.0]]}, label="canary")
    assert answer["served_by"] == "r" and meta["version"] == "2"
    assert meta["request_id"].startswith("req-")
    with pytest.raises(APIError) as e:
        client.predict("iris", {"instances": [[1.0]]}, version=9)
    assert e.value.status == 404 and e.value.code == "not_found"
    served.mode = "error"
    with pytest.raises(APIError) as e:
        client.predict("iris", {"instances": [[1.0]]})
    assert e.value.status == 400 and e.value.code == "model_error"


def test_read_instances_shapes():
    assert read_instances(io.StringIO("[[1], [2]]")) == {"instances": [[1], [2]]}
    assert read_instances(io.StringIO('{"inputs": {"x": [1]}}')) == {"inputs": {"x": [1]}}
    assert read_instances(io.StringIO('{"a": 1}\n{"a": 2}\n')) == {
        "instances": [{"a": 1}, {"a": 2}]
    }
    assert read_instances(io.StringIO('{"a": 1}')) == {"instances": [{"a": 1}]}
    with pytest.raises(click.BadParameter):
        read_instances(io.StringIO("  "))
