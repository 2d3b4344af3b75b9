"""`stackml models ...`: the model registry (create, list, describe, versions, set-label,
rollback, history; register a version with `versions --register`). Endpoint commands (deploy,
predict) join this group from their own modules. Everything the API returns is user-controlled text:
tables print it through clean_tree (terminal escapes stripped, as the jobs commands do);
`-o json` prints the API's JSON exactly (control characters escaped by json.dumps)."""

from __future__ import annotations

from typing import Any

import click
from rich.table import Table
from rich.text import Text

from service.cli.common import (
    clean,
    clean_tree,
    client_of,
    make_console,
    num,
    output_option,
    print_json,
    short_time,
    state_text,
)
from service.client import APIError, Json

_UNSET: Any = ...


@click.group("models")
def models() -> None:
    """Registered models: versions (from jobs or store URIs), labels, history."""


@models.command("create")
@click.argument("name")
@click.option("--description", default="", help="What the model is.")
@output_option
@click.pass_context
def models_create(ctx: click.Context, name: str, description: str, output: str) -> None:
    """Create model NAME (lower-case letters, digits, _ and -)."""
    model = client_of(ctx).create_model(name, description)
    if output == "json":
        print_json(model)
        return
    make_console().print(f"created model {clean(str(model.get('name', name)))} ({model['id']})")


@models.command("list")
@output_option
@click.pass_context
def models_list(ctx: click.Context, output: str) -> None:
    """The project's models."""
    rows = client_of(ctx).list_models()
    if output == "json":
        print_json({"models": rows})
        return
    console = make_console()
    if not rows:
        console.print("no models")
        return
    table = Table(box=None, header_style="bold")
    for col in ("NAME", "VERSIONS", "LATEST", "LABELS", "CREATED"):
        table.add_column(col, no_wrap=True)
    table.add_column("DESCRIPTION")
    for m in clean_tree(rows):
        table.add_row(
            m.get("name", ""),
            str(m.get("versions", "")),
            "" if m.get("latest_version") is None else str(m["latest_version"]),
            _labels(m.get("labels")),
            short_time(m.get("created_at")),
            m.get("description", ""),
        )
    console.print(table)


@models.command("describe")
@click.argument("name")
@output_option
@click.pass_context
def models_describe(ctx: click.Context, name: str, output: str) -> None:
    """One model: its labels, its endpoint, its versions."""
    client = client_of(ctx)
    model = client.get_model(name)
    versions = client.list_versions(name)
    if output == "json":
        print_json({**model, "version_list": versions})
        return
    m = clean_tree(model)
    console = make_console()
    console.print(Text(f"{m.get('name', '')}  ({m.get('id', '')})", style="bold"))
    if m.get("description"):
        console.print(m["description"])
    console.print(f"created {short_time(m.get('created_at'))} by {m.get('created_by', '')}")
    console.print(f"labels: {_labels(m.get('labels')) or 'none'}")
    ep = m.get("endpoint")
    if ep:
        target = f"label {ep['label']}" if ep.get("label") else f"version {ep.get('version')}"
        console.print(
            Text.assemble(
                f"endpoint {ep.get('id', '')}: ",
                state_text(str(ep.get("state", ""))),
                f", {target}, serving {ep.get('serving_version')}, {ep.get('replicas')} replica(s)",
            )
        )
    else:
        console.print("endpoint: none")
    _versions_table(versions)


@models.command("versions")
@click.argument("name")
@click.option("--register", "from_job", metavar="JOB_ID", help="Register a SUCCEEDED job's model.")
@click.option("--uri", "from_uri", metavar="URI", help="Register a SavedModel at a store URI.")
@click.option("--version", "version", type=click.IntRange(1), help="Show one version in full.")
@output_option
@click.pass_context
def models_versions(
    ctx: click.Context,
    name: str,
    from_job: str | None,
    from_uri: str | None,
    version: int | None,
    output: str,
) -> None:
    """The versions of model NAME; with --register/--uri, add one (checked by a worker:
    CREATING, then READY or FAILED)."""
    client = client_of(ctx)
    if from_job and from_uri:
        raise click.UsageError("give --register JOB_ID or --uri URI, not both")
    if from_job or from_uri:
        created = None
        try:
            v = client.create_version(name, job_id=from_job, artifact_uri=from_uri)
        except APIError as e:
            if e.status != 404 or (e.details or {}).get("model") != name:
                raise
            # no such model yet: make it, as a job's `register_as` would; a job or URI the
            # API refuses leaves nothing behind (the model made for it is removed again)
            created = client.create_model(name)
            try:
                v = client.create_version(name, job_id=from_job, artifact_uri=from_uri)
            except APIError:
                client.delete_model(name)
                raise
        if output == "json":
            print_json(v)
            return
        console = make_console()
        if created is not None:
            console.print(f"created model {clean(name)} ({created.get('id', '')})")
        console.print(
            f"version {v['version']} of {clean(name)} is {v['state']}: "
            f"`stackml models versions {clean(name)} --version {v['version']}` shows it"
        )
        return
    if version is not None:
        one = client.get_version(name, version)
        if output == "json":
            print_json(one)
            return
        _version_detail(clean_tree(one))
        return
    rows = client.list_versions(name)
    if output == "json":
        print_json({"versions": rows})
        return
    _versions_table(rows)


@models.command("set-label")
@click.argument("name")
@click.argument("label")
@click.argument("version", type=click.IntRange(1))
@click.option("--why", default="", help="Why (kept in the history).")
@click.option(
    "--expect",
    "expected",
    default=None,
    metavar="VERSION|none",
    help="Move only if the label points at VERSION now ('none': only if it does not exist).",
)
@output_option
@click.pass_context
def models_set_label(
    ctx: click.Context,
    name: str,
    label: str,
    version: int,
    why: str,
    expected: str | None,
    output: str,
) -> None:
    """Point LABEL of model NAME at VERSION (`default` is what an endpoint serves)."""
    exp: Any = _UNSET
    if expected is not None:
        if expected.lower() == "none":
            exp = None
        elif expected.isdigit() and int(expected) >= 1:
            exp = int(expected)
        else:
            raise click.BadParameter("a version number or 'none'", param_hint="--expect")
    result = client_of(ctx).set_label(name, label, version, why=why, expected_version=exp)
    if output == "json":
        print_json(result)
        return
    r = clean_tree(result)
    if not r.get("moved", True):
        make_console().print(f"{r['label']} already points at version {r['version']}")
        return
    before = "nothing" if r.get("from_version") is None else f"version {r['from_version']}"
    make_console().print(f"{r['label']}: {before} -> version {r['version']}")


@models.command("rollback")
@click.argument("name")
@click.option("--label", default="default", show_default=True, help="The label to move back.")
@click.option("--why", default="", help="Why (kept in the history).")
@output_option
@click.pass_context
def models_rollback(ctx: click.Context, name: str, label: str, why: str, output: str) -> None:
    """Move LABEL of model NAME back to the version it pointed at before its last move."""
    result = client_of(ctx).rollback_label(name, label, why=why)
    if output == "json":
        print_json(result)
        return
    r = clean_tree(result)
    before = "nothing" if r.get("from_version") is None else f"version {r['from_version']}"
    make_console().print(f"{r['label']}: {before} -> version {r['version']} (rolled back)")


@models.command("history")
@click.argument("name")
@click.option("--label", default=None, help="Only this label.")
@click.option("--at", default=None, metavar="TIME", help="Where each label pointed at TIME.")
@output_option
@click.pass_context
def models_history(
    ctx: click.Context, name: str, label: str | None, at: str | None, output: str
) -> None:
    """Every move of the labels of model NAME (who, when, from, to, why)."""
    result = client_of(ctx).model_history(name, label=label, at=at)
    if output == "json":
        print_json(result)
        return
    r = clean_tree(result)
    console = make_console()
    if at is not None:
        labels = r.get("labels") or {}
        if not labels:
            console.print(f"no label existed at {r.get('at')}")
            return
        for k, v in labels.items():
            console.print(f"{k}: {'removed' if v is None else f'version {v}'}")
        return
    rows = r.get("history") or []
    if not rows:
        console.print("no label moves")
        return
    table = Table(box=None, header_style="bold")
    for col in ("AT", "LABEL", "KIND", "FROM", "TO", "BY"):
        table.add_column(col, no_wrap=True)
    table.add_column("WHY")
    for h in rows:
        kind = h.get("kind", "move")
        stays = kind in ("refusal", "evaluated")  # a gate's record: the label did not move
        table.add_row(
            str(h.get("at", "")),
            h.get("label", ""),
            kind,
            "-" if h.get("from_version") is None else str(h["from_version"]),
            "(stays)"
            if stays
            else ("removed" if h.get("to_version") is None else str(h["to_version"])),
            h.get("by", ""),
            h.get("why", ""),
        )
    console.print(table)


# -- formatting --------------------------------------------------------------------------------


@models.command("predict-batch")
@click.argument("name")
@click.option(
    "--input",
    "inputs",
    multiple=True,
    required=True,
    metavar="URI",
    help="An input object or prefix in the project's area (repeatable; rows are numbered "
    "across them in this order).",
)
@click.option("--output", "output_prefix", required=True, metavar="PREFIX", help="A new prefix.")
@click.option("--version", type=click.IntRange(1), help="A READY version (default: --label).")
@click.option("--label", help="A label, resolved now (default: default).")
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["jsonl", "csv", "tfrecord"]),
    help="Default: from the inputs' extensions.",
)
@click.option("--batch-size", type=click.IntRange(1), help="Rows per model call (default 64).")
@click.option("--shard-rows", type=click.IntRange(1), help="Rows per shard (default 10000).")
@click.option(
    "--max-workers",
    type=click.IntRange(1, 64),
    help="Servers to spread the shards over, booted together (default 1).",
)
@click.option("--job-name", help="The job's name (default: NAME-batch).")
@click.option("--flavor", help="A flavor from GET /v1/flavors (default: the platform's).")
@click.option("--wait/--no-wait", default=False, help="Follow the job until it ends.")
@click.option("--timeout", type=click.FloatRange(1), default=3600.0, help="Seconds --wait waits.")
@click.option(
    "-o",
    "output",
    type=click.Choice(["table", "json"]),
    default="table",
    show_default=True,
    help="json prints exactly the API's JSON (-o only: --output is the prefix here).",
)
@click.pass_context
def models_predict_batch(
    ctx: click.Context,
    name: str,
    inputs: tuple[str, ...],
    output_prefix: str,
    version: int | None,
    label: str | None,
    fmt: str | None,
    batch_size: int | None,
    shard_rows: int | None,
    max_workers: int | None,
    job_name: str | None,
    flavor: str | None,
    wait: bool,
    timeout: float,
    output: str,
) -> None:
    """Predict a model's version over input files into PREFIX: a batch_prediction job
    (`stackml jobs describe` shows its results)."""
    from service.cli.user import failure_sentence, watch_job

    if version is not None and label is not None:
        raise click.UsageError("give --version or --label, not both")
    client = client_of(ctx)
    job = client.predict_batch(
        name,
        inputs,
        output_prefix,
        version=version,
        label=label,
        format=fmt,
        batch_size=batch_size,
        shard_rows=shard_rows,
        name=job_name,
        flavor=flavor,
        max_workers=max_workers,
    )
    rec = (job.get("output") or {}).get("prediction") or {}
    if wait:
        job = watch_job(client, job["id"], timeout=timeout, console=make_console(stderr=True))
    if output == "json":
        print_json(job)
    else:
        shown = clean_tree(job)
        make_console().print(
            f"job {shown['id']} ({shown['name']}): {shown['state']}; model "
            f"{clean(name)} v{rec.get('version')} into {clean(output_prefix)}"
        )
        done = ((shown.get("output") or {}).get("prediction") or {}) if wait else {}
        if "rows" in done:
            make_console().print(
                f"{done['rows']} rows, {done.get('errors', 0)} failed, {done.get('shards')} "
                f"shard(s): {done.get('results')}"
            )
        elif wait and shown.get("state") != "SUCCEEDED":
            make_console().print(failure_sentence(job))
    if wait and job.get("state") != "SUCCEEDED":
        raise SystemExit(1)


def _labels(labels: Any) -> str:
    if not isinstance(labels, dict):
        return ""
    return ",".join(f"{k}={v}" for k, v in labels.items())


def live_summary(live: Any) -> str:
    """A version's live metrics in one line: labelled/logged (coverage) and the metric."""
    if not isinstance(live, dict) or not live.get("logged"):
        return ""
    out = f"{live.get('labelled', 0)}/{live.get('logged', 0)} labelled"
    cov = live.get("label_coverage")
    if isinstance(cov, int | float):
        out += f" ({cov:.0%})"
    for k in ("mae", "rmse", "accuracy"):
        if isinstance(live.get(k), int | float):
            out += f" {k}={num(live[k])}"
    dec = live.get("declared")
    if isinstance(dec, dict) and isinstance(dec.get("trained"), int | float):
        out += f" ({dec.get('metric')} trained {num(dec['trained'])})"
    return out


def _versions_table(rows: list[Json]) -> None:
    console = make_console()
    if not rows:
        console.print("no versions")
        return
    table = Table(box=None, header_style="bold")
    for col in ("VERSION", "STATE", "LABELS", "CREATED", "JOB", "LIVE"):
        table.add_column(col, no_wrap=True)
    table.add_column("METRICS / FAILURE")
    for v in clean_tree(rows):
        metrics = v.get("metrics") or {}
        last = v.get("failure_message") or " ".join(f"{k}={num(x)}" for k, x in metrics.items())
        table.add_row(
            str(v.get("version", "")),
            state_text(str(v.get("state", ""))),
            ",".join(v.get("labels") or []),
            short_time(v.get("created_at")),
            v.get("source_job_id") or "",
            live_summary(v.get("live_metrics")),
            last,
        )
    console.print(table)


def _version_detail(v: Json) -> None:
    console = make_console()
    console.print(
        Text.assemble(
            (f"version {v.get('version')}  ", "bold"), state_text(str(v.get("state", "")))
        )
    )
    if v.get("failure_message"):
        console.print(f"failure: {v['failure_message']}")
    console.print(f"artifact: {v.get('artifact_uri', '')}")
    if v.get("source_job_id"):
        console.print(f"job: {v['source_job_id']}")
    console.print(f"labels: {','.join(v.get('labels') or []) or 'none'}")
    for k, x in (v.get("metrics") or {}).items():
        console.print(f"metric {k} = {num(x)}")
    if v.get("live_metrics"):
        console.print(f"live (from feedback): {live_summary(v['live_metrics'])}")
    sig = v.get("signature") or {}
    if sig:
        console.print(f"signature serving_default ({sig.get('method_name', '')})")
        for side in ("inputs", "outputs"):
            for k, t in (sig.get(side) or {}).items():
                shape = t.get("shape")
                dims = "unknown rank" if shape is None else "[" + ", ".join(map(str, shape)) + "]"
                console.print(f"  {side[:-1]} {k}: {t.get('dtype', '')} {dims}")
    files = v.get("checksums") or {}
    if files:
        total = sum(int(c.get("size", 0)) for c in files.values() if isinstance(c, dict))
        console.print(f"{len(files)} file(s), {total} bytes")
    ev = v.get("evaluation")
    if isinstance(ev, dict):
        decision = ev.get("decision") or ev.get("state", "")
        if ev.get("reason"):
            decision = f"{decision} ({ev['reason']})"
        console.print(
            f"evaluation ({ev.get('metric')}, label {ev.get('label')}, job {ev.get('job_id')}): "
            f"{decision}"
        )
        if ev.get("candidate_score") is not None:
            champ = ev.get("champion_version")
            vs = (
                f" vs version {champ}: {num(ev.get('champion_score'))}"
                if champ is not None
                else " (no champion)"
            )
            console.print(
                f"  candidate {num(ev['candidate_score'])}{vs} on {ev.get('holdout_rows')} rows"
            )
        if ev.get("message"):
            console.print(f"  {ev['message']}")


from service.cli.predict import predict as _predict  # noqa: E402 - the proxy's command

models.add_command(_predict)

from service.cli.datasets import feedback as _feedback  # noqa: E402 - labels for predictions

models.add_command(_feedback)

from service.cli.endpoints import COMMANDS as _ENDPOINT_COMMANDS  # noqa: E402 - deploy & co.

for _command in _ENDPOINT_COMMANDS:
    models.add_command(_command)
