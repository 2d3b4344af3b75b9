"""`stackml models predict NAME [--version V | --label L] --json-instances FILE|-`: TF Serving's
predict through the API's proxy (joins the `models` group, see service/cli/models.py).

The file holds either a JSON list of instances (rows), one JSON instance per line (JSON
Lines, as `gcloud ai-platform predict --json-instances` reads them), or a whole request
object ({"instances": ...} or {"inputs": ...}). The answer is printed as JSON; the version that
answered and the request id go to stderr."""

from __future__ import annotations

import json
from typing import IO, Any

import click

from service.cli.common import client_of, print_json

MAX_INSTANCES_BYTES = 64 * 1024 * 1024


def read_instances(fh: IO[str]) -> dict[str, Any]:
    """The request body from a JSON list, JSON Lines, or a request object."""
    text = fh.read(MAX_INSTANCES_BYTES + 1)
    if len(text) > MAX_INSTANCES_BYTES:
        raise click.BadParameter(
            f"more than {MAX_INSTANCES_BYTES} bytes of instances", param_hint="--json-instances"
        )
    stripped = text.strip()
    if not stripped:
        raise click.BadParameter("no instances", param_hint="--json-instances")
    try:
        whole = json.loads(stripped)
    except ValueError:
        whole = None
    if isinstance(whole, dict):
        if "instances" in whole or "inputs" in whole or "examples" in whole:
            return whole
        return {"instances": [whole]}
    if isinstance(whole, list):
        return {"instances": whole}
    rows: list[Any] = []
    for n, line in enumerate(stripped.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except ValueError as e:
            raise click.BadParameter(
                f"line {n} is not JSON: {e}", param_hint="--json-instances"
            ) from e
    return {"instances": rows}


@click.command("predict")
@click.argument("name")
@click.option("--version", type=click.IntRange(1), default=None, help="Ask this version.")
@click.option("--label", default=None, help="Ask the version this label points at.")
@click.option(
    "--method",
    type=click.Choice(["predict", "classify", "regress"]),
    default="predict",
    show_default=True,
    help="TF Serving's method.",
)
@click.option(
    "--json-instances",
    "instances",
    type=click.File("r"),
    required=True,
    help="Instances: a JSON list, JSON Lines, or a request object; - reads stdin.",
)
@click.pass_context
def predict(
    ctx: click.Context,
    name: str,
    version: int | None,
    label: str | None,
    method: str,
    instances: IO[str],
) -> None:
    """Predict with model NAME's endpoint (its serving version unless --version or --label)."""
    if version is not None and label is not None:
        raise click.UsageError("give --version or --label, not both")
    body = read_instances(instances)
    answer, meta = client_of(ctx).predict(name, body, version=version, label=label, method=method)
    print_json(answer)
    click.echo(f"version {meta['version']} (request {meta['request_id']})", err=True)


__all__ = ["predict", "read_instances"]
