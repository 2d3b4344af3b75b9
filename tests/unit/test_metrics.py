"""The metric-line protocol, and metrics ingested from log bytes as they arrive."""

from __future__ import annotations

import json

import pytest

from service.db import jobs as repo
from service.db.session import session_scope
from service.domain.metrics import (
    MetricPoint,
    format_metric_line,
    parse_metric_line,
    parse_metric_lines,
)
from service.domain.spec import JobSpec


def test_good_line():
    pts = parse_metric_line(
        '{"stackml_metric": 1, "epoch": 2, "step": 7, "loss": 0.31, "accuracy": 1}'
    )
    assert pts == [MetricPoint("loss", 0.31, 7, 2), MetricPoint("accuracy", 1.0, 7, 2)]


def test_round_trip_through_format():
    line = format_metric_line({"loss": 0.5, "auc": 0.9}, step=3)
    assert sorted(parse_metric_line(line), key=lambda p: p.name) == [
        MetricPoint("auc", 0.9, 3, None),
        MetricPoint("loss", 0.5, 3, None),
    ]


@pytest.mark.parametrize(
    "line",
    [
        "",
        "plain log output",
        '{"loss": 0.5}',  # no marker
        '{"stackml_metric": 2, "loss": 0.5}',  # unknown protocol version
        '{"stackml_metric": true, "loss": 0.5}',  # a boolean is not protocol version 1
        '{"stackml_metric": 1, "loss": 0.5',  # truncated
        '["stackml_metric", 1]',
        "{not json stackml_metric}",
    ],
)
def test_not_metric_lines(line):
    assert parse_metric_line(line) == []


def test_non_numeric_and_non_finite_values_are_dropped():
    line = (
        '{"stackml_metric": 1, "loss": NaN, "a": Infinity, "b": -Infinity, "ok": 2, '
        '"flag": true, "name": "x", "list": [1]}'
    )
    assert parse_metric_line(line) == [MetricPoint("ok", 2.0, None, None)]


def test_bad_positions_are_ignored_not_fatal():
    pts = parse_metric_line(
        json.dumps({"stackml_metric": 1, "step": "7", "epoch": True, "loss": 1.5})
    )
    assert pts == [MetricPoint("loss", 1.5, None, None)]


def test_many_lines():
    text = "noise\n" + format_metric_line({"l": 1.0}) + "\n" + format_metric_line({"l": 2.0})
    assert [p.value for p in parse_metric_lines(text)] == [1.0, 2.0]


# -- ingestion from log chunks ------------------------------------------------------------


@pytest.fixture
def job_id(db_url: str) -> str:
    spec = JobSpec.model_validate(
        {"name": "m", "trainer": {"package_uri": "local://projects/local/p.tgz", "module": "m"}}
    )
    with session_scope(db_url) as s:
        return repo.create_job(s, "local", spec).id


def test_line_straddling_two_pulls_is_counted_once(db_url, job_id):
    line = (format_metric_line({"loss": 0.25}, epoch=1) + "\n").encode()
    first, second = b"log\n" + line[:10], line[10:] + b"tail without newline"
    with session_scope(db_url) as s:
        off = repo.append_log(s, job_id, 0, first)
        assert repo.metrics(s, job_id) == {}  # the line is not complete yet
        off = repo.append_log(s, job_id, off, second)
    with session_scope(db_url) as s:
        series = repo.metrics(s, job_id)
    assert [(p["value"], p["epoch"]) for p in series["loss"]] == [(0.25, 1)]


def test_redelivered_chunk_is_a_no_op(db_url, job_id):
    chunk = (format_metric_line({"loss": 1.0}) + "\n").encode()
    with session_scope(db_url) as s:
        off = repo.append_log(s, job_id, 0, chunk)
    with session_scope(db_url) as s:
        assert repo.append_log(s, job_id, 0, chunk) == off  # same offset again: ignored
    with session_scope(db_url) as s:
        assert len(repo.metrics(s, job_id)["loss"]) == 1
        assert repo.read_log(s, job_id, 0) == (chunk, off)
