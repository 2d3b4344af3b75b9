"""`stackml models deploy|endpoints|scale|undeploy`: a model's online-prediction endpoint
(joins the `models` group, see service/cli/models.py). Tables print API text through
clean_tree (terminal escapes stripped); `-o json` prints the API's JSON."""

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
    state_text,
)
from service.client import Json


def _traffic(raw: str | None) -> dict[str, int] | None:
    """--traffic 3=90,4=10 (or a JSON object)."""
    if raw is None:
        return None
    raw = raw.strip()
    try:
        if raw.startswith("{"):
            value = json.loads(raw)
            if not isinstance(value, dict):
                raise ValueError("not an object")
            return {str(k): int(v) for k, v in value.items()}
        out: dict[str, int] = {}
        for part in raw.split(","):
            version, sep, pct = part.partition("=")
            if not sep:
                raise ValueError(f"{part!r} is not VERSION=PERCENT")
            out[str(int(version))] = int(pct)
        return out
    except (ValueError, TypeError) as e:
        raise click.BadParameter(
            f"{e}; write VERSION=PERCENT,... e.g. 3=90,4=10", param_hint="--traffic"
        ) from e


def _show(ep: Json) -> None:
    e = clean_tree(ep)
    console = make_console()
    target = f"label {e['label']}" if e.get("label") else f"version {e.get('version')}"
    console.print(
        Text.assemble(
            (f"{e.get('id', '')}  ", "bold"),
            state_text(str(e.get("state", ""))),
            f"  {e.get('model', '')}: {target} (now {e.get('target_version')}), serving "
            f"{e.get('serving_version')}, {e.get('replicas')} x {e.get('flavor', '')}",
        )
    )
    if e.get("traffic"):
        console.print(
            "traffic: " + ", ".join(f"v{k} {v}%" for k, v in sorted(e["traffic"].items()))
        )
    if e.get("failure_message"):
        console.print(Text(f"failure: {e['failure_message']}", style="red"))
    servers = e.get("servers") or []
    if not servers:
        return
    table = Table(box=None, header_style="bold")
    for col in ("REPLICA", "VERSION", "STATE", "ADDRESS", "READY", "HEALTH FAILURES"):
        table.add_column(col, no_wrap=True)
    for s in servers:
        table.add_row(
            str(s.get("name", "")),
            str(s.get("version", "")),
            state_text(str(s.get("replica_state", ""))),
            str(s.get("address") or "-"),
            short_time(s.get("ready_at")),
            str(s.get("health_failures", 0)),
        )
    console.print(table)


def _live(client: Any, name: str, endpoint_id: str | None) -> str:
    if endpoint_id:
        return endpoint_id
    live = client.list_endpoints(name)
    if not live:
        raise click.ClickException(f"model {name} has no endpoint")
    return str(live[0]["id"])


@click.command("deploy")
@click.argument("name")
@click.option("--label", help="Follow this label (default: `default`).")
@click.option("--version", type=click.IntRange(1), help="Pin this version.")
@click.option("--replicas", type=click.IntRange(1), default=1, show_default=True)
@click.option("--flavor", help="Server flavor of each replica (default: the platform's).")
@click.option("--traffic", help="Split between versions: VERSION=PERCENT,... summing to 100.")
@click.option("--log-sample-rate", type=click.FloatRange(0, 1), help="Requests logged (0..1).")
@output_option
@click.pass_context
def deploy(
    ctx: click.Context,
    name: str,
    label: str | None,
    version: int | None,
    replicas: int,
    flavor: str | None,
    traffic: str | None,
    log_sample_rate: float | None,
    output: str,
) -> None:
    """Deploy model NAME on replicas: an endpoint that follows a label or pins a version."""
    if label and version:
        raise click.UsageError("give --label or --version, not both")
    ep = client_of(ctx).deploy(
        name,
        label=label,
        version=version,
        replicas=replicas,
        flavor=flavor,
        traffic=_traffic(traffic),
        log_sample_rate=log_sample_rate,
    )
    if output == "json":
        print_json(ep)
        return
    _show(ep)


@click.command("endpoints")
@click.argument("name")
@click.argument("endpoint_id", required=False)
@output_option
@click.pass_context
def endpoints(ctx: click.Context, name: str, endpoint_id: str | None, output: str) -> None:
    """Model NAME's endpoint(s) with their replicas (or one endpoint by id)."""
    client = client_of(ctx)
    rows = [client.get_endpoint(name, endpoint_id)] if endpoint_id else client.list_endpoints(name)
    if output == "json":
        print_json({"endpoints": rows})
        return
    if not rows:
        make_console().print(f"model {name} has no endpoint")
    for ep in rows:
        _show(ep)


@click.command("scale")
@click.argument("name")
@click.argument("replicas", type=click.IntRange(1))
@click.option("--endpoint", "endpoint_id", help="The endpoint id (default: the model's).")
@output_option
@click.pass_context
def scale(
    ctx: click.Context, name: str, replicas: int, endpoint_id: str | None, output: str
) -> None:
    """Scale model NAME's endpoint to REPLICAS."""
    client = client_of(ctx)
    ep = client.scale(name, _live(client, name, endpoint_id), replicas)
    if output == "json":
        print_json(ep)
        return
    _show(ep)


@click.command("undeploy")
@click.argument("name")
@click.option("--endpoint", "endpoint_id", help="The endpoint id (default: the model's).")
@output_option
@click.pass_context
def undeploy(ctx: click.Context, name: str, endpoint_id: str | None, output: str) -> None:
    """Drain and delete every replica of model NAME's endpoint."""
    client = client_of(ctx)
    ep = client.undeploy(name, _live(client, name, endpoint_id))
    if output == "json":
        print_json(ep)
        return
    _show(ep)


COMMANDS = (deploy, endpoints, scale, undeploy)
__all__ = ["COMMANDS", "deploy", "endpoints", "scale", "undeploy"]
