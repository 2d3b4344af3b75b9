"""`stackml models feedback` (labels for a model's predictions, from a JSONL file or stdin)
and `stackml datasets create|list|describe` (training datasets built from logged predictions
joined with feedback). User-controlled text is printed through clean_tree; `-o json` prints
the API's JSON exactly."""

from __future__ import annotations

import json
from typing import Any

import click
from rich.table import Table
from rich.text import Text

from service.cli.common import (
    clean,
    clean_tree,
    client_of,
    make_console,
    output_option,
    print_json,
    short_time,
    state_text,
)

MAX_FEEDBACK_LINES = 1_000_000


def _read_feedback(path: str) -> list[dict[str, Any]]:
    """The items of a JSONL file ({"request_id", "label", "time"?} per line; - is stdin)."""
    items: list[dict[str, Any]] = []
    try:
        with click.open_file(path, "r", encoding="utf-8") as fh:
            for n, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except ValueError as e:
                    raise click.BadParameter(
                        f"{path} line {n} is not JSON: {e}", param_hint="--file"
                    ) from e
                if not isinstance(obj, dict):
                    raise click.BadParameter(
                        f"{path} line {n} must be a JSON object "
                        '({"request_id": ..., "label": ...})',
                        param_hint="--file",
                    )
                items.append(obj)
                if len(items) > MAX_FEEDBACK_LINES:
                    raise click.BadParameter(
                        f"{path} has more than {MAX_FEEDBACK_LINES} lines; split it",
                        param_hint="--file",
                    )
    except OSError as e:
        raise click.BadParameter(
            f"cannot read {path}: {e.strerror or e}", param_hint="--file"
        ) from e
    except UnicodeDecodeError as e:
        raise click.BadParameter(f"{path} is not UTF-8 text", param_hint="--file") from e
    if not items:
        raise click.BadParameter(f"{path} holds no feedback lines", param_hint="--file")
    return items


@click.command("feedback")
@click.argument("name")
@click.option(
    "--file",
    "path",
    default="-",
    show_default=True,
    metavar="FILE",
    help='JSONL, one {"request_id": ..., "label": ..., "time": ...} per line (- reads stdin).',
)
@output_option
@click.pass_context
def feedback(ctx: click.Context, name: str, path: str, output: str) -> None:
    """Send ground-truth labels for predictions of model NAME, by request id (the
    X-Request-Id a prediction answered with). Sent in batches of 1000; sending the same
    label again changes nothing, a different one corrects it."""
    items = _read_feedback(path)
    out = client_of(ctx).post_feedback(name, items)
    if output == "json":
        print_json(out)
        return
    make_console().print(
        f"{out['received']} label(s) for {clean(name)}: {out['created']} new, "
        f"{out['updated']} corrected, {out['unchanged']} unchanged"
    )


@click.group("datasets")
def datasets() -> None:
    """Training datasets built from a model's logged predictions joined with feedback."""


@datasets.command("create")
@click.argument("name")
@click.option("--model", required=True, help="The model whose logged predictions it joins.")
@click.option("--start", default=None, metavar="TIME", help="Window start (ISO 8601).")
@click.option("--end", default=None, metavar="TIME", help="Window end (ISO 8601; default now).")
@click.option(
    "--holdout-fraction",
    type=click.FloatRange(0, 0.9),
    default=None,
    help="Share of requests held out (default 0.2), fixed by a hash of the request id.",
)
@click.option("--format", "fmt", type=click.Choice(["csv", "jsonl"]), default=None)
@click.option("--wait", is_flag=True, help="Wait until the version is READY or FAILED.")
@click.option("--timeout", type=click.FloatRange(1), default=600.0, show_default=True)
@output_option
@click.pass_context
def datasets_create(
    ctx: click.Context,
    name: str,
    model: str,
    start: str | None,
    end: str | None,
    holdout_fraction: float | None,
    fmt: str | None,
    wait: bool,
    timeout: float,
    output: str,
) -> None:
    """Build a new version of dataset NAME from MODEL's labelled predictions."""
    client = client_of(ctx)
    dv = client.create_dataset(
        name, model, start=start, end=end, holdout_fraction=holdout_fraction, format=fmt
    )
    if wait:
        dv = client.wait_dataset(name, int(dv["version"]), timeout=timeout)
    if output == "json":
        print_json(dv)
        return
    _version_detail(clean_tree(dv))
    if dv.get("state") == "FAILED":
        ctx.exit(1)


@datasets.command("list")
@output_option
@click.pass_context
def datasets_list(ctx: click.Context, output: str) -> None:
    """The project's datasets."""
    rows = client_of(ctx).list_datasets()
    if output == "json":
        print_json({"datasets": rows})
        return
    console = make_console()
    if not rows:
        console.print("no datasets")
        return
    table = Table(box=None, header_style="bold")
    for col in ("NAME", "VERSIONS", "LATEST", "STATE", "READY", "CREATED"):
        table.add_column(col, no_wrap=True)
    for d in clean_tree(rows):
        table.add_row(
            d.get("name", ""),
            str(d.get("versions", "")),
            "" if d.get("latest_version") is None else str(d["latest_version"]),
            state_text(str(d.get("latest_state") or "")),
            "" if d.get("latest_ready_version") is None else str(d["latest_ready_version"]),
            short_time(d.get("created_at")),
        )
    console.print(table)


@datasets.command("describe")
@click.argument("name")
@click.option("--version", type=click.IntRange(1), default=None, help="One version in full.")
@output_option
@click.pass_context
def datasets_describe(ctx: click.Context, name: str, version: int | None, output: str) -> None:
    """Dataset NAME and its versions; with --version, one version with its manifest."""
    client = client_of(ctx)
    if version is not None:
        dv = client.get_dataset_version(name, version)
        if output == "json":
            print_json(dv)
            return
        _version_detail(clean_tree(dv))
        return
    ds = client.get_dataset(name)
    if output == "json":
        print_json(ds)
        return
    d = clean_tree(ds)
    console = make_console()
    console.print(Text(f"{d.get('name', '')}  ({d.get('id', '')})", style="bold"))
    console.print(f"created {short_time(d.get('created_at'))} by {d.get('created_by', '')}")
    rows = d.get("version_list") or []
    if not rows:
        console.print("no versions")
        return
    table = Table(box=None, header_style="bold")
    for col in ("VERSION", "STATE", "MODEL", "ROWS", "TRAIN", "HOLDOUT", "COVERAGE", "CREATED"):
        table.add_column(col, no_wrap=True)
    table.add_column("DATA / FAILURE")
    for v in rows:
        m = v.get("manifest") or {}
        cov = m.get("label_coverage")
        table.add_row(
            str(v.get("version", "")),
            state_text(str(v.get("state", ""))),
            v.get("model", ""),
            str(m.get("rows", "")),
            str(m.get("train_rows", "")),
            str(m.get("holdout_rows", "")),
            f"{cov:.0%}" if isinstance(cov, int | float) else "",
            short_time(v.get("created_at")),
            v.get("failure_message") or v.get("data_uri") or "",
        )
    console.print(table)


def _version_detail(v: dict[str, Any]) -> None:
    console = make_console()
    console.print(
        Text.assemble(
            (f"dataset {v.get('dataset', '')} version {v.get('version')}  ", "bold"),
            state_text(str(v.get("state", ""))),
        )
    )
    if v.get("failure_message"):
        console.print(f"failure: {v['failure_message']}")
    w = v.get("window") or {}
    console.print(
        f"model {v.get('model', '')}, window {w.get('start') or 'the beginning'} .. "
        f"{w.get('end')}, holdout {v.get('holdout_fraction')}, format {v.get('format')}"
    )
    m = v.get("manifest") or {}
    if m:
        cov = m.get("label_coverage")
        console.print(
            f"{m.get('rows')} rows: {m.get('train_rows')} train, {m.get('holdout_rows')} "
            f"holdout; {m.get('labelled')}/{m.get('logged')} predictions labelled"
            + (f" ({cov:.0%})" if isinstance(cov, int | float) else "")
        )
        if m.get("versions"):
            console.print(f"model versions seen: {', '.join(map(str, m['versions']))}")
        if m.get("skipped"):
            console.print(
                "skipped: " + ", ".join(f"{k} {n}" for k, n in dict(m["skipped"]).items())
            )
    if v.get("data_uri"):
        console.print(f"data_uri (a job's inputs.data_uri): {v['data_uri']}")
        console.print(f"holdout: {v.get('holdout_uri')}")
    else:
        console.print(f"uri: {v.get('uri', '')}")
