"""The user's commands: `stackml jobs ...` (submit, list, describe, logs, events, metrics,
cancel, delete) against the REST API, with `service/client.py`."""

from __future__ import annotations

import json
import math
import re
import sys
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click
from rich.console import Console, Group
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from service.cli.common import (
    STATE_STYLE,
    ByteSanitizer,
    clean,
    clean_tree,
    client_of,
    duration,
    err_console,
    make_console,
    num,
    output_option,
    print_json,
    short_time,
    state_text,
)
from service.client import ClientError, Json, StackMLClient, WaitTimeout, describe_error

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
KEY_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")
INT_RE = re.compile(r"[-+]?[0-9]+")
FLOAT_RE = re.compile(r"[-+]?([0-9]+\.[0-9]*|\.[0-9]+|[0-9]+(\.[0-9]*)?[eE][-+]?[0-9]+)")
DEFAULT_WAIT = 24 * 3600.0

# -- jobs ------------------------------------------------------------------------------------


@click.group()
def jobs() -> None:
    """Submit and inspect training jobs."""


def _pairs(what: str, pattern: re.Pattern[str] | None = None) -> Callable[..., dict[str, str]]:
    def convert(
        ctx: click.Context, param: click.Parameter, values: tuple[str, ...]
    ) -> dict[str, str]:
        out: dict[str, str] = {}
        for item in values:
            key, sep, value = item.partition("=")
            if not sep or not key:
                raise click.BadParameter(f"{item!r} is not {what}=VALUE", ctx, param)
            if pattern is not None and not pattern.match(key):
                raise click.BadParameter(f"{key!r} is not a valid {what}", ctx, param)
            out[key] = value
        return out

    return convert


def _hp_value(text: str) -> str | int | float | bool:
    """Hyperparameters keep their JSON type: 3 is an int, 0.1 a float, true a bool."""
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    if INT_RE.fullmatch(text):
        return int(text)
    if FLOAT_RE.fullmatch(text) and math.isfinite(float(text)):
        return float(text)
    return text


def _runtime_spec(text: str) -> dict[str, str]:
    """`tensorflow-2.21`, `tensorflow:2.21`, `tensorflow==2.21` or a bare `2.21`."""
    m = re.fullmatch(r"(?:([A-Za-z][A-Za-z0-9_]*)(?:-|:|==|@))?([0-9]+(?:\.[0-9]+){0,2})", text)
    if not m:
        raise click.BadParameter(
            f"{text!r} is not a runtime; use FRAMEWORK-VERSION (e.g. tensorflow-2.21)"
        )
    spec = {"version": m.group(2)}
    if m.group(1):
        spec["framework"] = m.group(1)
    return spec


def _default_name(package: str, module: str) -> str:
    base = Path(package).name if "://" not in package else module.split(".")[0]
    base = re.sub(r"[^A-Za-z0-9._-]+", "-", base).strip("-._") or "job"
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    return f"{base[: 62 - len(stamp)]}-{stamp}"


@jobs.command("submit", context_settings={"ignore_unknown_options": False})
@click.option(
    "--spec",
    "spec_path",
    metavar="FILE",
    help="Submit this job spec (JSON, '-' for stdin) as it is: a training or a "
    "batch_prediction job. The other spec options do not combine with it.",
)
@click.option(
    "--package-path",
    metavar="DIR",
    help="The trainer: a directory (tarred and uploaded), a .tar.gz, or a local:// / swift:// URI.",
)
@click.option("--module", help="Run as `python -m MODULE ARGS...`.")
@click.option("--name", help="Job name (default: the package's name and the time).")
@click.option("--flavor", help="A flavor from GET /v1/flavors (default: the platform's).")
@click.option(
    "--runtime",
    "runtime_",
    metavar="RUNTIME",
    help="e.g. tensorflow-2.21 (default: the platform's).",
)
@click.option(
    "--max-runtime", type=click.IntRange(1), metavar="SECONDS", help="Fail the job after this."
)
@click.option(
    "--workers",
    type=click.IntRange(1, 64),
    metavar="N",
    help="Replicas of the trainer, one server each (TF_CONFIG's chief and N-1 workers).",
)
@click.option(
    "--parameter-servers",
    type=click.IntRange(1, 16),
    metavar="P",
    help="Parameter servers for ParameterServerStrategy, one server each (needs --workers 2 "
    "or more: the chief coordinates, the workers compute).",
)
@click.option(
    "--evaluator",
    is_flag=True,
    default=False,
    help="One more server running the trainer as TF_CONFIG's side-car evaluator: it gets the "
    "chief's checkpoints as they are synced (`--replica evaluator` for its log and metrics).",
)
@click.option(
    "--restart-policy",
    type=click.Choice(["Never", "OnFailure", "ExitCode"]),
    help="Restart the trainer on a new server, its checkpoints restored: OnFailure (any "
    "failure), ExitCode (exit status 42 or 128-255, or a lost server). Default: Never.",
)
@click.option(
    "--max-restarts",
    type=click.IntRange(0, 20),
    metavar="N",
    help="Restarts allowed before the job fails (default 3).",
)
@click.option(
    "--tuning",
    "tuning_path",
    metavar="FILE",
    help="Tune hyperparameters: a JSON file holding the spec's `tuning` section (metric, "
    "goal, parameters, max_trials, ...); each trial is a job of its own.",
)
@click.option(
    "--label",
    "labels",
    multiple=True,
    metavar="K=V",
    callback=_pairs("label key", NAME_RE),
    help="A label to find the job by (repeatable).",
)
@click.option(
    "--env",
    "env",
    multiple=True,
    metavar="K=V",
    callback=_pairs("variable", KEY_RE),
    help="An environment variable of the trainer (repeatable).",
)
@click.option(
    "--hp",
    "hyperparameters",
    multiple=True,
    metavar="K=V",
    callback=_pairs("hyperparameter", KEY_RE),
    help="Passed to the trainer as --K=V.",
)
@click.option(
    "--data-uri", help="Input data for STACKML_INPUT_DIR, e.g. local://projects/local/data/x/."
)
@click.option("--model-uri", help="Where the model goes (default: the project's models area).")
@click.option("--wait/--no-wait", default=False, help="Follow the job until it ends.")
@click.option(
    "--timeout", type=click.FloatRange(1), default=DEFAULT_WAIT, help="Seconds --wait waits."
)
@output_option
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
@click.pass_context
def jobs_submit(
    ctx: click.Context,
    spec_path: str | None,
    package_path: str | None,
    module: str | None,
    name: str | None,
    flavor: str | None,
    runtime_: str | None,
    max_runtime: int | None,
    workers: int | None,
    parameter_servers: int | None,
    evaluator: bool,
    restart_policy: str | None,
    max_restarts: int | None,
    tuning_path: str | None,
    labels: dict[str, str],
    env: dict[str, str],
    hyperparameters: dict[str, str],
    data_uri: str | None,
    model_uri: str | None,
    wait: bool,
    timeout: float,
    output: str,
    args: tuple[str, ...],
) -> None:
    """Stage a trainer package and submit a training job; ARGS follow `--`. Or submit a spec
    file as it is (--spec), e.g. a batch_prediction job."""
    if spec_path is not None:
        given = [
            opt
            for opt, value in (
                ("--package-path", package_path),
                ("--module", module),
                ("--name", name),
                ("--flavor", flavor),
                ("--runtime", runtime_),
                ("--max-runtime", max_runtime),
                ("--workers", workers),
                ("--parameter-servers", parameter_servers),
                ("--evaluator", evaluator),
                ("--restart-policy", restart_policy),
                ("--max-restarts", max_restarts is not None),
                ("--tuning", tuning_path),
                ("--label", labels),
                ("--env", env),
                ("--hp", hyperparameters),
                ("--data-uri", data_uri),
                ("--model-uri", model_uri),
                ("ARGS", args),
            )
            if value
        ]
        if given:
            raise click.UsageError(f"--spec holds the whole spec; leave out {', '.join(given)}")
        _submit(ctx, read_spec(spec_path), wait, timeout, output)
        return
    if not package_path or not module:
        raise click.UsageError("give --package-path and --module (or a whole spec with --spec)")
    spec: dict[str, Any] = {
        "name": name or _default_name(package_path, module),
        "trainer": {"module": module, "args": list(args)},
    }
    if runtime_:
        spec["runtime"] = _runtime_spec(runtime_)
    if flavor:
        spec["resources"] = {"flavor": flavor}
    if workers:
        spec["resources"] = {**spec.get("resources", {}), "workers": workers}
    if parameter_servers:
        spec["resources"] = {**spec.get("resources", {}), "parameter_servers": parameter_servers}
    if evaluator:
        spec["resources"] = {**spec.get("resources", {}), "evaluator": True}
    if data_uri:
        spec["inputs"] = {"data_uri": data_uri}
    if model_uri:
        spec["output"] = {"model_uri": model_uri}
    if hyperparameters:
        spec["hyperparameters"] = {k: _hp_value(v) for k, v in hyperparameters.items()}
    if env:
        spec["env"] = env
    if labels:
        spec["labels"] = labels
    if max_runtime:
        spec["max_runtime_seconds"] = max_runtime
    if restart_policy:
        spec["restart_policy"] = restart_policy
    if max_restarts is not None:
        spec["max_restarts"] = max_restarts
    if tuning_path:
        spec["tuning"] = read_spec(tuning_path, "--tuning", "the tuning section")

    client = client_of(ctx)
    err = err_console()
    if "://" in package_path:
        spec["trainer"]["package_uri"] = package_path
    else:
        path = Path(package_path)
        if path.is_dir():
            staged = client.stage_package(path)
        elif path.is_file():
            staged = client.upload_package(path)
        else:
            raise click.BadParameter(f"{path} does not exist", param_hint="--package-path")
        spec["trainer"]["package_uri"] = staged["package_uri"]
        err.print(
            f"staged {path} as {staged['package_uri']} ({staged.get('size', '?')} bytes)",
        )
    _submit(ctx, spec, wait, timeout, output)


def read_spec(path: str, option: str = "--spec", what: str = "a job spec") -> dict[str, Any]:
    """A job spec (or `what`) from a JSON file ('-': stdin)."""
    try:
        with click.open_file(path, "r", encoding="utf-8") as fh:
            text = fh.read()
    except OSError as e:
        raise click.BadParameter(f"cannot read {path}: {e.strerror or e}", param_hint=option) from e
    try:
        obj = json.loads(text)
    except ValueError as e:
        raise click.BadParameter(f"{path} is not JSON: {e}", param_hint=option) from e
    if not isinstance(obj, dict):
        raise click.BadParameter(f"{path} must hold a JSON object ({what})", param_hint=option)
    return obj


def _submit(
    ctx: click.Context, spec: dict[str, Any], wait: bool, timeout: float, output: str
) -> None:
    """Submit `spec`; print the job, or follow it until it ends (--wait: exit 1 unless it
    SUCCEEDED)."""
    client = client_of(ctx)
    err = err_console()
    job = client.create_job(spec)
    if not wait:
        if output == "json":
            print_json(job)
        else:
            shown = clean_tree(job)
            make_console().print(f"submitted job {shown['id']} ({shown['name']}): {shown['state']}")
        return
    err.print(f"submitted job {clean(job['id'])} ({clean(job['name'])})")
    final = watch_job(client, job["id"], timeout=timeout, console=err)
    if output == "json":
        print_json(final)
    if final.get("state") != "SUCCEEDED":
        sys.exit(1)


def failure_sentence(job: Json) -> str:
    """One line saying how a job ended (safe to print: control sequences are removed)."""
    job = clean_tree(job)
    f = job.get("failure") or {}
    if job.get("state") == "FAILED":
        return (
            f"job {job.get('id')} FAILED in phase {f.get('phase') or '?'} "
            f"({f.get('reason') or 'unknown'}): {f.get('message') or 'no message'}"
        )
    return f"job {job.get('id')} ended {job.get('state')}"


class _Progress:
    """The live status line: the job's state and how long it has been in it."""

    def __init__(self, job_id: str) -> None:
        self.job_id = job_id
        self.state = "QUEUED"
        self.since = time.monotonic()

    def move(self, state: str) -> None:
        self.state = state
        self.since = time.monotonic()

    def __rich__(self) -> Text:
        text = Text(f"{self.job_id} ")
        text.append(self.state, style=STATE_STYLE.get(self.state, ""))
        text.append(f" for {time.monotonic() - self.since:.0f}s", style="dim")
        return text


def watch_job(client: StackMLClient, job_id: str, *, timeout: float, console: Console) -> Json:
    """Print state transitions and the streamed log until the job ends; returns the job."""
    started = time.monotonic()
    stop_logs = threading.Event()
    log_client = client.clone()  # a requests.Session per thread
    progress = _Progress(job_id)

    def on_event(ev: Json) -> None:
        ev = clean_tree(ev)
        console.print(_event_line(ev, time.monotonic() - started))
        dst = ev.get("to") or ev.get("to_state")
        if dst:
            progress.move(str(dst))

    def pump_logs() -> None:
        sanitizer = ByteSanitizer()  # the trainer's bytes: no escape sequence reaches the tty
        pending = ""
        try:
            for chunk in log_client.follow_logs(job_id):
                pending += sanitizer.feed(chunk)
                *lines, pending = pending.split("\n")
                for line in lines:
                    console.print(_log_line(line))
                if stop_logs.is_set():
                    return
            pending += sanitizer.flush()
            if pending:
                console.print(_log_line(pending))
        except ClientError as e:
            console.print(Text(f"log stream stopped: {describe_error(e)}", style="yellow"))
        finally:
            log_client.close()

    logs = threading.Thread(target=pump_logs, name="stackml-logs", daemon=True)
    logs.start()
    try:
        with console.status(progress, spinner="dots"):
            job = client.wait(job_id, timeout, on_event=on_event)
            logs.join(timeout=30)
    except WaitTimeout:
        stop_logs.set()
        console.print(
            Text(
                f"job {job_id} did not finish within {timeout:.0f}s; it keeps running",
                style="yellow",
            )
        )
        raise
    except KeyboardInterrupt:
        stop_logs.set()
        console.print(
            f"stopped watching; job {job_id} keeps running "
            f"(`stackml jobs cancel {job_id}` stops it)",
        )
        raise
    elapsed = time.monotonic() - started
    if job.get("state") == "SUCCEEDED":
        model = (job.get("output") or {}).get("model_uri")
        line = Text(f"job {job_id} SUCCEEDED", style="bold green")
        line.append(f" in {elapsed:.1f}s" + (f"; model: {model}" if model else ""))
        console.print(line)
    else:
        console.print(Text(failure_sentence(job), style="bold red"))
    return job


def _event_line(ev: Json, elapsed: float) -> Text:
    text = Text()
    text.append(f"[{elapsed:6.1f}s] ", style="dim")
    src, dst = ev.get("from_state") or ev.get("from"), ev.get("to_state") or ev.get("to")
    if dst:
        if src:
            text.append(str(src), style=STATE_STYLE.get(str(src), ""))
            text.append(" -> ")
        text.append(str(dst), style=STATE_STYLE.get(str(dst), ""))
    else:
        text.append(str(ev.get("kind") or "event"), style="cyan")
    if ev.get("message"):
        text.append(f"  {ev['message']}")
    return text


def _log_line(line: str) -> Text:
    metric = _metric_summary(line)
    if metric is not None:
        return Text("  | " + metric, style="green")
    return Text("  | " + line, style="dim")


def _metric_summary(line: str) -> str | None:
    text = line.strip()
    if not text.startswith("{") or "stackml_metric" not in text:
        return None
    try:
        obj = json.loads(text)
    except ValueError:
        return None
    if not isinstance(obj, dict) or obj.get("stackml_metric") != 1:
        return None
    where = " ".join(f"{k} {obj[k]}" for k in ("epoch", "step") if k in obj)
    values = " ".join(
        f"{k}={v:.4g}"
        for k, v in obj.items()
        if k not in ("stackml_metric", "epoch", "step")
        and isinstance(v, int | float)
        and not isinstance(v, bool)
    )
    return f"metrics {where}: {values}" if where else f"metrics: {values}"


@jobs.command("list")
@click.option("--state", "states", multiple=True, help="Only jobs in this state (repeatable).")
@click.option("--label", "labels", multiple=True, metavar="K=V", callback=_pairs("label key"))
@click.option("--limit", type=click.IntRange(1, 200), help="Page size.")
@click.option("--all", "all_pages", is_flag=True, help="Follow `next` through every page.")
@output_option
@click.pass_context
def jobs_list(
    ctx: click.Context,
    states: tuple[str, ...],
    labels: dict[str, str],
    limit: int | None,
    all_pages: bool,
    output: str,
) -> None:
    """List jobs, newest first."""
    client = client_of(ctx)
    state_arg = [s.upper() for s in states] or None
    if all_pages:
        rows = list(client.iter_jobs(state=state_arg, labels=labels, limit=limit))
        page: Json = {"jobs": rows, "next": None}
    else:
        page = client.list_jobs(state=state_arg, labels=labels, limit=limit)
    if output == "json":
        print_json(page)
        return
    page = clean_tree(page)
    table = Table(box=None, header_style="bold")
    for col in ("ID", "NAME", "STATE", "CREATED", "DURATION"):
        table.add_column(col, no_wrap=True)  # ids and times are never cut
    table.add_column("LABELS")
    for job in page.get("jobs") or []:
        table.add_row(
            job.get("id", ""),
            job.get("name", ""),
            state_text(job.get("state", "")),
            short_time(job.get("created_at")),
            duration(job),
            ",".join(f"{k}={v}" for k, v in ((job.get("spec") or {}).get("labels") or {}).items()),
        )
    console = make_console()
    if not page.get("jobs"):
        console.print("no jobs")
        return
    console.print(table)
    if page.get("next"):
        console.print(Text(f"more: --all, or the API's marker {page['next']}", style="dim"))


@jobs.command("describe")
@click.argument("job_id")
@output_option
@click.pass_context
def jobs_describe(ctx: click.Context, job_id: str, output: str) -> None:
    """A job: its spec, state, failure, servers, timeline and latest metrics."""
    client = client_of(ctx)
    job = client.get_job(job_id)
    if output == "json":
        print_json(job)
        return
    events = client.events(job_id).get("events") or []
    make_console().print(_describe(clean_tree(job), clean_tree(events)))


def _describe(job: Json, events: list[Json]) -> Group:
    spec = job.get("spec") or {}
    trainer = spec.get("trainer") or {}
    rt = spec.get("runtime") or {}
    res = spec.get("resources") or {}
    head = Table.grid(padding=(0, 2))
    head.add_column(style="bold")
    head.add_column()
    head.add_row("id", job.get("id", ""))
    head.add_row("name", job.get("name", ""))
    head.add_row("state", state_text(job.get("state", "")))
    if job.get("failure"):
        f = job["failure"]
        head.add_row(
            "failure",
            Text(f"{f.get('phase')} / {f.get('reason')}: {f.get('message')}", style="red"),
        )
    head.add_row("project", str(job.get("project_id", "")))
    head.add_row("type", str(job.get("type", "")))
    head.add_row("created", short_time(job.get("created_at")))
    head.add_row("started", short_time(job.get("started_at")))
    head.add_row("finished", short_time(job.get("finished_at")))
    head.add_row("duration", duration(job))
    if job.get("queue_reason") and job.get("state") == "QUEUED":
        head.add_row("waiting", str(job["queue_reason"]))
    usage = job.get("usage")
    if usage:
        head.add_row(
            "usage",
            f"{usage['vm_seconds']:.0f} VM-seconds, {usage['gpu_hours']:.3f} GPU-hours, "
            f"cost {usage['cost']:.4f}",
        )
    if job.get("type") == "batch_prediction":
        _batch_rows(head, spec.get("prediction") or {}, job.get("output") or {})
    else:
        head.add_row(
            "trainer",
            f"python -m {trainer.get('module', '')} " + " ".join(trainer.get("args") or []),
        )
        head.add_row("package", str(trainer.get("package_uri", "")))
        if job.get("parent_id"):
            head.add_row("trial", f"{job.get('trial')} of tuning job {job['parent_id']}")
        policy = spec.get("restart_policy") or "Never"
        if policy != "Never":
            head.add_row(
                "restarts",
                f"{job.get('restarts', 0)} of {spec.get('max_restarts', 0)} ({policy})",
            )
    if rt:
        head.add_row("runtime", f"{rt.get('framework', '')}-{rt.get('version', '')}")
    if res:
        head.add_row(
            "resources",
            ", ".join(f"{k}={v}" for k, v in res.items() if v not in (None, 0)),
        )
    for key, title in (("hyperparameters", "hyperparams"), ("labels", "labels")):
        if spec.get(key):
            head.add_row(title, ", ".join(f"{k}={v}" for k, v in spec[key].items()))
    if spec.get("env"):
        head.add_row("env", ", ".join(sorted(spec["env"])))
    if (spec.get("inputs") or {}).get("data_uri"):
        head.add_row("data", spec["inputs"]["data_uri"])
    for key, value in (job.get("output") or {}).items():
        if value and key != "prediction":
            if isinstance(value, dict):  # a tuning job's best hyperparameters
                value = ", ".join(f"{k}={v}" for k, v in sorted(value.items()))
            head.add_row(f"output.{key}", str(value))
    parts: list[Any] = [Panel(head, title=f"job {job.get('id', '')}", expand=False)]

    servers = Table(title="servers", box=None, header_style="bold", title_justify="left")
    for col in ("NAME", "ROLE", "FLAVOR", "BACKEND", "STATE", "CREATED", "DELETED"):
        servers.add_column(col, no_wrap=True)
    for r in job.get("resources") or []:
        servers.add_row(
            str(r.get("name", "")),
            str(r.get("role", "")),
            str(r.get("flavor", "")),
            str(r.get("backend", "")),
            str(r.get("state", "")),
            short_time(r.get("created_at")),
            short_time(r.get("deleted_at")),
        )
    if job.get("tuning"):
        parts.append(_trials_table(job["tuning"]))
    else:
        parts.append(servers if job.get("resources") else Text("servers: none", style="dim"))
    parts.append(_events_table(events))
    metrics = job.get("metrics") or {}
    if metrics:
        mt = Table(title="latest metrics", box=None, header_style="bold", title_justify="left")
        mt.add_column("METRIC")
        mt.add_column("VALUE", justify="right")
        for k, v in metrics.items():
            mt.add_row(k, num(v))
        parts.append(mt)
    return Group(*parts)


def _trials_table(tuning: Json) -> Table:
    """A tuning job's trials: number, job, state, parameters, value of the metric (the best
    one marked)."""
    best = (tuning.get("best_trial") or {}).get("trial")
    used = tuning.get("trials_usage") or {}
    seconds, cost = float(used.get("vm_seconds") or 0), float(used.get("cost") or 0)
    title = (
        f"trials: {tuning.get('metric')} ({tuning.get('goal')}), "
        f"{len(tuning.get('trials') or [])} of {tuning.get('max_trials')}; their servers "
        f"{seconds:.0f} VM-seconds, cost {cost:.4f}"
    )
    table = Table(title=title, box=None, header_style="bold", title_justify="left")
    for col in ("TRIAL", "JOB", "STATE", "HYPERPARAMETERS", "VALUE", "STEPS"):
        table.add_column(col, no_wrap=col != "HYPERPARAMETERS")
    for t in tuning.get("trials") or []:
        value = "" if t.get("value") is None else num(t["value"])
        mark = " (best)" if t.get("trial") == best else ""
        table.add_row(
            f"{t.get('trial')}{mark}",
            str(t.get("job_id", "")),
            state_text(str(t.get("state", ""))),
            ", ".join(f"{k}={v}" for k, v in sorted((t.get("hyperparameters") or {}).items())),
            value,
            str(t.get("steps", 0)),
        )
    return table


def _batch_rows(head: Table, pred: Json, output: Json) -> None:
    """A batch prediction job's rows of `jobs describe`: the model version it uses (the label
    it was resolved from), its inputs, and once it is done the results summary."""
    rec = output.get("prediction") or {}
    version = rec.get("version") or pred.get("version")
    via = f" (label {rec['label']})" if rec.get("label") else ""
    head.add_row("model", f"{rec.get('model') or pred.get('model', '')} v{version}{via}")
    head.add_row("inputs", ", ".join(str(u) for u in pred.get("input_uris") or []))
    head.add_row(
        "batch",
        f"format {pred.get('format')}, batch_size {pred.get('batch_size')}, "
        f"shard_rows {pred.get('shard_rows')}, max_workers {pred.get('max_workers')}",
    )
    if rec.get("resumed"):
        head.add_row("resumed", "yes: only the shards missing under the prefix run")
    if "rows" in rec:
        head.add_row(
            "results",
            f"{rec['rows']} rows, {rec.get('errors', 0)} failed, {rec.get('shards')} shard(s)",
        )
        head.add_row("predictions", str(rec.get("results", "")))
        head.add_row("errors", str(rec.get("errors_uri", "")))


def _events_table(events: list[Json]) -> Table:
    table = Table(title="events", box=None, header_style="bold", title_justify="left")
    for col in ("AT", "KIND", "FROM", "TO"):
        table.add_column(col, no_wrap=True)
    table.add_column("MESSAGE")
    for ev in events:
        who = f"{ev['replica']}: " if ev.get("replica") else ""
        table.add_row(
            short_time(ev.get("at")),
            who + str(ev.get("kind") or ""),
            state_text(ev.get("from_state") or ev.get("from") or ""),
            state_text(ev.get("to_state") or ev.get("to") or ""),
            str(ev.get("message") or ""),
        )
    return table


@jobs.command("logs")
@click.argument("job_id")
@click.option("-f", "--follow", is_flag=True, help="Stream the log until the job ends.")
@click.option("--offset", type=click.IntRange(0), default=0, help="Start at this byte.")
@click.option(
    "--raw",
    is_flag=True,
    help="Write the log's bytes unchanged, terminal escape sequences included (into a file or "
    "a pipe; refused on a terminal). Without it they are removed.",
)
@click.option(
    "--replica",
    metavar="NAME",
    help="Another server's log: worker-1, worker-2, ... (a distributed job's replicas, a batch "
    "job's workers). Default: the chief's.",
)
@output_option
@click.pass_context
def jobs_logs(
    ctx: click.Context,
    job_id: str,
    follow: bool,
    offset: int,
    raw: bool,
    replica: str | None,
    output: str,
) -> None:
    """The trainer's log (stdout and stderr)."""
    client = client_of(ctx)
    if raw and sys.stdout.isatty():
        raise click.UsageError(
            "--raw writes the trainer's bytes as they are; redirect it into a file or a pipe"
        )
    if output == "json":
        if follow:
            raise click.UsageError("--follow streams text; it does not combine with -o json")
        data, nxt = client.logs(job_id, offset, replica)
        print_json(
            {
                "job_id": job_id,
                "replica": replica or "chief",
                "offset": offset,
                "next_offset": nxt,
                "log": data.decode("utf-8", "replace"),
            }
        )
        return
    out = sys.stdout.buffer if hasattr(sys.stdout, "buffer") else None
    chunks: Iterator[bytes]
    if follow:
        chunks = client.follow_logs(job_id, offset, replica=replica)
    else:
        data, _ = client.logs(job_id, offset, replica)
        chunks = iter([data])
    sanitizer = None if raw else ByteSanitizer()
    for chunk in chunks:
        _write_log(out, chunk if sanitizer is None else sanitizer.feed(chunk))
    if sanitizer is not None:
        _write_log(out, sanitizer.flush())


def _write_log(out: Any, data: bytes | str) -> None:
    if not data:
        return
    if out is None:  # a stdout without bytes (some test runners, IDE consoles)
        click.echo(data if isinstance(data, str) else data.decode("utf-8", "replace"), nl=False)
        return
    out.write(data.encode("utf-8") if isinstance(data, str) else data)
    out.flush()


@jobs.command("cancel")
@click.argument("job_id")
@output_option
@click.pass_context
def jobs_cancel(ctx: click.Context, job_id: str, output: str) -> None:
    """Cancel a job: its servers are torn down."""
    job = client_of(ctx).cancel_job(job_id)
    if output == "json":
        print_json(job)
        return
    state = job.get("state", "CANCELLING")
    make_console().print(f"job {job_id}: cancel requested ({state})")


@jobs.command("delete")
@click.argument("job_id")
@click.pass_context
def jobs_delete(ctx: click.Context, job_id: str) -> None:
    """Delete a finished job's record (its logs, events and metrics)."""
    client_of(ctx).delete_job(job_id)
    make_console().print(f"job {job_id} deleted")


@jobs.command("events")
@click.argument("job_id")
@click.option(
    "--replica",
    metavar="NAME",
    help="Only the events about one replica: worker-1, worker-2, ...",
)
@output_option
@click.pass_context
def jobs_events(ctx: click.Context, job_id: str, replica: str | None, output: str) -> None:
    """The job's timeline: every state transition, with its time and message."""
    body = client_of(ctx).events(job_id, replica)
    if output == "json":
        print_json(body)
        return
    make_console().print(_events_table(clean_tree(body.get("events") or [])))


@jobs.command("metrics")
@click.argument("job_id")
@click.option("--plot", is_flag=True, help="Draw each metric's curve in the terminal.")
@click.option(
    "--metric",
    "only",
    multiple=True,
    metavar="NAME",
    help="With --plot: only this metric (repeatable).",
)
@click.option(
    "--width", type=click.IntRange(10, 400), default=60, show_default=True, help="--plot's width."
)
@click.option(
    "--replica",
    metavar="NAME",
    help="Another replica's metrics: worker-1, worker-2, ... Default: the chief's (the job's).",
)
@output_option
@click.pass_context
def jobs_metrics(
    ctx: click.Context,
    job_id: str,
    plot: bool,
    only: tuple[str, ...],
    width: int,
    replica: str | None,
    output: str,
) -> None:
    """The metric series the trainer printed (by epoch, or by step); --plot draws them."""
    body = client_of(ctx).metrics(job_id, replica)
    if output == "json":
        if plot:
            raise click.UsageError("--plot draws text; it does not combine with -o json")
        print_json(body)
        return
    body = clean_tree(body)
    series: dict[str, list[Json]] = body.get("metrics", body) if isinstance(body, dict) else {}
    series = {k: v for k, v in series.items() if isinstance(v, list)}
    console = make_console()
    if not series:
        console.print("no metrics")
        return
    if not plot:
        console.print(_metrics_table(series))
        return
    from service.cli.plot import metric_charts

    missing = [m for m in only if m not in series]
    if missing:
        raise click.BadParameter(
            f"no metric {', '.join(missing)}; the job has {', '.join(sorted(series))}",
            param_hint="--metric",
        )
    for lines in metric_charts({k: series[k] for k in (only or sorted(series))}, width=width):
        for line in lines:
            console.print(Text(line, style="green" if "┤" in line else ""))


def _metrics_table(series: dict[str, list[Json]]) -> Table:
    """One row per epoch (or step, or point), one column per metric."""
    names = sorted(series)
    axis = "epoch"
    if not any(p.get("epoch") is not None for pts in series.values() for p in pts):
        axis = "step" if any(p.get("step") is not None for v in series.values() for p in v) else ""
    rows: dict[Any, dict[str, Any]] = {}
    for name in names:
        for i, point in enumerate(series[name]):
            pos = point.get(axis) if axis else i + 1
            rows.setdefault(pos if pos is not None else f"#{i + 1}", {})[name] = point.get("value")
    table = Table(box=None, header_style="bold")
    table.add_column((axis or "point").upper(), justify="right")
    for name in names:
        table.add_column(name, justify="right")
    for pos, values in rows.items():
        table.add_row(str(pos), *(num(values.get(n)) for n in names))
    return table
