"""`openstack ml job create|list|show|logs|cancel|delete`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import click
from osc_lib import exceptions

from service.cli.common import ByteSanitizer
from service.cli.user import KEY_RE, NAME_RE, _default_name, _hp_value, _runtime_spec
from service.client import Json
from service.osc.common import MLCommand, MLLister, MLShowOne, key_values, read_spec, rows, show

LIST_COLUMNS = ("ID", "Name", "State", "Created At", "Finished At")
LONG_COLUMNS = (*LIST_COLUMNS, "Project", "Flavor", "Labels")


def _flavor(job: Json) -> Any:
    return ((job.get("spec") or {}).get("resources") or {}).get("flavor")


def _labels(job: Json) -> Any:
    return (job.get("spec") or {}).get("labels") or {}


def _failure(job: Json) -> str | None:
    f = job.get("failure")
    if not f:
        return None
    return f"{f.get('phase')} / {f.get('reason')}: {f.get('message')}"


def job_fields(job: Json) -> dict[str, Any]:
    """The fields `job show` (and create, cancel) print, in order."""
    spec = job.get("spec") or {}
    trainer = spec.get("trainer") or {}
    runtime = spec.get("runtime") or {}
    return {
        "id": job.get("id"),
        "name": job.get("name"),
        "project_id": job.get("project_id"),
        "type": job.get("type"),
        "state": job.get("state"),
        "failure": _failure(job),
        "queue_reason": job.get("queue_reason"),
        "created_at": job.get("created_at"),
        "started_at": job.get("started_at"),
        "finished_at": job.get("finished_at"),
        "module": trainer.get("module"),
        "args": trainer.get("args") or [],
        "package_uri": trainer.get("package_uri"),
        "runtime": f"{runtime.get('framework', '')}-{runtime.get('version', '')}"
        if runtime
        else None,
        "resources": spec.get("resources") or {},
        "hyperparameters": spec.get("hyperparameters") or {},
        "labels": spec.get("labels") or {},
        "model_uri": (job.get("output") or {}).get("model_uri"),
        "metrics": job.get("metrics") or {},
        "usage": job.get("usage") or {},
        "servers": [
            f"{r.get('name')} ({r.get('role')}, {r.get('flavor')}, {r.get('state')})"
            for r in job.get("resources") or []
        ],
        "trial": f"{job['trial']} of {job['parent_id']}" if job.get("parent_id") else None,
        "trials": _trials(job.get("tuning")),
    }


def _trials(tuning: Json | None) -> list[str] | None:
    """A tuning job's trials, one line each (the best marked); None for any other job."""
    if not tuning:
        return None
    best = (tuning.get("best_trial") or {}).get("trial")
    out = []
    for t in tuning.get("trials") or []:
        params = ", ".join(f"{k}={v}" for k, v in sorted((t.get("hyperparameters") or {}).items()))
        value = "" if t.get("value") is None else f" {tuning.get('metric')}={t['value']:.6g}"
        mark = " best" if t.get("trial") == best else ""
        out.append(f"{t.get('trial')} {t.get('job_id')} {t.get('state')}{value} ({params}){mark}")
    return out


class CreateJob(MLShowOne):
    """Submit a training job: a spec file and/or flags; a trainer directory is staged."""

    def get_parser(self, prog_name: str) -> argparse.ArgumentParser:
        parser = super().get_parser(prog_name)
        parser.add_argument(
            "--spec",
            metavar="<file>",
            help="A job spec (JSON or YAML, `-` for stdin) as POST /v1/jobs takes it; the "
            "flags below override its fields",
        )
        parser.add_argument(
            "--package-path",
            metavar="<dir|tar.gz|uri>",
            help="The trainer: a directory (tarred and uploaded), a .tar.gz (uploaded), or a "
            "local:// / swift:// URI",
        )
        parser.add_argument("--module", metavar="<module>", help="Run `python -m <module>`")
        parser.add_argument(
            "--name", metavar="<name>", help="Job name (default: the package's and the time)"
        )
        parser.add_argument("--flavor", metavar="<flavor>", help="See `openstack ml flavor list`")
        parser.add_argument(
            "--runtime", metavar="<runtime>", help="e.g. tensorflow-2.21 (default: the platform's)"
        )
        parser.add_argument(
            "--hyperparameter",
            "--hp",
            dest="hyperparameters",
            metavar="<key=value>",
            action="append",
            type=key_values("hyperparameter"),
            default=[],
            help="Passed to the trainer as --key=value (repeatable)",
        )
        parser.add_argument(
            "--label",
            dest="labels",
            metavar="<key=value>",
            action="append",
            type=key_values("label"),
            default=[],
            help="A label to find the job by (repeatable)",
        )
        parser.add_argument(
            "--env",
            metavar="<name=value>",
            action="append",
            type=key_values("variable"),
            default=[],
            help="An environment variable of the trainer (repeatable)",
        )
        parser.add_argument("--data-uri", metavar="<uri>", help="Input data (STACKML_INPUT_DIR)")
        parser.add_argument("--model-uri", metavar="<uri>", help="Where the model goes")
        parser.add_argument(
            "--register-as", metavar="<model>", help="Register the model as a version of <model>"
        )
        parser.add_argument(
            "--max-runtime", metavar="<seconds>", type=int, help="Fail the job after this"
        )
        parser.add_argument(
            "--tuning",
            metavar="<file>",
            help="Tune hyperparameters: the spec's `tuning` section (JSON or YAML: metric, goal, "
            "parameters, max_trials, ...); each trial is a job of its own",
        )
        parser.add_argument(
            "--arg",
            dest="trainer_args",
            metavar="<arg>",
            action="append",
            default=[],
            help="An argument of the trainer's module (repeatable, in order; write "
            "--arg=--flag for one that starts with -)",
        )
        return parser

    def take_action(self, parsed_args: argparse.Namespace) -> tuple[Any, Any]:
        spec = build_spec(parsed_args)
        package = parsed_args.package_path
        trainer = spec.setdefault("trainer", {})
        if package and "://" not in package:
            path = Path(package)
            if path.is_dir():
                staged = self.client.stage_package(path)
            elif path.is_file():
                staged = self.client.upload_package(path)
            else:
                raise exceptions.CommandError(f"--package-path {path} does not exist")
            trainer["package_uri"] = staged["package_uri"]
        elif package:
            trainer["package_uri"] = package
        if not trainer.get("package_uri") or not trainer.get("module"):
            raise exceptions.CommandError(
                "a job needs a trainer: --package-path and --module (or trainer.package_uri and "
                "trainer.module in --spec)"
            )
        if not spec.get("name"):
            spec["name"] = _default_name(package or trainer["package_uri"], trainer["module"])
        return show(job_fields(self.client.create_job(spec)))


def build_spec(parsed_args: argparse.Namespace) -> dict[str, Any]:
    """The job spec of `job create`: --spec's document, then each flag over it."""
    a = parsed_args
    spec: dict[str, Any] = read_spec(a.spec) if a.spec else {}
    trainer = spec.setdefault("trainer", {})
    if not isinstance(trainer, dict):
        raise exceptions.CommandError("trainer in --spec must be an object")
    if a.name:
        spec["name"] = a.name
    if a.module:
        trainer["module"] = a.module
    if a.trainer_args:
        trainer["args"] = list(a.trainer_args)
    if a.runtime:
        try:
            spec["runtime"] = _runtime_spec(a.runtime)
        except click.BadParameter as e:
            raise exceptions.CommandError(e.message) from e
    if a.flavor:
        spec.setdefault("resources", {})["flavor"] = a.flavor
    for key, value in a.hyperparameters:
        if not KEY_RE.match(key):
            raise exceptions.CommandError(f"{key!r} is not a valid hyperparameter name")
        spec.setdefault("hyperparameters", {})[key] = _hp_value(value)
    for key, value in a.labels:
        if not NAME_RE.match(key):
            raise exceptions.CommandError(f"{key!r} is not a valid label key")
        spec.setdefault("labels", {})[key] = value
    for key, value in a.env:
        if not KEY_RE.match(key):
            raise exceptions.CommandError(f"{key!r} is not a valid variable name")
        spec.setdefault("env", {})[key] = value
    if a.data_uri:
        spec.setdefault("inputs", {})["data_uri"] = a.data_uri
    if a.model_uri:
        spec.setdefault("output", {})["model_uri"] = a.model_uri
    if a.register_as:
        spec.setdefault("output", {})["register_as"] = a.register_as
    if a.max_runtime is not None:
        spec["max_runtime_seconds"] = a.max_runtime
    if a.tuning:
        spec["tuning"] = read_spec(a.tuning)
    return spec


class ListJob(MLLister):
    """List your project's jobs, newest first."""

    def get_parser(self, prog_name: str) -> argparse.ArgumentParser:
        parser = super().get_parser(prog_name)
        parser.add_argument(
            "--state",
            metavar="<state>",
            action="append",
            default=[],
            help="Only jobs in this state (repeatable)",
        )
        parser.add_argument(
            "--label",
            dest="labels",
            metavar="<key=value>",
            action="append",
            default=[],
            help="Only jobs with this label (repeatable)",
        )
        parser.add_argument(
            "--limit", metavar="<n>", type=int, help="At most this many jobs (default: all)"
        )
        parser.add_argument(
            "--long", action="store_true", help="Also the project, flavor and labels"
        )
        return parser

    def take_action(self, parsed_args: argparse.Namespace) -> tuple[Any, Any]:
        states = [s.upper() for s in parsed_args.state] or None
        if parsed_args.limit is not None:
            if parsed_args.limit < 1:
                raise exceptions.CommandError("--limit must be at least 1")
            page = self.client.list_jobs(
                state=states, labels=parsed_args.labels, limit=min(parsed_args.limit, 200)
            )
            jobs = (page.get("jobs") or [])[: parsed_args.limit]
        else:
            jobs = list(self.client.iter_jobs(state=states, labels=parsed_args.labels))
        fields: list[Any] = ["id", "name", "state", "created_at", "finished_at"]
        columns: tuple[str, ...] = LIST_COLUMNS
        if parsed_args.long:
            fields += ["project_id", _flavor, _labels]
            columns = LONG_COLUMNS
        return columns, rows(jobs, fields)


class ShowJob(MLShowOne):
    """Show a job: spec, state, failure, servers, latest metrics, usage."""

    def get_parser(self, prog_name: str) -> argparse.ArgumentParser:
        parser = super().get_parser(prog_name)
        parser.add_argument("job", metavar="<job>", help="Job ID")
        return parser

    def take_action(self, parsed_args: argparse.Namespace) -> tuple[Any, Any]:
        return show(job_fields(self.client.get_job(parsed_args.job)))


class LogsJob(MLCommand):
    """Print a job's log (the trainer's stdout and stderr), escape sequences removed."""

    def get_parser(self, prog_name: str) -> argparse.ArgumentParser:
        parser = super().get_parser(prog_name)
        parser.add_argument("job", metavar="<job>", help="Job ID")
        parser.add_argument(
            "--follow", "-f", action="store_true", help="Stream the log until the job ends"
        )
        parser.add_argument(
            "--offset", metavar="<bytes>", type=int, default=0, help="Start at this byte"
        )
        parser.add_argument(
            "--replica",
            metavar="<name>",
            help="Another server's log: worker-1, worker-2, ... (default: the chief's)",
        )
        return parser

    def take_action(self, parsed_args: argparse.Namespace) -> None:
        if parsed_args.offset < 0:
            raise exceptions.CommandError("--offset must be 0 or more")
        out = getattr(self.app, "stdout", None) or sys.stdout
        sanitizer = ByteSanitizer()
        if parsed_args.follow:
            chunks = self.client.follow_logs(
                parsed_args.job, parsed_args.offset, replica=parsed_args.replica
            )
        else:
            data, _ = self.client.logs(parsed_args.job, parsed_args.offset, parsed_args.replica)
            chunks = iter([data])
        for chunk in chunks:
            out.write(sanitizer.feed(chunk))
            out.flush()
        out.write(sanitizer.flush())
        out.flush()


class CancelJob(MLCommand):
    """Cancel jobs: their servers are torn down."""

    def get_parser(self, prog_name: str) -> argparse.ArgumentParser:
        parser = super().get_parser(prog_name)
        parser.add_argument("jobs", metavar="<job>", nargs="+", help="Job ID(s)")
        return parser

    def take_action(self, parsed_args: argparse.Namespace) -> None:
        for job_id in parsed_args.jobs:
            self.client.cancel_job(job_id)


class DeleteJob(MLCommand):
    """Delete finished jobs' records (their logs, events and metrics)."""

    def get_parser(self, prog_name: str) -> argparse.ArgumentParser:
        parser = super().get_parser(prog_name)
        parser.add_argument("jobs", metavar="<job>", nargs="+", help="Job ID(s)")
        return parser

    def take_action(self, parsed_args: argparse.Namespace) -> None:
        for job_id in parsed_args.jobs:
            self.client.delete_job(job_id)
