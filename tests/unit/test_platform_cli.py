"""`stackml quotas show|set|reset`, `stackml usage`, `stackml flavors list` and
`stackml jobs metrics --plot` against the real API (loopback, SQLite; noauth is the operator,
hence admin), and the braille plot as a pure function."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from click.testing import Result

from service.cli.plot import BRAILLE, braille_canvas, chart, metric_charts
from service.db.models import Resource
from service.db.session import session_scope
from service.domain.states import ResourceState
from tests.unit.test_cli import TRAINER_LOG, drive, submit

PROJECT = "local"


@pytest.fixture
def trainer_dir(tmp_path: Path) -> Path:
    (tmp_path / "pkg" / "trainer").mkdir(parents=True)
    (tmp_path / "pkg" / "trainer" / "__init__.py").write_text("")
    (tmp_path / "pkg" / "trainer" / "task.py").write_text("print('hi')\n")
    return tmp_path / "pkg"


def test_quotas_show_set_and_reset(run: Callable[..., Result]) -> None:
    res = run("quotas", "show", "-o", "json")
    assert res.exit_code == 0, res.output
    before = json.loads(res.stdout)
    assert before["project_id"] == PROJECT and set(before["limits"]) == {"jobs", "servers", "gpus"}

    res = run("quotas", "set", PROJECT, "--gpus", "0", "--jobs", "3")
    assert res.exit_code == 0, res.output
    rows = {ln.split()[0]: ln.split()[1:] for ln in res.stdout.splitlines()[2:] if ln.strip()}
    # RESOURCE  IN USE  LIMIT  DEFAULT  OVERRIDE
    assert rows["jobs"][1:] == ["3", str(before["defaults"]["jobs"]), "3"]
    assert rows["gpus"][1] == "0" and rows["gpus"][3] == "0"
    assert rows["servers"][3] == "-"
    after = json.loads(run("quotas", "show", PROJECT, "-o", "json").stdout)
    assert after["limits"]["jobs"] == 3 and after["overrides"]["gpus"] == 0

    # `default` drops one override; reset drops them all
    res = run("quotas", "set", PROJECT, "--gpus", "default", "-o", "json")
    assert json.loads(res.stdout)["overrides"]["gpus"] is None
    assert json.loads(res.stdout)["limits"]["jobs"] == 3
    assert run("quotas", "reset", PROJECT).exit_code == 0
    assert json.loads(run("quotas", "show", "-o", "json").stdout)["limits"] == before["limits"]


def test_quotas_set_refuses_bad_input_before_calling_the_api(run: Callable[..., Result]) -> None:
    res = run("quotas", "set", PROJECT)
    assert res.exit_code == 2 and "nothing to set" in res.output
    res = run("quotas", "set", PROJECT, "--jobs", "-1")
    assert res.exit_code == 2 and "0 or more" in res.output
    res = run("quotas", "set", PROJECT, "--jobs", "many")
    assert res.exit_code == 2 and "not a whole number" in res.output
    # the API's own refusal is one sentence with its code
    res = run("quotas", "show", "bad project!")
    assert res.exit_code == 1 and "[invalid_request, HTTP 400" in res.output


def test_usage_lists_jobs_and_totals(
    run: Callable[..., Result], trainer_dir: Path, db_url: str
) -> None:
    job_id = json.loads(submit(run, trainer_dir, "-o", "json").stdout)["id"]
    drive(db_url, job_id, log=TRAINER_LOG, pause=0)
    now = datetime.now(UTC)
    with session_scope(db_url) as s:  # its server ran for half an hour, an hour ago
        s.add(
            Resource(
                job_id=job_id,
                project_id=PROJECT,
                backend="sandbox",
                name=f"stackml-{job_id}-chief-0",
                flavor="local.small",
                state=ResourceState.DELETED.value,
                created_at=now - timedelta(hours=1),
                active_at=now - timedelta(hours=1),
                deleted_at=now - timedelta(minutes=30),
            )
        )
    body = json.loads(run("usage", "-o", "json").stdout)
    assert [(j["id"], j["vm_seconds"]) for j in body["jobs"]] == [(job_id, 1800.0)]
    res = run("usage")
    assert res.exit_code == 0, res.output
    [row] = [ln.split() for ln in res.stdout.splitlines() if job_id in ln]
    assert row[0] == "job" and row[-3:] == ["1800", "0", "0.025"]
    [total] = [ln.split() for ln in res.stdout.splitlines() if ln.strip().startswith("total")]
    assert total == ["total", "1800", "0", "0.025"]
    res = run("usage", "--since", "yesterday")
    assert res.exit_code == 1 and "since must be an ISO 8601 time" in res.output
    res = run("usage", "--project", "p", "--all-projects")
    assert res.exit_code == 2 and "not both" in res.output


def test_flavors_list(run: Callable[..., Result]) -> None:
    res = run("flavors", "list")
    assert res.exit_code == 0, res.output
    lines = [ln.split() for ln in res.stdout.splitlines() if ln.strip()]
    assert lines[0][:2] == ["NAME", "VCPUS"]
    assert [ln[0] for ln in lines[1:]] == ["local.small", "local.medium", "local.large"]
    body = json.loads(run("flavors", "list", "--gpus", "0", "-o", "json").stdout)
    assert [f["name"] for f in body["flavors"]] == ["local.small", "local.medium", "local.large"]
    assert json.loads(run("flavors", "list", "--gpus", "2", "-o", "json").stdout) == {"flavors": []}
    assert run("flavors", "list", "--gpus", "2").stdout.strip() == "no flavors"


def test_jobs_metrics_plot(run: Callable[..., Result], trainer_dir: Path, db_url: str) -> None:
    job_id = json.loads(submit(run, trainer_dir, "-o", "json").stdout)["id"]
    drive(db_url, job_id, log=TRAINER_LOG, pause=0)
    res = run("jobs", "metrics", job_id, "--plot", "--width", "20")
    assert res.exit_code == 0, res.output
    out = res.stdout
    assert "loss (last 0.25, min 0.25, max 0.5)" in out and "mae (last 0.4" in out
    canvases = [ln.split("┤", 1)[1] for ln in out.splitlines() if "┤" in ln]
    assert len(canvases) == 16 and all(len(c) == 20 for c in canvases)  # 2 charts x 8 rows
    assert all(BRAILLE <= ord(ch) <= BRAILLE + 0xFF for c in canvases for ch in c)
    # loss falls: its first row (the top) has dots on the left, its last row on the right
    assert canvases[0][0] != chr(BRAILLE) and canvases[0][-1] == chr(BRAILLE)
    assert canvases[7][-1] != chr(BRAILLE) and canvases[7][0] == chr(BRAILLE)
    assert "epoch" in out
    res = run("jobs", "metrics", job_id, "--plot", "--metric", "mae")
    assert "mae (" in res.stdout and "loss" not in res.stdout
    res = run("jobs", "metrics", job_id, "--plot", "--metric", "acc")
    assert res.exit_code == 2 and "no metric acc; the job has loss, mae" in res.output
    res = run("jobs", "metrics", job_id, "--plot", "-o", "json")
    assert res.exit_code == 2 and "does not combine" in res.output


def test_braille_canvas_draws_the_segment_between_points() -> None:
    # 2x1 characters are 4x4 dots: the diagonal from bottom-left to top-right
    assert braille_canvas([(0, 0), (1, 1)], 2, 1) == [chr(BRAILLE + 0x60) + chr(BRAILLE + 0x0A)]
    # a falling line from top-left to bottom-right: 2x8 dots, the left column on top
    assert braille_canvas([(0, 1), (1, 0)], 1, 2) == [chr(BRAILLE + 0x47), chr(BRAILLE + 0xB8)]


def test_braille_canvas_edge_cases() -> None:
    blank = chr(BRAILLE)
    assert braille_canvas([], 3, 2) == [blank * 3, blank * 3]
    # non-finite points are left out; a constant series is a line across the middle
    flat = braille_canvas([(0, 2.0), (1, float("nan")), (2, 2.0)], 4, 2)
    assert flat == [blank * 4, chr(BRAILLE + 0x01 + 0x08) * 4]
    one = braille_canvas([(5, 1.0)], 3, 1)
    assert sum(ch != blank for ch in one[0]) == 1
    lines = chart("loss", [(1, 0.5), (2, 0.25)], width=10, height=3, x_name="epoch")
    assert lines[0] == "loss (last 0.25, min 0.25, max 0.5)"
    assert lines[1].startswith(" 0.5 ┤") and lines[3].startswith("0.25 ┤")
    assert lines[-1].split() == ["1", "2", "epoch"]
    assert chart("x", [], width=5, height=2) == ["x: no points"]


def test_metric_charts_pick_the_axis() -> None:
    by_step = {"acc": [{"value": 0.1, "step": 10}, {"value": 0.9, "step": 20}]}
    [lines] = metric_charts(by_step, width=10, height=2)
    assert lines[-1].split()[-1] == "step" and lines[-1].split()[:2] == ["10", "20"]
    by_position = {"acc": [{"value": 0.1}, {"value": 0.9}, {"value": None}]}
    [lines] = metric_charts(by_position, width=10, height=2)
    assert lines[-1].split() == ["1", "2"]


def test_models_update_endpoint_and_the_deletes(run: Callable[..., Result], db_url: str) -> None:
    from service.db.models import Endpoint
    from tests.unit.test_endpoints_cli import seed

    seed(db_url)  # model m: versions 1 and 2 READY, default -> 1
    assert run("models", "deploy", "m").exit_code == 0
    res = run("models", "update-endpoint", "m", "--traffic", "1=50,2=50", "-o", "json")
    assert res.exit_code == 0, res.output
    ep = json.loads(res.stdout)
    assert ep["traffic"] == {"1": 50, "2": 50} and ep["state"] == "CREATING"  # still booting
    res = run("models", "update-endpoint", "m", "--no-traffic", "--version", "2")
    assert res.exit_code == 0, res.output
    with session_scope(db_url) as s:
        (row,) = s.query(Endpoint).all()
        assert (row.traffic, row.target_version, row.target_label) == (None, 2, None)
    res = run("models", "update-endpoint", "m")
    assert res.exit_code == 2 and "nothing to change" in res.output
    res = run("models", "update-endpoint", "m", "--label", "a", "--version", "1")
    assert res.exit_code == 2 and "not both" in res.output

    # version 2 is what the endpoint serves: the API refuses, in one sentence with its code
    res = run("models", "delete-version", "m", "2")
    assert res.exit_code == 1 and "version_in_use" in res.output
    res = run("models", "delete-label", "m", "default", "--why", "cleanup")
    assert res.exit_code == 0 and "it pointed at 1" in res.output, res.output
    assert run("models", "delete-version", "m", "1").exit_code == 0
    res = run("models", "delete", "m")
    assert res.exit_code == 1 and "endpoint_exists" in res.output
    with session_scope(db_url) as s:  # the endpoint gone, the model can go
        s.query(Endpoint).update({"state": "DELETED"})
    assert run("models", "delete", "m").exit_code == 0
    assert json.loads(run("models", "list", "-o", "json").stdout)["models"] == []
