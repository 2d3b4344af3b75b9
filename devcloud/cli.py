"""`stackml devcloud up | down | env | status | horizon`: the development cloud, by command."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import click

F = TypeVar("F", bound=Callable[..., Any])


def _state_dir_option(f: F) -> F:
    return click.option(
        "--state-dir",
        type=click.Path(file_okay=False, path_type=Path),
        default=None,
        help="Where the devcloud keeps its state (default: <data_dir>/devcloud).",
    )(f)


@contextmanager
def _errors() -> Iterator[None]:
    from devcloud import DevCloudError

    try:
        yield
    except DevCloudError as e:
        raise click.ClickException(str(e)) from e


def _echo(msg: str) -> None:
    click.echo(msg, err=True)


@click.group("devcloud")
def devcloud() -> None:
    """A development OpenStack on loopback: real Keystone, real Swift, the Nova emulator."""


@devcloud.command("up")
@_state_dir_option
@click.option("--keystone-port", type=int, default=None, help="Default 5000 (0: any free port).")
@click.option("--swift-port", type=int, default=None, help="Default 8090 (0: any free port).")
@click.option("--emulator-port", type=int, default=None, help="Default 8774 (0: any free port).")
@click.option(
    "--emulator/--no-emulator",
    default=None,
    help="Start the Nova/Neutron/Glance emulator (default: when it is installed).",
)
@click.option(
    "--venv-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Where Keystone's and Swift's virtualenvs are built once and reused "
    "(default: next to the runtimes, or $STACKML_DEVCLOUD_VENVS).",
)
def up(
    state_dir: Path | None,
    keystone_port: int | None,
    swift_port: int | None,
    emulator_port: int | None,
    emulator: bool | None,
    venv_dir: Path | None,
) -> None:
    """Start the devcloud (idempotent: what already runs is left running)."""
    from devcloud.cloud import DevCloud

    with _errors():
        cloud = DevCloud(state_dir, venv_root=venv_dir)
        cloud.up(
            keystone_port=keystone_port,
            swift_port=swift_port,
            emulator_port=emulator_port,
            emulator=emulator,
            echo=_echo,
        )
        _print_status(cloud.status())
        click.echo(
            f'\nUse it:  eval "$(stackml devcloud env{_dir_arg(state_dir)})"   '
            "then e.g. `openstack catalog list`",
            err=True,
        )


@devcloud.command("down")
@_state_dir_option
def down(state_dir: Path | None) -> None:
    """Stop everything the devcloud started and delete the emulator's servers (state is kept)."""
    from devcloud.cloud import DevCloud

    with _errors():
        if not DevCloud(state_dir).down(echo=_echo):
            _echo("the devcloud was not running")


@devcloud.command("env")
@_state_dir_option
def env(state_dir: Path | None) -> None:
    """Print shell exports for the devcloud (admin credentials): eval "$(stackml devcloud env)"."""
    from devcloud.cloud import DevCloud

    with _errors():
        sys.stdout.write(DevCloud(state_dir).env_exports())


@devcloud.command("status")
@_state_dir_option
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def status(state_dir: Path | None, as_json: bool) -> None:
    """Which devcloud processes run, on which ports; exit 1 unless Keystone and Swift are up."""
    from devcloud.cloud import DevCloud

    with _errors():
        cloud = DevCloud(state_dir)
        st = cloud.status()
        if as_json:
            click.echo(json.dumps(st, indent=2))
        else:
            _print_status(st)
        if not cloud.is_up():
            sys.exit(1)


@devcloud.command("horizon")
@_state_dir_option
@click.option("--port", type=int, default=8000, show_default=True, help="Horizon's port.")
@click.option(
    "--api-url",
    default=None,
    help="Point the catalog's `machine-learning` endpoint at this stackml API first (default: "
    "keep it; `stackml up --devcloud` registers its own URL).",
)
def horizon(state_dir: Path | None, port: int, api_url: str | None) -> None:
    """Run real Horizon with stackml's dashboard against the devcloud (foreground; Ctrl-C
    stops it). Builds Horizon's virtualenv once."""
    import os

    from devcloud import DevCloudError, venvs
    from devcloud import horizon as hz
    from devcloud.cloud import DevCloud

    with _errors():
        cloud = DevCloud(state_dir)
        if not cloud.is_up():
            raise DevCloudError("the devcloud is not running: `stackml devcloud up` first")
        if api_url:
            cloud.register_stackml(api_url)
        venv = venvs.ensure_venv(cloud.venv_root, "horizon", venvs.HORIZON_REQUIREMENTS, echo=_echo)
        work = cloud.state_dir / "horizon"
        hz.write_settings(work, cloud.auth_url)
        _echo(
            f"Horizon on http://127.0.0.1:{port}/machine_learning/ (stackml at "
            f"{cloud.stackml_url}) -- log in as demo / {cloud.password('demo')} (project demo) "
            f"or alt / {cloud.password('alt')}"
        )
        os.chdir(work)
        argv = hz.server_command(venv, "127.0.0.1", port)
        os.execve(argv[0], argv, hz.server_env(work))


def _dir_arg(state_dir: Path | None) -> str:
    return f" --state-dir {state_dir}" if state_dir else ""


def _print_status(st: dict[str, Any]) -> None:
    click.echo(f"state      {st['state_dir']}")
    click.echo(f"clouds     {st['clouds_yaml']}")
    click.echo(f"keystone   {st['keystone_url']}")
    click.echo(f"swift      {st['swift_url']}")
    click.echo(f"emulator   {st['emulator_url']}")
    for name, svc in st["services"].items():
        state = f"running (pid {svc['pid']})" if svc["running"] else "stopped"
        click.echo(f"  {name:<16} {state:<22} port {svc['port']}  log {svc['log']}")


if __name__ == "__main__":
    devcloud()
