"""The metric-line protocol, and metrics ingested from log bytes as they arrive."""

from __future__ import annotations

import json
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from service.db import jobs as repo
from service.db.session import session_scope
from service.domain.metrics import (
    MARKER,
    MAX_POINTS_PER_LINE,
    POSITION_MAX,
    POSITION_MIN,
    MetricPoint,
    cap_points,
    format_metric_line,
    inspect_metric_line,
    parse_metric_line,
    parse_metric_lines,
    points_allowed,
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


# -- hostile trainer output ---------------------------------------------------------------

M = '{"stackml_metric": 1, '


@pytest.mark.parametrize(
    ("line", "kept", "why"),
    [
        # a 400-digit integer: float() overflows (this crashed every poll)
        (M + '"loss": ' + "9" * 400 + ', "ok": 1}', {"ok": 1.0}, "beyond the range of a float"),
        # a 20-digit step: SQLite cannot hold it (this crashed every poll too)
        (M + '"step": ' + "9" * 20 + ', "ok": 1}', {"ok": 1.0}, "step is outside"),
        (M + '"epoch": -' + "9" * 20 + ', "ok": 1}', {"ok": 1.0}, "epoch is outside"),
        # fits SQLite's 64 bits, not PostgreSQL's INTEGER column
        (M + '"step": 4294967296, "ok": 1}', {"ok": 1.0}, "step is outside"),
        # more digits than int() converts
        (M + '"loss": ' + "9" * 5000 + "}", {}, "unreadable number"),
        (M + '"x": ' + "[" * 30000 + "]" * 30000 + ', "ok": 1}', {}, "nested too deeply"),
        (M + '"pad": "' + "x" * 70000 + '", "ok": 1}', {}, "longer than"),
        (M + '"\\ud800": 1, "ok": 2}', {"ok": 2.0}, "valid UTF-8"),
        (M + '"a\\u0000b": 1, "ok": 2}', {"ok": 2.0}, "control characters"),
        (M + '"": 1, "ok": 2}', {"ok": 2.0}, "1 to 128 characters"),
        (M + '"' + "n" * 129 + '": 1, "ok": 2}', {"ok": 2.0}, "1 to 128 characters"),
        (M + '"big": 1e999, "ok": 2}', {"ok": 2.0}, "not finite"),
        (M + '"obj": {"a": 1}, "ok": 2}', {"ok": 2.0}, "not a number"),
    ],
)
def test_hostile_lines_are_dropped_with_a_reason(line, kept, why):
    parsed = inspect_metric_line(line)
    assert {p.name: p.value for p in parsed.points} == kept
    assert any(why in p for p in parsed.problems), parsed.problems
    assert parse_metric_line(line) == list(parsed.points)


def test_too_many_metrics_on_one_line_keeps_the_first():
    obj = {"stackml_metric": 1, **{f"m{i}": i for i in range(MAX_POINTS_PER_LINE + 5)}}
    parsed = inspect_metric_line(json.dumps(obj))
    assert [p.name for p in parsed.points] == [f"m{i}" for i in range(MAX_POINTS_PER_LINE)]
    assert parsed.problems


def test_edges_of_the_position_range_are_kept():
    line = json.dumps({"stackml_metric": 1, "step": POSITION_MAX, "epoch": POSITION_MIN, "l": 1})
    assert parse_metric_line(line) == [MetricPoint("l", 1.0, POSITION_MAX, POSITION_MIN)]


def test_ordinary_output_has_no_problems():
    for line in ("plain", "{}", '{"stackml_metric": 2}', M + '"ok": 1}', b"bytes \xff"):
        assert inspect_metric_line(line).problems == ()


@pytest.mark.parametrize("line", [None, 17, 1.5, ["x"], b'{"stackml_metric": 1, "a": 1}'])
def test_not_a_string_is_no_crash(line):
    got = parse_metric_line(line)
    assert got == ([MetricPoint("a", 1.0, None, None)] if isinstance(line, bytes) else [])


JSON_LEAF = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=-(10**500), max_value=10**500)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=20)
)
JSON_VALUE = st.recursive(
    JSON_LEAF,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=20,
)
NAMES = st.text(max_size=140) | st.sampled_from(["step", "epoch", "loss", MARKER])


def _assert_storable(points: list[MetricPoint]) -> None:
    for p in points:
        assert isinstance(p.value, float) and math.isfinite(p.value)
        for pos in (p.step, p.epoch):
            assert pos is None or (type(pos) is int and POSITION_MIN <= pos <= POSITION_MAX)
            assert pos is None or -(1 << 63) <= pos < (1 << 63)
        assert isinstance(p.name, str) and 1 <= len(p.name) <= 128
        p.name.encode("utf-8")  # PostgreSQL takes it
        assert "\x00" not in p.name


@settings(max_examples=400, deadline=None)
@given(st.dictionaries(NAMES, JSON_VALUE, max_size=8), st.sampled_from([1, 1, 1, True, 2]))
def test_any_metric_object_parses_to_storable_points(obj, marker):
    obj = {MARKER: marker, **obj}
    points = parse_metric_line(json.dumps(obj, allow_nan=True))
    _assert_storable(points)
    # and nothing storable is lost: every finite number under a sound name is a point
    expected = set()
    if type(obj[MARKER]) is int and obj[MARKER] == 1:
        for k, v in obj.items():
            if k in (MARKER, "step", "epoch") or isinstance(v, bool):
                continue
            if isinstance(v, int) and abs(v) < 10**300 or isinstance(v, float) and math.isfinite(v):
                ok_name = 1 <= len(k) <= 128 and not any(
                    ord(c) < 0x20 or 0x7F <= ord(c) <= 0x9F or 0xD800 <= ord(c) <= 0xDFFF for c in k
                )
                if ok_name:
                    expected.add(k)
    assert {p.name for p in points} == expected


@settings(max_examples=400, deadline=None)
@given(st.text(max_size=300) | st.binary(max_size=300).map(lambda b: b.decode("latin-1")))
def test_any_text_parses_without_raising(text):
    _assert_storable(parse_metric_line(text))
    _assert_storable(parse_metric_lines(text))
    _assert_storable(parse_metric_line(M + text))


def test_cap_points():
    pts = [MetricPoint("l", float(i), i, None) for i in range(5)]
    assert points_allowed(0, 10) == 10
    assert points_allowed(8, 10) == 2
    assert points_allowed(12, 10) == 0
    assert points_allowed(3, 0) == 0
    assert cap_points(pts, 8, 10) == (pts[:2], 3)
    assert cap_points(pts, 0, 10) == (pts, 0)
    assert cap_points(pts, 10, 10) == ([], 5)


def test_hostile_lines_do_not_break_ingestion(db_url, job_id):
    """What crashed every poll: the log bytes are stored, the good points too."""
    data = (
        "\n".join(
            [
                M + '"loss": ' + "9" * 400 + ', "a": 1}',
                M + '"step": ' + "9" * 20 + ', "b": 2}',
                M + '"x": ' + "[" * 30000 + "]" * 30000 + "}",
                M + '"\\ud800": 1, "c": 3}',
                format_metric_line({"d": 4.0}, step=5),
            ]
        )
        + "\n"
    ).encode()
    with session_scope(db_url) as s:
        assert repo.append_log(s, job_id, 0, data) == len(data)
    with session_scope(db_url) as s:
        series = repo.metrics(s, job_id)
    assert {k: [p["value"] for p in v] for k, v in series.items()} == {
        "a": [1.0],
        "b": [2.0],
        "c": [3.0],
        "d": [4.0],
    }
    assert series["b"][0]["step"] is None and series["d"][0]["step"] == 5
