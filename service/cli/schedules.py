"""`stackml schedules ...`: cron schedules that submit a job at each slot (create, list,
describe, pause, resume, delete, runs). A schedule is named by its id (sch-...) or its name.
User-controlled text is printed through clean_tree (terminal escapes stripped); `-o json`
prints the API's JSON exactly."""

from __future__ import annotations

import json
from typing import Any

import click
from rich.table import Table
from rich.text import Text

from service.cli.common import (
    clean_tree,
    client_of,
    make_console,
    output_option,
    print_json,
    short_time,
)


@click.group("schedules")
def schedules() -> None:
    """Cron schedules that submit a training job at each fire time."""


def _read_job(path: str) -> dict[str, Any]:
    try:
        with click.open_file(path, "r", encoding="utf-8") as fh:
            text = fh.read()
    except OSError as e:
        raise click.BadParameter(
            f"cannot read {path}: {e.strerror or e}", param_hint="--job"
        ) from e
    try:
        obj = json.loads(text)
    except ValueError as e:
        raise click.BadParameter(f"{path} is not JSON: {e}", param_hint="--job") from e
    if not isinstance(obj, dict):
        raise click.BadParameter(f"{path} must hold a JSON object (a job spec)", param_hint="--job")
    return obj


@schedules.command("create")
@click.argument("name")
@click.option("--cron", required=True, help="5-field cron expression, or @hourly, @daily, ...")
@click.option("--timezone", "tz", default="UTC", show_default=True, help="An IANA time zone.")
@click.option(
    "--job",
    "job_path",
    required=True,
    metavar="FILE",
    help="The job spec (JSON, as POST /v1/jobs takes it; - reads stdin).",
)
@click.option(
    "--concurrency",
    type=click.Choice(["Forbid", "Allow", "Replace"]),
    default=None,
    help="When the previous run is still live: skip (Forbid, the default), start anyway "
    "(Allow), or cancel it and start (Replace).",
)
@click.option(
    "--catchup",
    type=click.Choice(["none", "all"]),
    default=None,
    help="Missed slots: fire only the latest (none, the default) or all, up to --max-catchup.",
)
@click.option("--max-catchup", type=click.IntRange(1, 100), default=None)
@click.option("--paused", is_flag=True, help="Create it paused.")
@click.option(
    "--dataset",
    default=None,
    metavar="NAME",
    help="Rebuild this dataset before each slot's job and train on the new version "
    "(the template then leaves inputs.data_uri out).",
)
@output_option
@click.pass_context
def schedules_create(
    ctx: click.Context,
    name: str,
    cron: str,
    tz: str,
    job_path: str,
    concurrency: str | None,
    catchup: str | None,
    max_catchup: int | None,
    paused: bool,
    dataset: str | None,
    output: str,
) -> None:
    """Create schedule NAME."""
    job = _read_job(job_path)
    sch = client_of(ctx).create_schedule(
        name,
        cron,
        job,
        timezone=tz,
        concurrency=concurrency,
        catchup=catchup,
        max_catchup=max_catchup,
        paused=paused,
        dataset=dataset,
    )
    if output == "json":
        print_json(sch)
        return
    s = clean_tree(sch)
    console = make_console()
    console.print(f"created schedule {s.get('name', name)} ({s.get('id', '')})")
    _next(console, s)


def _next(console: Any, s: dict[str, Any]) -> None:
    if s.get("paused"):
        console.print("paused: nothing fires until it is resumed")
        return
    times = s.get("next_fire_times") or []
    if times:
        console.print("next: " + ", ".join(str(t) for t in times))


@schedules.command("list")
@output_option
@click.pass_context
def schedules_list(ctx: click.Context, output: str) -> None:
    """The project's schedules."""
    rows = client_of(ctx).list_schedules()
    if output == "json":
        print_json({"schedules": rows})
        return
    console = make_console()
    if not rows:
        console.print("no schedules")
        return
    table = Table(box=None, header_style="bold")
    for col in ("NAME", "ID", "CRON", "TIMEZONE", "POLICY", "STATE", "NEXT", "LAST"):
        table.add_column(col, no_wrap=True)
    for s in clean_tree(rows):
        nxt = (s.get("next_fire_times") or [None])[0]
        last = s.get("last_run") or {}
        table.add_row(
            s.get("name", ""),
            s.get("id", ""),
            s.get("cron", ""),
            s.get("timezone", ""),
            f"{s.get('concurrency', '')}/{s.get('catchup', '')}",
            "paused" if s.get("paused") else "active",
            short_time(nxt) if nxt else "",
            f"{short_time(last.get('fire_time'))} {last.get('outcome', '')}" if last else "",
        )
    console.print(table)


@schedules.command("describe")
@click.argument("schedule")
@output_option
@click.pass_context
def schedules_describe(ctx: click.Context, schedule: str, output: str) -> None:
    """One schedule: its policies, next fire times, job template and live jobs."""
    sch = client_of(ctx).get_schedule(schedule)
    if output == "json":
        print_json(sch)
        return
    s = clean_tree(sch)
    console = make_console()
    console.print(Text(f"{s.get('name', '')}  ({s.get('id', '')})", style="bold"))
    console.print(f"cron {s.get('cron', '')} in {s.get('timezone', '')}")
    console.print(
        f"concurrency {s.get('concurrency', '')}, catchup {s.get('catchup', '')} "
        f"(max {s.get('max_catchup', '')})"
    )
    console.print(f"created {short_time(s.get('created_at'))} by {s.get('created_by', '')}")
    if s.get("dataset"):
        console.print(f"rebuilds dataset {s['dataset']} before each slot's job")
    _next(console, s)
    last = s.get("last_run")
    if last:
        console.print(f"last slot {last.get('fire_time')}: {_run_text(last)}")
    live = s.get("live_jobs") or []
    console.print(f"live jobs: {', '.join(live) if live else 'none'}")
    job = s.get("job") or {}
    console.print(f"job: {json.dumps(job, indent=2, sort_keys=True)}", markup=False)


def _run_text(r: dict[str, Any]) -> str:
    out = str(r.get("outcome", ""))
    if r.get("dataset_version") is not None:
        out += f" dataset v{r['dataset_version']}"
    if r.get("job_id"):
        out += f" {r['job_id']}"
    if r.get("reason"):
        out += f" ({r['reason']})"
    return out


@schedules.command("pause")
@click.argument("schedule")
@click.pass_context
def schedules_pause(ctx: click.Context, schedule: str) -> None:
    """Stop firing; slots that pass while paused never fire."""
    s = clean_tree(client_of(ctx).pause_schedule(schedule))
    make_console().print(f"paused schedule {s.get('name', schedule)}")


@schedules.command("resume")
@click.argument("schedule")
@click.pass_context
def schedules_resume(ctx: click.Context, schedule: str) -> None:
    """Fire again, from the next slot after now."""
    s = clean_tree(client_of(ctx).resume_schedule(schedule))
    console = make_console()
    console.print(f"resumed schedule {s.get('name', schedule)}")
    _next(console, s)


@schedules.command("delete")
@click.argument("schedule")
@click.pass_context
def schedules_delete(ctx: click.Context, schedule: str) -> None:
    """Delete the schedule and its slot records (the jobs it started stay)."""
    client_of(ctx).delete_schedule(schedule)
    make_console().print(f"deleted schedule {clean_tree(schedule)}")


@schedules.command("runs")
@click.argument("schedule")
@click.option("--limit", type=click.IntRange(1, 200), default=50, show_default=True)
@output_option
@click.pass_context
def schedules_runs(ctx: click.Context, schedule: str, limit: int, output: str) -> None:
    """The slots the schedule handled, latest first: started (with its job), skipped or
    failed (with the reason)."""
    rows = client_of(ctx).schedule_runs(schedule, limit)
    if output == "json":
        print_json({"runs": rows})
        return
    console = make_console()
    if not rows:
        console.print("no slots fired yet")
        return
    table = Table(box=None, header_style="bold")
    for col in ("FIRE TIME", "OUTCOME", "JOB", "MISSED"):
        table.add_column(col, no_wrap=True)
    table.add_column("REASON")
    for r in clean_tree(rows):
        table.add_row(
            str(r.get("fire_time", "")),
            str(r.get("outcome", "")),
            r.get("job_id") or "",
            str(r.get("missed", 0) or ""),
            r.get("reason", ""),
        )
    console.print(table)
