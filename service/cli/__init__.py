"""The `stackml` command line (click + rich): one root group assembling the user's commands
(`jobs`, in service/cli/user.py) and the operator's (`up`, `demo`, `runtime`, `db`, in
service/cli/ops.py; `devcloud`, in devcloud/cli.py). Shared plumbing: service/cli/common.py."""

from __future__ import annotations

import click

from service.cli import ops
from service.cli.common import StackMLGroup
from service.cli.user import failure_sentence, jobs, watch_job
from service.client import APIError


@click.group(cls=StackMLGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--url",
    envvar="STACKML_URL",
    default=None,
    metavar="URL",
    help="The stackml API (default $STACKML_URL, else http://127.0.0.1:8080).",
)
@click.option(
    "--os-cloud",
    envvar="OS_CLOUD",
    default=None,
    metavar="NAME",
    help="Authenticate with Keystone as this clouds.yaml cloud (default $OS_CLOUD; the OS_* "
    "variables such as OS_AUTH_URL work too). Without either, no token is sent (noauth).",
)
@click.option("--token", envvar="STACKML_TOKEN", default=None, hidden=True)
@click.version_option(package_name="stackml", prog_name="stackml")
@click.pass_context
def cli(ctx: click.Context, url: str | None, os_cloud: str | None, token: str | None) -> None:
    """stackml: TensorFlow training jobs on OpenStack (or on this machine)."""
    ctx.obj = {"url": url, "token": token, "os_cloud": os_cloud or None}


def main() -> None:
    cli(prog_name="stackml")


def _assemble() -> None:
    from devcloud.cli import devcloud

    # the operator's commands (run and migrate the platform), then the user's
    from service.cli.datasets import datasets
    from service.cli.models import models
    from service.cli.schedules import schedules

    for command in (
        ops.up,
        ops.demo,
        ops.runtime,
        ops.db,
        devcloud,
        jobs,
        models,
        schedules,
        datasets,
    ):
        cli.add_command(command)


_assemble()


def _assemble_platform() -> None:
    # quotas, usage and flavors (service/cli/platform.py); the registry's deletes and the
    # endpoint's PATCH (service/cli/models_more.py) join `models`
    from service.cli.models import models
    from service.cli.models_more import COMMANDS
    from service.cli.platform import flavors, quotas, usage

    for command in (quotas, usage, flavors):
        cli.add_command(command)
    for command in COMMANDS:
        models.add_command(command)


_assemble_platform()

__all__ = ["APIError", "cli", "failure_sentence", "main", "watch_job"]
