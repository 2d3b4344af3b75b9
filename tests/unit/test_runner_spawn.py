"""How the runner starts a trainer (workers/vm/runner.py: _spawn, _run_supervised) without
subprocess: its own session, in the package directory, stdin from /dev/null, stdout and stderr
into the log, looked up on the job's PATH; an exit status, a signal, or a sentence in the log
when it cannot start."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest

from workers.vm import runner

SHOW = (
    "import os, sys; print(os.getsid(0) == os.getpid(), os.getcwd(), sys.stdin.read() == '', "
    "os.environ['X']); print('err', file=sys.stderr)"
)


def test_a_trainer_runs_in_its_own_session_and_directory_with_its_output_in_the_log(
    tmp_path: Path,
) -> None:
    pkg = tmp_path / "package"
    pkg.mkdir()
    env = {"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin", "X": "from the job"}
    env["PYTHONUNBUFFERED"] = "1"  # as the runner sets it: the lines in the order printed
    argv = [Path(sys.executable).name, "-c", SHOW]  # found on the job's PATH
    code = runner._run_supervised(
        str(tmp_path), argv, env, cwd=str(pkg), start_label="the trainer", kill_label="it"
    )
    assert code == 0
    assert (tmp_path / "log").read_text() == f"True {pkg} True from the job\nerr\n"
    assert int((tmp_path / "pid").read_text()) > 0


def _trainer(job_dir: Path, argv: list[str]) -> int:
    """_run_supervised as the supervisor runs a trainer, in `job_dir`, on a minimal PATH."""
    return runner._run_supervised(
        str(job_dir),
        argv,
        {"PATH": "/usr/bin:/bin"},
        cwd=str(job_dir),
        start_label="the trainer",
        kill_label="the trainer",
    )


def test_exit_codes_and_signals_are_reported_as_the_shell_would(tmp_path: Path) -> None:
    assert _trainer(tmp_path, ["sh", "-c", "exit 3"]) == 3
    assert _trainer(tmp_path, ["sh", "-c", "kill -9 $$"]) == 137
    assert "stackml-runner: the trainer was killed by signal 9" in (tmp_path / "log").read_text()


def test_a_program_that_cannot_start_is_127_and_a_sentence_in_the_log(tmp_path: Path) -> None:
    code = _trainer(tmp_path, [str(tmp_path / "env/bin/python"), "-m", "trainer"])
    assert code == 127
    log = (tmp_path / "log").read_text()
    assert log.startswith("stackml-runner: cannot start the trainer: [Errno 2] No such file")
    assert str(tmp_path / "env/bin/python") in log
    assert not (tmp_path / "pid").exists()
    with pytest.raises(ChildProcessError):  # the child that failed to exec was reaped
        os.waitpid(-1, os.WNOHANG)


def test_what_a_trainer_leaves_running_is_stopped_before_its_exit_is_reported(
    tmp_path: Path,
) -> None:
    """A child the trainer did not wait for would go on writing the log (and the model) after
    the exit status says they are whole: it is stopped first, and the log says so."""
    marker = tmp_path / "late"
    # the child ignores nothing: SIGTERM ends it; one that ignores SIGTERM is SIGKILLed
    code = _trainer(
        tmp_path,
        ["sh", "-c", f"(sleep 30; echo late > {marker}) & (trap '' TERM; sleep 30) & exit 0"],
    )
    assert code == 0
    time.sleep(0.2)
    assert not marker.exists()
    assert not runner._group_alive(int((tmp_path / "pid").read_text()))  # none of it runs
    assert (tmp_path / "log").read_text() == (
        "stackml-runner: the trainer exited leaving processes running; they were stopped\n"
    )
    assert _trainer(tmp_path, ["sh", "-c", "exit 0"]) == 0  # nothing left: nothing said
    assert (tmp_path / "log").read_text().count("stopped") == 1
