"""The registry and endpoint routes the `models` group had no command for: `stackml models
delete`, `delete-version`, `delete-label` and `update-endpoint` (label or version, traffic
split, log sample rate, replicas). They join the `models` group (service/cli/__init__.py)."""

from __future__ import annotations

from typing import Any

import click

from service.cli.common import clean, client_of, make_console, output_option, print_json
from service.cli.endpoints import _live, _show, _traffic


@click.command("delete")
@click.argument("name")
@click.pass_context
def models_delete(ctx: click.Context, name: str) -> None:
    """Delete model NAME: its versions, labels and history (the stored artifacts stay)."""
    client_of(ctx).delete_model(name)
    make_console().print(f"model {clean(name)} deleted")


@click.command("delete-version")
@click.argument("name")
@click.argument("version", type=click.IntRange(1))
@click.pass_context
def models_delete_version(ctx: click.Context, name: str, version: int) -> None:
    """Delete VERSION of model NAME (refused while a label or the endpoint uses it)."""
    client_of(ctx).delete_version(name, version)
    make_console().print(f"version {version} of {clean(name)} deleted")


@click.command("delete-label")
@click.argument("name")
@click.argument("label")
@click.option("--why", default="", help="Why (kept in the history).")
@click.pass_context
def models_delete_label(ctx: click.Context, name: str, label: str, why: str) -> None:
    """Remove LABEL of model NAME (refused while the live endpoint follows it)."""
    out = client_of(ctx).delete_label(name, label, why=why)
    make_console().print(
        f"label {clean(label)} of {clean(name)} removed (it pointed at {out.get('from_version')})"
    )


@click.command("update-endpoint")
@click.argument("name")
@click.option("--endpoint", "endpoint_id", help="Endpoint id (default: the model's live one).")
@click.option("--label", help="Follow this label.")
@click.option("--version", type=click.IntRange(1), help="Pin this version.")
@click.option("--traffic", help="Split between versions: VERSION=PERCENT,... summing to 100.")
@click.option("--no-traffic", is_flag=True, help="Drop the traffic split.")
@click.option("--log-sample-rate", type=click.FloatRange(0, 1), help="Requests logged (0..1).")
@click.option("--replicas", type=click.IntRange(1), help="Replica servers.")
@output_option
@click.pass_context
def models_update_endpoint(
    ctx: click.Context,
    name: str,
    endpoint_id: str | None,
    label: str | None,
    version: int | None,
    traffic: str | None,
    no_traffic: bool,
    log_sample_rate: float | None,
    replicas: int | None,
    output: str,
) -> None:
    """Change model NAME's endpoint: what it serves, its split, sampling or size."""
    if label is not None and version is not None:
        raise click.UsageError("give --label or --version, not both")
    if traffic is not None and no_traffic:
        raise click.UsageError("give --traffic or --no-traffic, not both")
    fields: dict[str, Any] = {
        k: v
        for k, v in (
            ("label", label),
            ("version", version),
            ("traffic", _traffic(traffic)),
            ("log_sample_rate", log_sample_rate),
            ("replicas", replicas),
        )
        if v is not None
    }
    if no_traffic:
        fields["traffic"] = None
    if not fields:
        raise click.UsageError(
            "nothing to change: give --label, --version, --traffic, --no-traffic, "
            "--log-sample-rate or --replicas"
        )
    client = client_of(ctx)
    ep = client.update_endpoint(name, _live(client, name, endpoint_id), **fields)
    if output == "json":
        print_json(ep)
        return
    _show(ep)


COMMANDS = (models_delete, models_delete_version, models_delete_label, models_update_endpoint)
