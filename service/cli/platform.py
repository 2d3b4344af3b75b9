"""`stackml quotas show|set|reset`, `stackml usage`, `stackml flavors list`: a project's limits,
what its servers cost, and what the compute backend offers. Tables print API text through
clean_tree (terminal escapes stripped); `-o json` prints the API's JSON."""

from __future__ import annotations

from typing import Any

import click
from rich.table import Table
from rich.text import Text

from service.cli.common import clean_tree, client_of, make_console, num, output_option, print_json
from service.client import Json

QUOTA_KEYS = ("jobs", "servers", "gpus")


@click.group()
def quotas() -> None:
    """A project's limits (concurrent jobs, servers, GPUs) and what it uses."""


def _quota_table(q: Json) -> Table:
    q = clean_tree(q)
    limits, used = q.get("limits") or {}, q.get("in_use") or {}
    defaults, overrides = q.get("defaults") or {}, q.get("overrides") or {}
    table = Table(title=f"project {q.get('project_id', '')}", box=None, header_style="bold")
    table.title_justify = "left"
    for col in ("RESOURCE", "IN USE", "LIMIT", "DEFAULT", "OVERRIDE"):
        table.add_column(col, justify="left" if col == "RESOURCE" else "right")
    for key in QUOTA_KEYS:
        limit, in_use = limits.get(key), used.get(key)
        full = isinstance(limit, int) and isinstance(in_use, int) and in_use >= limit
        table.add_row(
            key,
            Text(str(in_use), style="bold red" if full else ""),
            str(limit),
            str(defaults.get(key)),
            "-" if overrides.get(key) is None else str(overrides.get(key)),
        )
    return table


@quotas.command("show")
@click.argument("project", required=False)
@output_option
@click.pass_context
def quotas_show(ctx: click.Context, project: str | None, output: str) -> None:
    """PROJECT's limits and use (default: your project; another one needs the admin role)."""
    q = client_of(ctx).get_quotas(project)
    if output == "json":
        print_json(q)
        return
    console = make_console()
    console.print(_quota_table(q))
    if q.get("queued"):
        console.print(f"{q['queued']} job(s) wait in QUEUED for room under these limits")


def _limit(ctx: click.Context, param: click.Parameter, value: str | None) -> Any:
    if value is None:
        return ...  # not given: left as it is
    if value.lower() == "default":
        return None  # drops the override
    try:
        n = int(value)
    except ValueError as e:
        raise click.BadParameter(f"{value!r} is not a whole number or `default`") from e
    if n < 0:
        raise click.BadParameter("a limit is 0 or more")
    return n


@quotas.command("set")
@click.argument("project")
@click.option("--jobs", callback=_limit, metavar="N|default", help="Concurrent jobs.")
@click.option("--servers", callback=_limit, metavar="N|default", help="Servers at once.")
@click.option("--gpus", callback=_limit, metavar="N|default", help="GPUs at once.")
@output_option
@click.pass_context
def quotas_set(
    ctx: click.Context, project: str, jobs: Any, servers: Any, gpus: Any, output: str
) -> None:
    """Admin: override PROJECT's limits (`default` drops an override)."""
    limits = {k: v for k, v in (("jobs", jobs), ("servers", servers), ("gpus", gpus)) if v != ...}
    if not limits:
        raise click.UsageError("nothing to set: give --jobs, --servers or --gpus")
    q = client_of(ctx).set_quotas(project, limits)
    if output == "json":
        print_json(q)
        return
    make_console().print(_quota_table(q))


@quotas.command("reset")
@click.argument("project")
@click.pass_context
def quotas_reset(ctx: click.Context, project: str) -> None:
    """Admin: PROJECT back to the configured defaults."""
    client_of(ctx).reset_quotas(project)
    make_console().print(f"quotas of {clean_tree(project)} reset to the defaults")


@click.command("usage")
@click.option("--since", metavar="TIME", help="ISO 8601 (default: 30 days before --until).")
@click.option("--until", metavar="TIME", help="ISO 8601 (default: now).")
@click.option("--project", metavar="ID", help="Admin: another project.")
@click.option("--all-projects", is_flag=True, help="Admin: every project.")
@output_option
@click.pass_context
def usage(
    ctx: click.Context,
    since: str | None,
    until: str | None,
    project: str | None,
    all_projects: bool,
    output: str,
) -> None:
    """VM-seconds, GPU-hours and cost of your jobs and endpoints in a window."""
    if project and all_projects:
        raise click.UsageError("give --project or --all-projects, not both")
    body = client_of(ctx).usage(
        since=since, until=until, project=project, all_projects=all_projects
    )
    if output == "json":
        print_json(body)
        return
    body = clean_tree(body)
    table = Table(box=None, header_style="bold", show_footer=True)
    totals = body.get("totals") or {}
    table.add_column("KIND", footer="total")
    table.add_column("ID", no_wrap=True)
    table.add_column("NAME")
    table.add_column("PROJECT", no_wrap=True)
    table.add_column("STATE")
    table.add_column("VM-SECONDS", justify="right", footer=num(totals.get("vm_seconds")))
    table.add_column("GPU-HOURS", justify="right", footer=num(totals.get("gpu_hours")))
    table.add_column("COST", justify="right", footer=num(totals.get("cost")))
    for kind in ("jobs", "endpoints"):
        for r in body.get(kind) or []:
            table.add_row(
                kind[:-1],
                str(r.get("id", "")),
                str(r.get("name", "")),
                str(r.get("project_id", "")),
                str(r.get("state") or ""),
                num(r.get("vm_seconds")),
                num(r.get("gpu_hours")),
                num(r.get("cost")),
            )
    console = make_console()
    console.print(f"usage from {body.get('since')} to {body.get('until')}")
    console.print(table)


@click.group()
def flavors() -> None:
    """What the compute backend offers: sizes, GPUs and prices."""


@flavors.command("list")
@click.option("--gpus", type=click.IntRange(0), help="Only flavors with this many GPUs.")
@click.option("--gpu-type", metavar="TYPE", help="Only this GPU type (e.g. a100).")
@output_option
@click.pass_context
def flavors_list(ctx: click.Context, gpus: int | None, gpu_type: str | None, output: str) -> None:
    """The flavors jobs (--flavor) and endpoints may ask for, cheapest first."""
    items = client_of(ctx).list_flavors(gpus=gpus, gpu_type=gpu_type)
    if output == "json":
        print_json({"flavors": items})
        return
    console = make_console()
    if not items:
        console.print("no flavors")
        return
    table = Table(box=None, header_style="bold")
    for col in ("NAME", "VCPUS", "RAM MB", "DISK GB", "GPUS", "GPU TYPE", "PRICE/HOUR"):
        table.add_column(col, justify="left" if col in ("NAME", "GPU TYPE") else "right")
    for f in clean_tree(items):
        table.add_row(
            str(f.get("name", "")),
            str(f.get("vcpus", "")),
            str(f.get("ram_mb", "")),
            str(f.get("disk_gb", "")),
            str(f.get("gpus", "")),
            str(f.get("gpu_type") or "-"),
            num(f.get("price_per_hour")),
        )
    console.print(table)
