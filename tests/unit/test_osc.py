"""The `openstack ml` plugin (service/osc/): its entry points, each command's argument parsing
(osc-lib's test fakes stand in for the `openstack` app), its output columns and values against
the real API (loopback, SQLite), API errors as CommandError, the client factory's endpoint
choice, and the real `openstack` shell (in this process) loading the plugin."""

from __future__ import annotations

import argparse
import importlib
import io
import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from cliff import command as cliff_command
from keystoneauth1 import exceptions as ksa_exceptions
from keystoneauth1 import session as ksa_session
from keystoneauth1 import token_endpoint
from osc_lib import exceptions
from osc_lib.test import fakes

from service.client import StackMLClient
from service.osc import jobs, models, platform, plugin
from tests.unit.test_cli import TRAINER_LOG, drive

REPO = Path(__file__).resolve().parents[2]
REQUIRED = {
    "ml job create",
    "ml job list",
    "ml job show",
    "ml job logs",
    "ml job cancel",
    "ml job delete",
    "ml model list",
    "ml model show",
    "ml model create",
    "ml model delete",
    "ml model version list",
    "ml model version show",
    "ml model label set",
    "ml model history",
    "ml model deploy",
    "ml endpoint list",
    "ml endpoint show",
    "ml endpoint set",
    "ml endpoint delete",
    "ml schedule create",
    "ml schedule list",
    "ml schedule show",
    "ml schedule pause",
    "ml schedule resume",
    "ml schedule delete",
    "ml schedule runs",
    "ml quota show",
    "ml quota set",
    "ml usage",
    "ml flavor list",
}


def entry_points() -> dict[str, dict[str, str]]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    eps: dict[str, dict[str, str]] = project["entry-points"]
    return eps


# -- registration ---------------------------------------------------------------------------


def test_entry_points_name_every_command_and_the_plugin() -> None:
    eps = entry_points()
    assert eps["openstack.cli.extension"] == {"ml": "service.osc.plugin"}
    commands = eps["openstack.ml.v1"]
    assert {name.replace("_", " ") for name in commands} >= REQUIRED
    for name, target in commands.items():
        module, _, attr = target.partition(":")
        cls = getattr(importlib.import_module(module), attr)
        assert issubclass(cls, cliff_command.Command), name
        assert cls.__doc__, f"{name} has no help line"
    mod = importlib.import_module(eps["openstack.cli.extension"]["ml"])
    for attr in ("API_NAME", "API_VERSION_OPTION", "API_VERSIONS"):
        assert hasattr(mod, attr)
    assert mod.API_NAME == "ml" and callable(mod.make_client)


def test_dev_extras_pin_the_openstack_client_with_lower_bounds() -> None:
    dev = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    pins = {d.split(">=")[0]: d for d in dev["dev"]}
    assert pins["python-openstackclient"].startswith("python-openstackclient>=")
    assert pins["osc-lib"].startswith("osc-lib>=")


# -- parsing (osc-lib's fakes) -------------------------------------------------------------


@pytest.fixture
def osc_app() -> Any:
    a = fakes.FakeApp(fakes.FakeStdout(), fakes.FakeLog())
    a.client_manager = fakes.FakeClientManager()
    return a


def parse(cls: type[cliff_command.Command], app: Any, *args: str) -> argparse.Namespace:
    cmd = cls(app, None)
    return cmd.get_parser(f"openstack {cls.__name__}").parse_args(list(args))


def test_job_create_parses_a_spec_and_flags_over_it(osc_app: Any, tmp_path: Path) -> None:
    spec = tmp_path / "job.yaml"
    spec.write_text(
        "name: from-file\ntrainer: {module: trainer.task, args: [--a]}\n"
        "resources: {flavor: local.small}\nlabels: {team: ml}\n"
    )
    a = parse(
        jobs.CreateJob,
        osc_app,
        "--spec",
        str(spec),
        "--name",
        "n1",
        "--flavor",
        "local.medium",
        "--hp",
        "epochs=3",
        "--hyperparameter",
        "lr=0.1",
        "--label",
        "run=a1",
        "--env",
        "FOO=bar=baz",
        "--runtime",
        "tensorflow-2.21",
        "--max-runtime",
        "600",
        "--register-as",
        "demo",
    )
    built = jobs.build_spec(a)
    assert built == {
        "name": "n1",
        "trainer": {"module": "trainer.task", "args": ["--a"]},
        "resources": {"flavor": "local.medium"},
        "labels": {"team": "ml", "run": "a1"},
        "hyperparameters": {"epochs": 3, "lr": 0.1},
        "env": {"FOO": "bar=baz"},
        "runtime": {"framework": "tensorflow", "version": "2.21"},
        "max_runtime_seconds": 600,
        "output": {"register_as": "demo"},
    }
    a = parse(jobs.CreateJob, osc_app, "--module", "m", "--arg=--x", "--arg", "y")
    assert jobs.build_spec(a)["trainer"] == {"module": "m", "args": ["--x", "y"]}


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--hp", "1x=2"], "not a valid hyperparameter name"),
        (["--label", "=v"], None),  # argparse refuses K=V without a key
        (["--runtime", "pytorch"], "is not a runtime"),
        (["--env", "A B=1"], "not a valid variable name"),
    ],
)
def test_job_create_refuses_bad_flags(osc_app: Any, args: list[str], needle: str | None) -> None:
    if needle is None:
        with pytest.raises(SystemExit):
            parse(jobs.CreateJob, osc_app, *args)
        return
    with pytest.raises(exceptions.CommandError, match=needle):
        jobs.build_spec(parse(jobs.CreateJob, osc_app, *args))


def test_job_create_refuses_a_spec_that_is_not_an_object(osc_app: Any, tmp_path: Path) -> None:
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    with pytest.raises(exceptions.CommandError, match="must hold an object"):
        jobs.build_spec(parse(jobs.CreateJob, osc_app, "--spec", str(tmp_path / "list.yaml")))
    with pytest.raises(exceptions.CommandError, match="cannot read"):
        jobs.build_spec(parse(jobs.CreateJob, osc_app, "--spec", str(tmp_path / "none.json")))


def test_parsers_of_the_other_commands(osc_app: Any) -> None:
    a = parse(
        jobs.ListJob, osc_app, "--state", "running", "--label", "team=ml", "--long", "-f", "json"
    )
    assert (a.state, a.labels, a.long, a.formatter) == (["running"], ["team=ml"], True, "json")
    a = parse(jobs.LogsJob, osc_app, "job-1", "--follow", "--offset", "9")
    assert (a.job, a.follow, a.offset) == ("job-1", True, 9)
    assert parse(jobs.DeleteJob, osc_app, "a", "b").jobs == ["a", "b"]
    a = parse(models.DeployModel, osc_app, "demo", "--version", "2", "--traffic", "1=90")
    assert (a.model, a.version, a.traffic) == ("demo", 2, [("1", "90")])
    with pytest.raises(SystemExit):  # a label and a version exclude each other
        parse(models.DeployModel, osc_app, "demo", "--version", "2", "--label", "x")
    a = parse(models.SetEndpoint, osc_app, "demo", "ep-1", "--replicas", "3", "--no-traffic")
    assert (a.endpoint, a.replicas, a.no_traffic) == ("ep-1", 3, True)
    a = parse(models.SetModelLabel, osc_app, "demo", "stable", "2", "--expected-version", "1")
    assert (a.label, a.version, a.expected_version) == ("stable", 2, 1)
    with pytest.raises(SystemExit):
        parse(models.CreateModelVersion, osc_app, "demo")  # --job or --artifact-uri is required
    a = parse(platform.SetQuota, osc_app, "p1", "--jobs", "3", "--gpus", "default")
    assert (a.jobs, a.gpus, hasattr(a, "servers")) == (3, None, False)
    with pytest.raises(SystemExit):
        parse(platform.SetQuota, osc_app, "p1", "--jobs", "-1")
    a = parse(platform.ShowUsage, osc_app, "--all-projects", "--since", "2026-11-01")
    assert (a.all_projects, a.since) == (True, "2026-11-01")
    with pytest.raises(SystemExit):
        parse(platform.ShowUsage, osc_app, "--all-projects", "--project", "p")
    a = parse(platform.CreateSchedule, osc_app, "n", "--cron", "@daily", "--job-spec", "-")
    assert (a.cron, a.job_spec, a.timezone, a.paused) == ("@daily", "-", "UTC", False)
    with pytest.raises(SystemExit):
        parse(platform.CreateSchedule, osc_app, "n", "--job-spec", "-")  # --cron is required


# -- output against the real API ------------------------------------------------------------


@pytest.fixture
def ml(osc_app: Any, api_url: str) -> Any:
    osc_app.client_manager.ml = StackMLClient(api_url, timeout=10)
    return osc_app


def act(cls: type[cliff_command.Command], app: Any, *args: str) -> Any:
    cmd = cls(app, None)
    parsed = cmd.get_parser("openstack").parse_args(list(args))
    return cmd.take_action(parsed)


def output(cls: type[cliff_command.Command], app: Any, *args: str) -> str:
    """What the command prints through cliff's formatters (and API errors as it raises them)."""
    app.stdout = io.StringIO()
    cmd = cls(app, None)
    parsed = cmd.get_parser("openstack").parse_args(list(args))
    cmd.run(parsed)
    return str(app.stdout.getvalue())


def create_job(ml: Any, tmp_path: Path, *extra: str) -> Any:
    """`job create` of a one-line trainer directory (staged) with `extra` flags."""
    pkg = tmp_path / "pkg" / "trainer"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "task.py").write_text("print('hi')\n")
    return act(
        jobs.CreateJob, ml, "--package-path", str(pkg.parent), "--module", "trainer.task", *extra
    )


def test_job_commands_columns_and_values(ml: Any, tmp_path: Path, db_url: str) -> None:
    cols, values = create_job(
        ml,
        tmp_path,
        "--label",
        "team=red",
    )
    job = dict(zip(cols, values, strict=True))
    assert cols[:5] == ("id", "name", "project_id", "type", "state")
    assert job["state"] == "QUEUED" and job["name"].startswith("pkg-")
    assert job["package_uri"].startswith("local://projects/local/staging/")
    assert job["labels"].human_readable() == "team='red'"
    job_id = job["id"]
    drive(db_url, job_id, log=TRAINER_LOG + b"\x1b]0;owned\x07bye\n", pause=0)

    listed = json.loads(output(jobs.ListJob, ml, "-f", "json"))
    assert listed == [
        {
            "ID": job_id,
            "Name": job["name"],
            "State": "SUCCEEDED",
            "Created At": listed[0]["Created At"],
            "Finished At": listed[0]["Finished At"],
        }
    ]
    assert listed[0]["Finished At"].endswith("Z")
    [long] = json.loads(output(jobs.ListJob, ml, "--long", "-f", "json"))
    assert (long["Project"], long["Flavor"], long["Labels"]) == (
        "local",
        "local.small",
        {"team": "red"},
    )
    assert json.loads(output(jobs.ListJob, ml, "--state", "queued", "-f", "json")) == []
    assert output(jobs.ListJob, ml, "-f", "value", "-c", "ID").strip() == job_id

    shown = json.loads(output(jobs.ShowJob, ml, job_id, "-f", "json"))
    assert shown["state"] == "SUCCEEDED" and shown["metrics"] == {"loss": 0.25, "mae": 0.4}
    assert shown["module"] == "trainer.task" and shown["labels"] == {"team": "red"}
    table = output(jobs.ShowJob, ml, job_id)
    assert "| state " in table and "SUCCEEDED" in table

    logs = output(jobs.LogsJob, ml, job_id)
    assert logs == TRAINER_LOG.decode() + "bye\n"  # the OSC title sequence is gone
    assert output(jobs.LogsJob, ml, job_id, "--offset", "9") == logs[9:]

    assert output(jobs.DeleteJob, ml, job_id) == ""
    with pytest.raises(exceptions.CommandError) as err:
        output(jobs.ShowJob, ml, job_id)
    assert str(err.value).startswith(f"job {job_id} not found [not_found, HTTP 404, request req-")


def test_job_create_with_tuning_and_job_show_lists_the_trials(
    ml: Any, tmp_path: Path, db_url: str
) -> None:
    from service.db import jobs as repo
    from service.db import tuning as tuning_repo
    from service.db.models import MetricRow
    from service.db.session import session_scope

    section = tmp_path / "tuning.yaml"
    section.write_text(
        "metric: loss\ngoal: minimize\nmax_trials: 2\n"
        "parameters: [{name: lr, type: discrete, values: [0.1, 0.01]}]\n"
    )
    cols, values = create_job(
        ml,
        tmp_path,
        "--tuning",
        str(section),
    )
    job = dict(zip(cols, values, strict=True))
    assert job["state"] == "RUNNING" and job["trials"].machine_readable() == []
    with session_scope(db_url) as s:
        parent = repo.get_job(s, job["id"])
        child = tuning_repo.create_trial(s, parent, 1, {"lr": 0.1}, "p/", "local://{}".format)
        s.add(MetricRow(job_id=child.id, name="loss", value=0.5, step=2, log_offset=0))
        child.state = "SUCCEEDED"
        child_id = child.id
    shown = json.loads(output(jobs.ShowJob, ml, job["id"], "-f", "json"))
    assert shown["trials"] == [f"1 {child_id} SUCCEEDED loss=0.5 (lr=0.1) best"]
    trial = json.loads(output(jobs.ShowJob, ml, child_id, "-f", "json"))
    assert trial["trial"] == f"1 of {job['id']}" and trial["trials"] is None


def test_api_errors_become_command_errors_with_the_api_sentence(ml: Any) -> None:
    with pytest.raises(exceptions.CommandError) as err:
        output(jobs.CancelJob, ml, "job-nope")
    assert "[not_found, HTTP 404" in str(err.value)
    with pytest.raises(exceptions.CommandError) as err:
        output(jobs.CreateJob, ml, "--package-path", "local://x/y.tar.gz", "--module", "m")
    assert "[validation_failed, HTTP 422" in str(err.value)
    assert "trainer.package_uri" in str(err.value)
    with pytest.raises(exceptions.CommandError, match="needs a trainer"):
        output(jobs.CreateJob, ml, "--module", "m")
    with pytest.raises(exceptions.CommandError, match="does not exist"):
        output(jobs.CreateJob, ml, "--package-path", "/no/such/dir", "--module", "m")


def test_model_and_endpoint_commands(ml: Any) -> None:
    out = json.loads(output(models.CreateModel, ml, "demo", "--description", "d", "-f", "json"))
    assert out["name"] == "demo" and out["versions"] == 0 and out["endpoint"] == {}
    [row] = json.loads(output(models.ListModel, ml, "-f", "json"))
    assert list(row) == list(models.MODEL_COLUMNS) and row["Name"] == "demo"
    assert json.loads(output(models.ListModelVersion, ml, "demo", "-f", "json")) == []
    assert json.loads(output(models.ModelHistory, ml, "demo", "-f", "json")) == []
    assert json.loads(output(models.ListEndpoint, ml, "-f", "json")) == []
    with pytest.raises(exceptions.CommandError, match="model_exists"):
        output(models.CreateModel, ml, "demo")
    with pytest.raises(exceptions.CommandError, match="nothing to change"):
        output(models.SetEndpoint, ml, "demo", "ep-1")
    with pytest.raises(exceptions.CommandError, match="not_found, HTTP 404"):
        output(models.ShowEndpoint, ml, "demo", "ep-000000000000")
    with pytest.raises(exceptions.CommandError, match="HTTP 4"):
        output(models.DeployModel, ml, "demo")  # no READY version, no default label
    assert output(models.DeleteModel, ml, "demo") == ""
    assert json.loads(output(models.ListModel, ml, "-f", "json")) == []


def test_schedule_quota_usage_flavor_commands(
    ml: Any, tmp_path: Path, package_uri: str, spec: Any
) -> None:
    job = tmp_path / "job.json"
    job.write_text(json.dumps(spec(package_uri)))
    created = json.loads(
        output(
            platform.CreateSchedule,
            ml,
            "nightly",
            "--cron",
            "0 3 * * *",
            "--job-spec",
            str(job),
            "-f",
            "json",
        )
    )
    assert created["name"] == "nightly" and created["paused"] is False
    [row] = json.loads(output(platform.ListSchedule, ml, "-f", "json"))
    assert list(row) == list(platform.SCHEDULE_COLUMNS) and row["Cron"] == "0 3 * * *"
    assert json.loads(output(platform.PauseSchedule, ml, "nightly", "-f", "json"))["paused"]
    resumed = json.loads(output(platform.ResumeSchedule, ml, created["id"], "-f", "json"))
    assert resumed["paused"] is False and resumed["next_fire_at"]
    assert json.loads(output(platform.ShowSchedule, ml, "nightly", "-f", "json"))["job"]
    assert json.loads(output(platform.ScheduleRuns, ml, "nightly", "-f", "json")) == []
    assert output(platform.DeleteSchedule, ml, "nightly") == ""

    quota = json.loads(output(platform.ShowQuota, ml, "-f", "json"))
    assert list(quota)[:4] == ["project_id", "jobs", "jobs_in_use", "servers"]
    assert quota["project_id"] == "local" and quota["jobs_in_use"] == 0
    quota = json.loads(output(platform.SetQuota, ml, "local", "--gpus", "1", "-f", "json"))
    assert quota["gpus"] == 1 and quota["overrides"]["gpus"] == 1
    with pytest.raises(exceptions.CommandError, match="nothing to set"):
        output(platform.SetQuota, ml, "local")

    usage = json.loads(output(platform.ShowUsage, ml, "-f", "json"))
    assert [u["Kind"] for u in usage] == ["total"] and list(usage[0]) == list(
        platform.USAGE_COLUMNS
    )
    with pytest.raises(exceptions.CommandError, match="invalid_request, HTTP 400"):
        output(platform.ShowUsage, ml, "--since", "soon")

    flavors = json.loads(output(platform.ListFlavor, ml, "-f", "json"))
    assert [f["Name"] for f in flavors] == ["local.small", "local.medium", "local.large"]
    assert list(flavors[0]) == list(platform.FLAVOR_COLUMNS)
    assert output(platform.ListFlavor, ml, "--gpus", "1", "-f", "value") == ""


# -- the client factory ---------------------------------------------------------------------


def instance(url: str | None, *, override: str | None = None, fail: bool = False) -> Any:
    asked: list[tuple[str, str | None, str | None]] = []

    def get_endpoint_for_service_type(
        service_type: str, region_name: str | None = None, interface: str | None = None
    ) -> str | None:
        asked.append((service_type, region_name, interface))
        if fail:
            raise ksa_exceptions.EndpointNotFound("no such endpoint")
        return url

    return SimpleNamespace(
        session=ksa_session.Session(auth=token_endpoint.Token("http://unused", "tok-123")),
        region_name="RegionOne",
        interface="public",
        _cli_options=SimpleNamespace(config={"ml_endpoint": override} if override else {}),
        get_endpoint_for_service_type=get_endpoint_for_service_type,
        asked=asked,
    )


def test_make_client_uses_the_catalog_and_the_session_token(api_url: str) -> None:
    inst = instance(api_url + "/")
    client = plugin.make_client(inst)
    assert inst.asked == [("machine-learning", "RegionOne", "public")]
    assert client.base_url == api_url and client.auth is not None
    assert client.auth.token() == "tok-123"
    assert client.list_jobs() == {"jobs": [], "next": None}
    # --os-ml-endpoint wins over the catalog
    inst = instance("http://catalog.invalid", override=api_url)
    assert plugin.make_client(inst).base_url == api_url and inst.asked == []


def test_an_api_that_does_not_answer_is_one_sentence(osc_app: Any) -> None:
    from tests.unit.test_cli import closed_port

    osc_app.client_manager.ml = StackMLClient(f"http://127.0.0.1:{closed_port()}", timeout=5)
    with pytest.raises(exceptions.CommandError) as err:
        output(platform.ListFlavor, osc_app)
    assert "connection refused" in str(err.value) and "machine-learning endpoint" in str(err.value)
    assert str(err.value).endswith("[api_unavailable]") and "stackml up" not in str(err.value)


def test_make_client_without_a_catalog_entry_says_so() -> None:
    with pytest.raises(exceptions.CommandError, match="no machine-learning endpoint"):
        plugin.make_client(instance(None))
    with pytest.raises(exceptions.CommandError, match="EndpointNotFound"):
        plugin.make_client(instance(None, fail=True))


# -- the real openstack executable --------------------------------------------------------


def test_the_openstack_executable_loads_the_plugin(api_url: str) -> None:
    """Through the installed entry points (a subprocess: osc configures logging globally)."""
    exe = Path(sys.executable).with_name("openstack")
    assert exe.exists(), f"{exe} is missing: `make venv` installs python-openstackclient"
    env = {k: v for k, v in os.environ.items() if not k.startswith("OS_")}
    base = [str(exe), "--os-auth-type", "none", "--os-ml-endpoint", api_url, "ml"]

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*base, *args], capture_output=True, text=True, env=env, timeout=60, check=False
        )

    listed = run("flavor", "list", "-f", "json")
    assert listed.returncode == 0, listed.stderr
    assert [f["Name"] for f in json.loads(listed.stdout)][0] == "local.small"
    missing = run("job", "show", "job-nope")
    assert missing.returncode == 1
    assert "job job-nope not found [not_found, HTTP 404" in missing.stderr
    assert "Traceback" not in missing.stderr
