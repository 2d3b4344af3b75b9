"""`openstack ml schedule ...`, `openstack ml quota show|set`, `openstack ml usage`,
`openstack ml flavor list`."""

from __future__ import annotations

import argparse
from typing import Any

from osc_lib import exceptions

from service.client import Json
from service.osc.common import MLCommand, MLLister, MLShowOne, read_spec, rows, show

SCHEDULE_COLUMNS = ("ID", "Name", "Cron", "Timezone", "Concurrency", "Paused", "Next Fire At")
RUN_COLUMNS = ("Fire Time", "Outcome", "Job ID", "Reason", "Missed", "Recorded At")
USAGE_COLUMNS = ("Kind", "ID", "Name", "Project", "State", "VM Seconds", "GPU Hours", "Cost")
FLAVOR_COLUMNS = ("Name", "VCPUs", "RAM MB", "Disk GB", "GPUs", "GPU Type", "Price Per Hour")
QUOTA_KEYS = ("jobs", "servers", "gpus")


# -- schedules ------------------------------------------------------------------------------


def schedule_fields(s: Json) -> dict[str, Any]:
    out = {
        k: s.get(k)
        for k in (
            "id",
            "name",
            "project_id",
            "cron",
            "timezone",
            "concurrency",
            "catchup",
            "max_catchup",
            "paused",
            "next_fire_at",
            "next_fire_times",
            "last_run",
            "created_by",
            "created_at",
            "updated_at",
        )
    }
    if "job" in s:
        out["job"] = s.get("job") or {}
    if "live_jobs" in s:
        out["live_jobs"] = s.get("live_jobs") or []
    return out


def _schedule_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("schedule", metavar="<schedule>", help="Schedule ID (sch-...) or name")


class CreateSchedule(MLShowOne):
    """Create a schedule that submits a job spec at each slot of a cron expression."""

    def get_parser(self, prog_name: str) -> argparse.ArgumentParser:
        parser = super().get_parser(prog_name)
        parser.add_argument("name", metavar="<name>", help="Schedule name")
        parser.add_argument("--cron", metavar="<expr>", required=True, help="e.g. '0 3 * * *'")
        parser.add_argument(
            "--job-spec",
            metavar="<file>",
            required=True,
            help="The job spec it submits (JSON or YAML, `-` for stdin)",
        )
        parser.add_argument("--timezone", metavar="<tz>", default="UTC", help="IANA name")
        parser.add_argument(
            "--concurrency", choices=("Forbid", "Allow", "Replace"), help="Default: Forbid"
        )
        parser.add_argument("--catchup", choices=("none", "all"), help="Default: none")
        parser.add_argument("--max-catchup", metavar="<n>", type=int, help="1..100")
        parser.add_argument("--paused", action="store_true", help="Create it paused")
        return parser

    def take_action(self, parsed_args: argparse.Namespace) -> tuple[Any, Any]:
        a = parsed_args
        s = self.client.create_schedule(
            a.name,
            a.cron,
            read_spec(a.job_spec),
            timezone=a.timezone,
            concurrency=a.concurrency,
            catchup=a.catchup,
            max_catchup=a.max_catchup,
            paused=a.paused,
        )
        return show(schedule_fields(s))


class ListSchedule(MLLister):
    """List your project's schedules."""

    def take_action(self, parsed_args: argparse.Namespace) -> tuple[Any, Any]:
        fields = ["id", "name", "cron", "timezone", "concurrency", "paused", "next_fire_at"]
        return SCHEDULE_COLUMNS, rows(self.client.list_schedules(), fields)


class ShowSchedule(MLShowOne):
    """Show a schedule, its job template and its unfinished jobs."""

    def get_parser(self, prog_name: str) -> argparse.ArgumentParser:
        parser = super().get_parser(prog_name)
        _schedule_arg(parser)
        return parser

    def take_action(self, parsed_args: argparse.Namespace) -> tuple[Any, Any]:
        return show(schedule_fields(self.client.get_schedule(parsed_args.schedule)))


class PauseSchedule(MLShowOne):
    """Pause a schedule (its slots stop firing)."""

    def get_parser(self, prog_name: str) -> argparse.ArgumentParser:
        parser = super().get_parser(prog_name)
        _schedule_arg(parser)
        return parser

    def take_action(self, parsed_args: argparse.Namespace) -> tuple[Any, Any]:
        return show(schedule_fields(self.client.pause_schedule(parsed_args.schedule)))


class ResumeSchedule(MLShowOne):
    """Resume a schedule (the slots missed while paused never fire)."""

    def get_parser(self, prog_name: str) -> argparse.ArgumentParser:
        parser = super().get_parser(prog_name)
        _schedule_arg(parser)
        return parser

    def take_action(self, parsed_args: argparse.Namespace) -> tuple[Any, Any]:
        return show(schedule_fields(self.client.resume_schedule(parsed_args.schedule)))


class DeleteSchedule(MLCommand):
    """Delete schedules (the jobs they started stay)."""

    def get_parser(self, prog_name: str) -> argparse.ArgumentParser:
        parser = super().get_parser(prog_name)
        parser.add_argument("schedules", metavar="<schedule>", nargs="+", help="ID(s) or name(s)")
        return parser

    def take_action(self, parsed_args: argparse.Namespace) -> None:
        for ref in parsed_args.schedules:
            self.client.delete_schedule(ref)


class ScheduleRuns(MLLister):
    """The slots a schedule handled, latest first."""

    def get_parser(self, prog_name: str) -> argparse.ArgumentParser:
        parser = super().get_parser(prog_name)
        _schedule_arg(parser)
        parser.add_argument("--limit", metavar="<n>", type=int, default=50, help="1..200")
        return parser

    def take_action(self, parsed_args: argparse.Namespace) -> tuple[Any, Any]:
        runs = self.client.schedule_runs(parsed_args.schedule, limit=parsed_args.limit)
        fields = ["fire_time", "outcome", "job_id", "reason", "missed", "recorded_at"]
        return RUN_COLUMNS, rows(runs, fields)


# -- quotas, usage, flavors -----------------------------------------------------------------


def quota_fields(q: Json) -> dict[str, Any]:
    limits, used = q.get("limits") or {}, q.get("in_use") or {}
    out: dict[str, Any] = {"project_id": q.get("project_id")}
    for key in QUOTA_KEYS:
        out[key] = limits.get(key)
        out[f"{key}_in_use"] = used.get(key)
    out["queued"] = q.get("queued")
    out["defaults"] = q.get("defaults") or {}
    out["overrides"] = q.get("overrides") or {}
    return out


class ShowQuota(MLShowOne):
    """Show a project's limits and what it uses (default: your project)."""

    def get_parser(self, prog_name: str) -> argparse.ArgumentParser:
        parser = super().get_parser(prog_name)
        parser.add_argument(
            "project", metavar="<project>", nargs="?", help="Project ID (admin, or your own)"
        )
        return parser

    def take_action(self, parsed_args: argparse.Namespace) -> tuple[Any, Any]:
        return show(quota_fields(self.client.get_quotas(parsed_args.project)))


def _limit(text: str) -> int | None:
    if text.lower() in ("default", "none"):
        return None
    try:
        value = int(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number or `default`") from e
    if value < 0:
        raise argparse.ArgumentTypeError("a limit is 0 or more")
    return value


class SetQuota(MLShowOne):
    """Admin: override a project's limits (`default` drops an override)."""

    def get_parser(self, prog_name: str) -> argparse.ArgumentParser:
        parser = super().get_parser(prog_name)
        parser.add_argument("project", metavar="<project>", help="Project ID")
        for key in QUOTA_KEYS:
            parser.add_argument(
                f"--{key}",
                metavar="<n|default>",
                type=_limit,
                default=argparse.SUPPRESS,
                help=f"Concurrent {key} limit",
            )
        return parser

    def take_action(self, parsed_args: argparse.Namespace) -> tuple[Any, Any]:
        limits = {k: getattr(parsed_args, k) for k in QUOTA_KEYS if hasattr(parsed_args, k)}
        if not limits:
            raise exceptions.CommandError("nothing to set: give --jobs, --servers or --gpus")
        return show(quota_fields(self.client.set_quotas(parsed_args.project, limits)))


class ShowUsage(MLLister):
    """VM-seconds, GPU-hours and cost per job and endpoint, and the total (default: the last
    30 days)."""

    def get_parser(self, prog_name: str) -> argparse.ArgumentParser:
        parser = super().get_parser(prog_name)
        parser.add_argument("--since", metavar="<time>", help="ISO 8601 (default: until - 30d)")
        parser.add_argument("--until", metavar="<time>", help="ISO 8601 (default: now)")
        who = parser.add_mutually_exclusive_group()
        who.add_argument("--project", metavar="<project>", help="Admin: this project")
        who.add_argument("--all-projects", action="store_true", help="Admin: every project")
        return parser

    def take_action(self, parsed_args: argparse.Namespace) -> tuple[Any, Any]:
        a = parsed_args
        body = self.client.usage(
            since=a.since, until=a.until, project=a.project, all_projects=a.all_projects
        )
        items = [{"kind": "job", **r} for r in body.get("jobs") or []]
        items += [{"kind": "endpoint", **r} for r in body.get("endpoints") or []]
        items.append({"kind": "total", "name": f"{body.get('since')} .. {body.get('until')}"})
        items[-1].update(body.get("totals") or {})
        fields = ["kind", "id", "name", "project_id", "state", "vm_seconds", "gpu_hours", "cost"]
        return USAGE_COLUMNS, rows(items, fields)


class ListFlavor(MLLister):
    """List the flavors jobs and endpoints may ask for, with GPUs and price."""

    def get_parser(self, prog_name: str) -> argparse.ArgumentParser:
        parser = super().get_parser(prog_name)
        parser.add_argument("--gpus", metavar="<n>", type=int, help="Only with this many GPUs")
        parser.add_argument("--gpu-type", metavar="<type>", help="Only with this GPU type")
        return parser

    def take_action(self, parsed_args: argparse.Namespace) -> tuple[Any, Any]:
        flavors = self.client.list_flavors(gpus=parsed_args.gpus, gpu_type=parsed_args.gpu_type)
        fields = ["name", "vcpus", "ram_mb", "disk_gb", "gpus", "gpu_type", "price_per_hour"]
        return FLAVOR_COLUMNS, rows(flavors, fields)
