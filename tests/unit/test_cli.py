"""The `stackml` CLI (click's CliRunner) against the real Flask app served over HTTP."""

from __future__ import annotations

import json
import re
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from click.testing import CliRunner, Result

from service import demo as demo_mod
from service.cli import cli
from service.config import Settings
from service.db import jobs as repo
from service.db.session import session_scope
from service.domain.states import FailureReason, JobState, Phase

TRAINER_LOG = (
    b"starting\n"
    b'{"stackml_metric": 1, "epoch": 1, "loss": 0.5, "mae": 0.7}\n'
    b'{"stackml_metric": 1, "epoch": 2, "loss": 0.25, "mae": 0.4}\n'
    b"done\n"
)


class DrivingRecorder:
    """Stands in for service.queue.enqueue; `on_allocate(job_id)` plays the workers."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []
        self.fail = False
        self.on_allocate: Callable[[str], None] | None = None
        self.threads: list[threading.Thread] = []

    def __call__(self, task: str, job_id: str) -> None:
        self.calls.append((task, job_id))
        if task == "stackml.allocate" and self.on_allocate is not None:
            t = threading.Thread(target=self.on_allocate, args=(job_id,), daemon=True)
            t.start()
            self.threads.append(t)


@pytest.fixture
def enqueued() -> Iterator[DrivingRecorder]:
    rec = DrivingRecorder()
    yield rec
    for t in rec.threads:
        t.join(timeout=10)


def drive(
    db_url: str,
    job_id: str,
    *,
    outcome: str = "SUCCEEDED",
    log: bytes = b"",
    pause: float = 0.02,
    settings: Settings | None = None,
) -> None:
    """Move a job through its lifecycle the way the workers would."""
    prev = JobState.QUEUED
    for state in (JobState.ALLOCATING, JobState.PROVISIONING, JobState.RUNNING):
        time.sleep(pause)
        with session_scope(db_url) as s:
            assert repo.transition(s, job_id, prev, state, f"now {state.value.lower()}")
        prev = state
    offset = 0
    for line in log.splitlines(keepends=True):
        time.sleep(pause)
        with session_scope(db_url) as s:
            offset = repo.append_log(s, job_id, offset, line)
    with session_scope(db_url) as s:
        if outcome == "SUCCEEDED":
            job = repo.get_job(s, job_id)
            if settings is not None:  # the model lands in the local store
                key = job.output["model_uri"].removeprefix("local://")
                (settings.store_dir / key).mkdir(parents=True, exist_ok=True)
                (settings.store_dir / key / "saved_model.pb").write_bytes(b"pb")
            repo.transition(s, job_id, prev, JobState.EXPORTING, "trainer exited 0")
            repo.transition(s, job_id, JobState.EXPORTING, JobState.SUCCEEDED, "model exported")
        else:
            failure = repo.Failure(
                Phase.TRAIN, FailureReason.TRAINER_EXIT_NONZERO, "the trainer exited 3"
            )
            repo.transition(s, job_id, prev, JobState.FAILED, failure=failure)


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def trainer_dir(tmp_path: Path) -> Path:
    pkg = tmp_path / "mytrainer"
    (pkg / "trainer" / "__pycache__").mkdir(parents=True)
    (pkg / "trainer" / "__init__.py").write_text("")
    (pkg / "trainer" / "task.py").write_text("print('hi')\n")
    (pkg / "trainer" / "__pycache__" / "task.cpython-311.pyc").write_bytes(b"junk")
    return pkg


def api_json(api_url: str, path: str) -> Any:
    resp = requests.get(api_url + path, timeout=10)
    resp.raise_for_status()
    return resp.json()


def submit(run: Callable[..., Result], trainer_dir: Path, *extra: str) -> Result:
    return run(
        "jobs",
        "submit",
        "--package-path",
        str(trainer_dir),
        "--module",
        "trainer.task",
        "--name",
        "t1",
        *extra,
    )


def finished_job(
    run: Callable[..., Result], trainer_dir: Path, db_url: str, outcome: str = "SUCCEEDED"
) -> str:
    res = submit(run, trainer_dir, "-o", "json")
    assert res.exit_code == 0, res.output
    job_id = json.loads(res.stdout)["id"]
    drive(db_url, job_id, log=TRAINER_LOG, pause=0, outcome=outcome)
    return str(job_id)


def assert_one_sentence_error(res: Result, *needles: str) -> None:
    assert res.exit_code == 1, res.output
    assert "Traceback" not in res.output
    assert isinstance(res.exception, SystemExit)
    lines = [ln for ln in res.output.splitlines() if ln.startswith("Error:")]
    assert len(lines) == 1, res.output
    for needle in needles:
        assert needle in lines[0], lines[0]


# -- submit ------------------------------------------------------------------------------------


def test_submit_stages_the_package_and_creates_the_job(
    run: Callable[..., Result], trainer_dir: Path, api_url: str, store: Any, db_url: str
) -> None:
    res = submit(
        run,
        trainer_dir,
        "--flavor",
        "local.medium",
        "--runtime",
        "tensorflow-2.21",
        "--max-runtime",
        "600",
        "--workers",
        "3",
        "--parameter-servers",
        "2",
        "--evaluator",
        "--restart-policy",
        "ExitCode",
        "--max-restarts",
        "0",
        "--label",
        "team=ml",
        "--label",
        "run=a1",
        "--env",
        "FOO=bar=baz",
        "--hp",
        "epochs=3",
        "--hp",
        "learning_rate=0.01",
        "--hp",
        "optimizer=adam",
        "--hp",
        "shuffle=true",
        "-o",
        "json",
        "--",
        "--verbose",
        "--data=x y",
    )
    assert res.exit_code == 0, res.output
    job = json.loads(res.stdout)
    assert job == api_json(api_url, f"/v1/jobs/{job['id']}")
    spec = job["spec"]
    assert spec["name"] == "t1"
    assert spec["trainer"]["module"] == "trainer.task"
    assert spec["trainer"]["args"] == ["--verbose", "--data=x y"]
    assert spec["hyperparameters"] == {
        "epochs": 3,
        "learning_rate": 0.01,
        "optimizer": "adam",
        "shuffle": True,
    }
    assert spec["labels"] == {"team": "ml", "run": "a1"}
    assert spec["env"] == {"FOO": "***"}  # the API never shows env values again
    with session_scope(db_url) as s:  # the workers read them from the job's row
        assert repo.get_job(s, job["id"]).spec["env"] == {"FOO": "bar=baz"}
    resources = spec["resources"]
    assert (resources["flavor"], resources["workers"], resources["parameter_servers"]) == (
        "local.medium",
        3,
        2,
    )
    assert resources["evaluator"] is True
    assert spec["runtime"] == {"framework": "tensorflow", "version": "2.21"}
    assert spec["max_runtime_seconds"] == 600
    assert (spec["restart_policy"], spec["max_restarts"], job["restarts"]) == ("ExitCode", 0, 0)
    uri = spec["trainer"]["package_uri"]
    assert uri.startswith("local://projects/local/staging/") and uri.endswith("/mytrainer.tar.gz")
    assert store.exists(uri.removeprefix("local://"))
    assert "staged" in res.stderr


def test_submit_defaults_and_table_output(
    run: Callable[..., Result], trainer_dir: Path, api_url: str
) -> None:
    res = run("jobs", "submit", "--package-path", str(trainer_dir), "--module", "trainer.task")
    assert res.exit_code == 0, res.output
    assert "submitted job job-" in res.stdout
    (job,) = api_json(api_url, "/v1/jobs")["jobs"]
    assert job["name"].startswith("mytrainer-")
    assert job["spec"]["trainer"]["args"] == []


@pytest.mark.parametrize(
    ("option", "value", "needle"),
    [
        ("--label", "nokey", "'nokey' is not label key=VALUE"),
        ("--label", "bad key=v", "not a valid label key"),
        ("--env", "1X=y", "not a valid variable"),
        ("--hp", "=3", "is not hyperparameter=VALUE"),
        ("--runtime", "pytorch", "is not a runtime"),
        ("--restart-policy", "Always", "'Always' is not one of"),
        ("--max-restarts", "21", "21 is not in the range"),
    ],
)
def test_submit_bad_input_is_a_usage_error(
    run: Callable[..., Result],
    trainer_dir: Path,
    api_url: str,
    option: str,
    value: str,
    needle: str,
) -> None:
    res = submit(run, trainer_dir, option, value)
    assert res.exit_code == 2, res.output
    assert needle in res.output
    assert "Traceback" not in res.output
    assert api_json(api_url, "/v1/jobs")["jobs"] == []


def test_submit_missing_package_path(run: Callable[..., Result], tmp_path: Path) -> None:
    res = run("jobs", "submit", "--package-path", str(tmp_path / "nope"), "--module", "m")
    assert res.exit_code == 2
    assert "does not exist" in res.output


def test_submit_rejected_by_the_api_is_one_sentence(
    run: Callable[..., Result], trainer_dir: Path
) -> None:
    res = submit(run, trainer_dir, "--flavor", "huge.gpu")
    assert_one_sentence_error(res, "unknown flavor 'huge.gpu'", "validation_failed", "HTTP 422")


def test_submit_wait_follows_the_job_to_success(
    run: Callable[..., Result], trainer_dir: Path, db_url: str, enqueued: DrivingRecorder
) -> None:
    enqueued.on_allocate = lambda job_id: drive(db_url, job_id, log=TRAINER_LOG)
    res = submit(run, trainer_dir, "--wait")
    assert res.exit_code == 0, res.output
    out = res.output
    for expected in (
        "QUEUED -> ALLOCATING",
        "RUNNING -> EXPORTING",
        "EXPORTING -> SUCCEEDED",
        "| starting",
        "| done",
        "metrics epoch 2: loss=0.25 mae=0.4",
        "SUCCEEDED",
        "model: local://projects/local/models/",
    ):
        assert expected in out, out
    # the log is streamed in order
    assert out.index("| starting") < out.index("epoch 1") < out.index("| done")


def test_submit_wait_exits_non_zero_when_the_job_fails(
    run: Callable[..., Result], trainer_dir: Path, db_url: str, enqueued: DrivingRecorder
) -> None:
    enqueued.on_allocate = lambda job_id: drive(db_url, job_id, log=b"boom\n", outcome="FAILED")
    res = submit(run, trainer_dir, "--wait", "-o", "json")
    assert res.exit_code == 1, res.output
    assert "FAILED in phase train (trainer_exit_nonzero): the trainer exited 3" in res.output
    assert json.loads(res.stdout)["state"] == "FAILED"
    assert "Traceback" not in res.output


def test_submit_wait_timeout_is_one_sentence(run: Callable[..., Result], trainer_dir: Path) -> None:
    res = submit(run, trainer_dir, "--wait", "--timeout", "1")
    assert_one_sentence_error(res, "is still QUEUED after 1s", "wait_timeout")


# -- reads ---------------------------------------------------------------------------------------


def test_read_commands_print_the_api_json(
    run: Callable[..., Result], trainer_dir: Path, db_url: str, api_url: str
) -> None:
    job_id = finished_job(run, trainer_dir, db_url)
    for args, path in (
        (["jobs", "list"], "/v1/jobs"),
        (
            ["jobs", "list", "--state", "succeeded", "--label", "team=none"],
            "/v1/jobs?state=SUCCEEDED&label=team=none",
        ),
        (["jobs", "describe", job_id], f"/v1/jobs/{job_id}"),
        (["jobs", "events", job_id], f"/v1/jobs/{job_id}/events"),
        (["jobs", "metrics", job_id], f"/v1/jobs/{job_id}/metrics"),
    ):
        res = run(*args, "-o", "json")
        assert res.exit_code == 0, res.output
        assert json.loads(res.stdout) == api_json(api_url, path), args
    res = run("jobs", "logs", job_id, "--output", "json")
    assert json.loads(res.stdout) == {
        "job_id": job_id,
        "replica": "chief",
        "offset": 0,
        "next_offset": len(TRAINER_LOG),
        "log": TRAINER_LOG.decode(),
    }


def test_list_all_follows_next(run: Callable[..., Result], trainer_dir: Path) -> None:
    for _ in range(3):
        assert submit(run, trainer_dir).exit_code == 0
    page = json.loads(run("jobs", "list", "--limit", "2", "-o", "json").stdout)
    assert len(page["jobs"]) == 2 and page["next"]
    every = json.loads(run("jobs", "list", "--limit", "2", "--all", "-o", "json").stdout)
    assert len(every["jobs"]) == 3 and every["next"] is None
    table = run("jobs", "list")
    assert table.exit_code == 0
    assert table.stdout.count("QUEUED") == 3 and "NAME" in table.stdout


def test_tables(run: Callable[..., Result], trainer_dir: Path, db_url: str) -> None:
    job_id = finished_job(run, trainer_dir, db_url)
    desc = run("jobs", "describe", job_id)
    assert desc.exit_code == 0, desc.output
    for expected in (
        job_id,
        "t1",
        "SUCCEEDED",
        "python -m trainer.task",
        "events",
        "EXPORTING",
        "latest metrics",
        "loss",
        "0.25",
        "output.model_uri",
    ):
        assert expected in desc.stdout, desc.stdout
    events = run("jobs", "events", job_id)
    assert events.exit_code == 0 and "PROVISIONING" in events.stdout
    metrics = run("jobs", "metrics", job_id)
    assert metrics.exit_code == 0
    lines = [ln.split() for ln in metrics.stdout.splitlines() if ln.strip()]
    assert lines[0] == ["EPOCH", "loss", "mae"]
    assert lines[1:] == [["1", "0.5", "0.7"], ["2", "0.25", "0.4"]]


def test_logs(run: Callable[..., Result], trainer_dir: Path, db_url: str) -> None:
    job_id = finished_job(run, trainer_dir, db_url)
    assert run("jobs", "logs", job_id).stdout_bytes == TRAINER_LOG
    assert run("jobs", "logs", job_id, "-f").stdout_bytes == TRAINER_LOG
    assert run("jobs", "logs", job_id, "--offset", "9").stdout_bytes == TRAINER_LOG[9:]
    res = run("jobs", "logs", job_id, "-f", "-o", "json")
    assert res.exit_code == 2
    assert run("jobs", "logs", job_id, "--replica", "chief").stdout_bytes == TRAINER_LOG
    res = run("jobs", "logs", job_id, "--replica", "worker-1")  # a job of one server
    assert res.exit_code == 1, res.output
    assert "replica 'worker-1' is not one of this job's: it runs on one server (chief)" in (
        res.output
    )


def test_logs_follow_streams_a_running_job(
    run: Callable[..., Result], trainer_dir: Path, db_url: str, enqueued: DrivingRecorder
) -> None:
    enqueued.on_allocate = lambda job_id: drive(db_url, job_id, log=TRAINER_LOG, pause=0.05)
    job_id = json.loads(submit(run, trainer_dir, "-o", "json").stdout)["id"]
    res = run("jobs", "logs", job_id, "--follow")
    assert res.exit_code == 0
    assert res.stdout_bytes == TRAINER_LOG


def test_cancel_and_delete(run: Callable[..., Result], trainer_dir: Path, api_url: str) -> None:
    job_id = json.loads(submit(run, trainer_dir, "-o", "json").stdout)["id"]
    res = run("jobs", "cancel", job_id)
    assert res.exit_code == 0 and "cancel requested" in res.stdout
    again = run("jobs", "cancel", job_id)
    assert_one_sentence_error(again, "already finished", "job_terminal", "HTTP 409")
    res = run("jobs", "delete", job_id)
    assert res.exit_code == 0 and "deleted" in res.stdout
    assert api_json(api_url, "/v1/jobs")["jobs"] == []


# -- errors --------------------------------------------------------------------------------------


def test_api_error_is_one_sentence_without_traceback(run: Callable[..., Result]) -> None:
    for args in (
        ["jobs", "describe", "job-nope"],
        ["jobs", "logs", "job-nope"],
        ["jobs", "events", "job-nope", "-o", "json"],
        ["jobs", "delete", "job-nope"],
    ):
        res = run(*args)
        assert_one_sentence_error(
            res, "job job-nope not found", "not_found", "HTTP 404", "request req-"
        )


def test_connection_refused_is_a_friendly_message() -> None:
    url = f"http://127.0.0.1:{closed_port()}"
    res = CliRunner().invoke(cli, ["jobs", "list"], env={"STACKML_URL": url})
    assert_one_sentence_error(
        res,
        f"cannot reach the stackml API at {url}",
        "connection refused",
        "stackml up",
        "STACKML_URL",
    )


def test_url_comes_from_the_environment(api_url: str) -> None:
    res = CliRunner().invoke(cli, ["jobs", "list", "-o", "json"], env={"STACKML_URL": api_url})
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout) == {"jobs": [], "next": None}


def test_unknown_command_is_a_usage_error() -> None:
    res = CliRunner().invoke(cli, ["jobs", "frobnicate"])
    assert res.exit_code == 2


# -- up, runtime build, demo -----------------------------------------------------------------------


class FakePlatform:
    instances: list[FakePlatform] = []
    url = "http://127.0.0.1:8080"
    fail_with: BaseException = KeyboardInterrupt()

    def __init__(
        self, settings: Settings, *, concurrency: int = 4, beat: bool = True, quiet: bool = False
    ) -> None:
        self.settings = settings
        self.concurrency = concurrency
        self.quiet = quiet
        self.redis_url = "redis+socket:///tmp/x/redis.socket"
        self.redis_embedded = True
        self.started = self.stopped = False
        FakePlatform.instances.append(self)

    def start(self) -> None:
        self.started = True

    def stop(self) -> None:
        self.stopped = True

    def wait(self) -> None:
        raise self.fail_with

    def __enter__(self) -> FakePlatform:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


@pytest.fixture
def fake_platform(monkeypatch: pytest.MonkeyPatch) -> type[FakePlatform]:
    import service.platform

    FakePlatform.instances = []
    FakePlatform.fail_with = KeyboardInterrupt()
    monkeypatch.setattr(service.platform, "LocalPlatform", FakePlatform)
    return FakePlatform


def test_up_runs_until_ctrl_c(fake_platform: type[FakePlatform]) -> None:
    res = CliRunner().invoke(cli, ["up", "--port", "8181", "--workers", "2"])
    assert res.exit_code == 0, res.output
    (p,) = fake_platform.instances
    assert p.started and p.stopped
    assert p.settings.port == 8181 and p.concurrency == 2
    assert "http://127.0.0.1:8080" in res.output  # the fake's url
    assert "embedded" in res.output and "stopped" in res.output


def test_up_reports_a_dead_worker(fake_platform: type[FakePlatform]) -> None:
    from service.platform import PlatformError

    fake_platform.fail_with = PlatformError("the worker exited with status 1")
    res = CliRunner().invoke(cli, ["up"])
    assert_one_sentence_error(res, "the worker exited with status 1", "platform_error")
    assert fake_platform.instances[0].stopped


def test_runtime_build(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import service.runtime

    calls: list[str] = []

    def fake_ensure(settings: Settings, key: str, *, echo: Any = None) -> Path:
        calls.append(key)
        echo("building")
        return tmp_path / "bin" / "python"

    monkeypatch.setattr(service.runtime, "ensure_runtime", fake_ensure)
    res = CliRunner().invoke(cli, ["runtime", "build"])
    assert res.exit_code == 0, res.output
    assert calls == ["tensorflow-2.21"]
    assert f"runtime tensorflow-2.21: {tmp_path / 'bin' / 'python'}" in res.output


@pytest.fixture
def demo_env(
    monkeypatch: pytest.MonkeyPatch,
    fake_platform: type[FakePlatform],
    api_url: str,
    tmp_path: Path,
    trainer_dir: Path,
) -> Path:
    """The demo against the test API: a fake platform, a fake runtime, a fake predict.py."""
    import service.runtime

    monkeypatch.setattr(FakePlatform, "url", api_url)
    monkeypatch.setattr(
        service.runtime, "ensure_runtime", lambda settings, key, echo=None: Path(sys.executable)
    )
    (trainer_dir / "predict.py").write_text(
        "import json, sys, os\n"
        "assert os.path.isdir(sys.argv[1]), sys.argv\n"
        "print(json.dumps({'predictions': [[1.5], [2.5], [3.5]]}))\n"
    )
    monkeypatch.setattr(demo_mod, "EXAMPLE_DIR", trainer_dir)
    return trainer_dir


@pytest.mark.parametrize("clean", [False, True])
def test_demo_trains_predicts_and_cleans_up(
    demo_env: Path,
    settings: Settings,
    db_url: str,
    enqueued: DrivingRecorder,
    api_url: str,
    clean: bool,
) -> None:
    enqueued.on_allocate = lambda job_id: drive(db_url, job_id, log=TRAINER_LOG, settings=settings)
    lines: list[str] = []
    code = demo_mod.run_demo(settings, lines.append, clean=clean)
    text = "\n".join(lines)
    assert code == 0, text
    assert 'predictions for 3 rows: {"predictions": [[1.5], [2.5], [3.5]]}' in text
    assert "model: local://projects/local/models/" in text
    assert f"on disk: {settings.store_dir.resolve()}" in text
    assert "demo succeeded in" in text
    jobs = api_json(api_url, "/v1/jobs")["jobs"]
    assert len(jobs) == (0 if clean else 1)
    assert FakePlatform.instances[0].stopped


def test_demo_reports_a_failed_job(
    demo_env: Path, settings: Settings, db_url: str, enqueued: DrivingRecorder
) -> None:
    enqueued.on_allocate = lambda job_id: drive(db_url, job_id, log=b"oops\n", outcome="FAILED")
    lines: list[str] = []
    code = demo_mod.run_demo(settings, lines.append)
    text = "\n".join(lines)
    assert code == 1
    assert "FAILED in phase train (trainer_exit_nonzero): the trainer exited 3" in text
    assert "demo failed in" in text


def test_demo_cancels_a_job_that_outlives_the_deadline(
    demo_env: Path,
    settings: Settings,
    db_url: str,
    api_url: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(demo_mod, "JOB_DEADLINE", 0.5)  # nobody drives the job: it stays QUEUED
    lines: list[str] = []
    code = demo_mod.run_demo(settings, lines.append)
    text = "\n".join(lines)
    assert code == 1
    assert "is still QUEUED after 0s" in text and "wait_timeout" in text
    assert "cancelling job job-" in text
    assert [j["state"] for j in api_json(api_url, "/v1/jobs")["jobs"]] == ["CANCELLED"]


# -- terminal escape sequences in what the trainer (or any client) controls ---------------------

HOSTILE_LOG = (
    b"epoch 1\n"
    b"\x1b]0;pwned\x07title set\n"  # OSC: sets the window title
    b"\x1b[2J\x1b[1;31mcleared\x1b[0m\n"  # CSI: clears the screen, colours
    b"\xc2\x9b31mc1 csi\n"  # the 8-bit CSI (U+009B) in UTF-8
    b"\x1b]8;;http://evil.example/\x1b\\link\x1b]8;;\x1b\\\n"  # OSC 8 hyperlink, ST-terminated
    b"\x1bP+q544e\x1b\\dcs\n"  # DCS (an XTGETTCAP query: the terminal would answer)
    b"loss=9.9\rloss=0.1\n"  # \r: the real value would be overwritten
    b"bell\x07 back\x08space \x7fdel\x1b7\x1b(B\n"
    b"\xe2\x80\xaeevil\xe2\x80\xac bidi\n"
    b"tab\tkept\n"
    b"unterminated \x1b]0;title swallowed\n"
    b"next line survives\n"
)
HOSTILE_SHOWN = (
    "epoch 1\n"
    "title set\n"
    "cleared\n"
    "c1 csi\n"
    "link\n"
    "dcs\n"
    "loss=9.9\nloss=0.1\n"
    "bell backspace del\n"
    "evil bidi\n"
    "tab\tkept\n"
    "unterminated \n"
    "next line survives\n"
)
CONTROL_CHARS = {chr(c) for c in (*range(0x00, 0x20), *range(0x7F, 0xA0))} - {"\n", "\t"}


def assert_no_controls(text: str) -> None:
    bad = sorted({hex(ord(c)) for c in text if c in CONTROL_CHARS or "\u202a" <= c <= "\u202e"})
    assert not bad, (bad, text)


def test_sanitizer_strips_sequences_even_cut_between_chunks() -> None:
    from service.cli.common import ByteSanitizer, clean

    assert clean(HOSTILE_LOG.decode()) == HOSTILE_SHOWN
    whole = ByteSanitizer()
    one_by_one = ByteSanitizer()
    assert whole.feed(HOSTILE_LOG) + whole.flush() == HOSTILE_SHOWN
    streamed = "".join(one_by_one.feed(HOSTILE_LOG[i : i + 1]) for i in range(len(HOSTILE_LOG)))
    assert streamed + one_by_one.flush() == HOSTILE_SHOWN
    assert clean("a\r\nb\r") == "a\nb\n"  # CR LF is one line end, a last CR one too
    assert clean("ok \x1b[") == "ok "  # a sequence cut by the end of the text is dropped
    assert clean("\x1bx\x1b\n") == "\n"
    assert clean("üñí €") == "üñí €"  # text is text


def test_logs_strip_terminal_escapes(
    run: Callable[..., Result], trainer_dir: Path, db_url: str
) -> None:
    job_id = json.loads(submit(run, trainer_dir, "-o", "json").stdout)["id"]
    drive(db_url, job_id, log=HOSTILE_LOG, pause=0)
    for args in ([], ["-f"], ["--offset", "8"]):
        res = run("jobs", "logs", job_id, *args)
        assert res.exit_code == 0, res.output
        assert_no_controls(res.stdout)
        assert "pwned" not in res.stdout and "evil.example" not in res.stdout
        expected = HOSTILE_SHOWN.removeprefix("epoch 1\n") if "--offset" in args else HOSTILE_SHOWN
        assert res.stdout == expected
    # -o json keeps the bytes, JSON-escaped: nothing raw reaches the terminal either
    res = run("jobs", "logs", job_id, "-o", "json")
    assert res.exit_code == 0
    assert "\x1b" not in res.stdout and "\x07" not in res.stdout and "\\u001b]0;pwned" in res.stdout
    assert json.loads(res.stdout)["log"] == HOSTILE_LOG.decode()
    # --raw (for a file or a pipe) writes the bytes as they are
    assert run("jobs", "logs", job_id, "--raw").stdout_bytes == HOSTILE_LOG


def test_follow_while_running_strips_escapes(
    run: Callable[..., Result], trainer_dir: Path, db_url: str, enqueued: DrivingRecorder
) -> None:
    enqueued.on_allocate = lambda job_id: drive(db_url, job_id, log=HOSTILE_LOG, pause=0.02)
    job_id = json.loads(submit(run, trainer_dir, "-o", "json").stdout)["id"]
    res = run("jobs", "logs", job_id, "--follow")
    assert res.exit_code == 0
    assert res.stdout == HOSTILE_SHOWN


def test_submit_wait_strips_escapes_of_log_and_events(
    run: Callable[..., Result], trainer_dir: Path, db_url: str, enqueued: DrivingRecorder
) -> None:
    enqueued.on_allocate = lambda job_id: drive(
        db_url, job_id, log=HOSTILE_LOG, outcome="FAILED", pause=0.02
    )
    res = submit(run, trainer_dir, "--wait")
    assert res.exit_code == 1
    assert_no_controls(res.output)
    assert "| title set" in res.output and "| next line survives" in res.output
    assert "pwned" not in res.output


def test_describe_and_events_strip_terminal_escapes(
    run: Callable[..., Result], trainer_dir: Path, db_url: str
) -> None:
    job_id = json.loads(submit(run, trainer_dir, "-o", "json").stdout)["id"]
    evil = "\x1b]0;pwned\x07\x1b[2Jhidden\rshown \x9b1mC1 \x1bP1$r\x1b\\"
    with session_scope(db_url) as s:
        repo.add_event(s, job_id, "provision", f"SSH failed {evil}")
        assert repo.transition(
            s,
            job_id,
            JobState.QUEUED,
            JobState.FAILED,
            failure=repo.Failure(Phase.TRAIN, FailureReason.TRAINER_EXIT_NONZERO, f"exit 3 {evil}"),
        )
    for args in (["describe", job_id], ["events", job_id]):
        res = run("jobs", *args)
        assert res.exit_code == 0, res.output
        assert_no_controls(res.stdout)
        assert "pwned" not in res.stdout
        assert "hidden" in res.stdout and "shown" in res.stdout and "SSH failed" in res.stdout
    for args in (["describe", job_id, "-o", "json"], ["events", job_id, "-o", "json"]):
        res = run("jobs", *args)
        assert res.exit_code == 0
        assert_no_controls(res.stdout)  # JSON escapes them...
        assert "\\u001b]0;pwned" in res.stdout  # ...and keeps them, as the API sent them


# -- the split: the operator's commands apart from the user's ----------------------------------


def test_operator_and_user_commands_live_in_their_own_modules() -> None:
    from service.cli import datasets as dataset_cmds
    from service.cli import models as model_cmds
    from service.cli import ops
    from service.cli import schedules as schedule_cmds
    from service.cli import user as user_cmds

    assert set(cli.commands) == {
        "up",
        "demo",
        "runtime",
        "db",
        "devcloud",
        "jobs",
        "models",
        "schedules",
        "datasets",
        "quotas",
        "usage",
        "flavors",
    }
    assert cli.commands["schedules"] is schedule_cmds.schedules
    assert cli.commands["datasets"] is dataset_cmds.datasets
    assert model_cmds.models.commands["feedback"] is dataset_cmds.feedback
    for name in ("up", "demo", "runtime", "db"):
        assert cli.commands[name] is getattr(ops, name)
    assert cli.commands["jobs"] is user_cmds.jobs
    assert cli.commands["models"] is model_cmds.models
    assert set(user_cmds.jobs.commands) == {
        "submit",
        "list",
        "describe",
        "logs",
        "cancel",
        "delete",
        "events",
        "metrics",
    }
    assert set(cli.commands["db"].commands) == {"upgrade"}  # type: ignore[attr-defined]


def test_python_m_service_cli_is_the_stackml_command() -> None:
    import subprocess

    res = subprocess.run(
        [sys.executable, "-m", "service.cli", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert res.returncode == 0, res.stderr
    for name in ("up", "demo", "runtime", "db", "devcloud", "jobs"):
        assert f"  {name} " in res.stdout, res.stdout


def test_describe_shows_the_restarts_of_a_restartable_job_only(
    run: Callable[..., Result], trainer_dir: Path
) -> None:
    plain = json.loads(submit(run, trainer_dir, "-o", "json").stdout)["id"]
    restartable = json.loads(
        submit(run, trainer_dir, "--restart-policy", "OnFailure", "-o", "json").stdout
    )["id"]
    assert "restarts" not in run("jobs", "describe", plain).stdout
    desc = run("jobs", "describe", restartable)
    assert desc.exit_code == 0, desc.output
    assert re.search(r"restarts\s+0 of 3 \(OnFailure\)", desc.stdout), desc.stdout


def test_submit_tuning_from_a_file_and_describe_shows_the_trials(
    run: Callable[..., Result], trainer_dir: Path, db_url: str, tmp_path: Path
) -> None:
    from service.db import jobs as repo
    from service.db import tuning as tuning_repo
    from service.db.models import MetricRow

    section = {
        "metric": "loss",
        "goal": "minimize",
        "parameters": [{"name": "lr", "type": "discrete", "values": [0.1, 0.01]}],
        "max_trials": 2,
    }
    (tmp_path / "tuning.json").write_text(json.dumps(section))
    res = submit(run, trainer_dir, "--tuning", str(tmp_path / "tuning.json"), "-o", "json")
    assert res.exit_code == 0, res.output
    job = json.loads(res.stdout)
    assert job["state"] == "RUNNING" and job["spec"]["tuning"]["max_trials"] == 2
    with session_scope(db_url) as s:
        parent = repo.get_job(s, job["id"])
        for n, (lr, loss) in enumerate([(0.1, 0.7), (0.01, 0.2)], start=1):
            child = tuning_repo.create_trial(s, parent, n, {"lr": lr}, "p/", "local://{}".format)
            s.add(MetricRow(job_id=child.id, name="loss", value=loss, step=3, log_offset=0))
            child.state = "SUCCEEDED"
    desc = run("jobs", "describe", job["id"])
    assert desc.exit_code == 0, desc.output
    assert "trials: loss (minimize), 2 of 2" in desc.stdout
    assert re.search(r"2 \(best\)\s+job-\S+\s+SUCCEEDED\s+lr=0.01\s+0.2", desc.stdout), desc.stdout
    bad = tmp_path / "bad.json"
    bad.write_text("[1]")
    res = submit(run, trainer_dir, "--tuning", str(bad))
    assert res.exit_code == 2 and "must hold a JSON object (the tuning section)" in res.output
