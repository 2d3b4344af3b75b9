"""What the `openstack ml` commands share: the client of the invocation, API errors turned into
osc's CommandError (the API's sentence and code), and API text cleaned of terminal escapes
before cliff's formatters print it."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml
from osc_lib import exceptions
from osc_lib.cli import format_columns
from osc_lib.command import command

from service.cli.common import clean, clean_tree
from service.client import APIUnavailable, ClientError, Json, StackMLClient, describe_error
from service.domain.errors import StackMLError


def api_error(err: StackMLError) -> exceptions.CommandError:
    """The error a user reads: `<the API's sentence> [<code>, HTTP <status>, request <id>]`."""
    if isinstance(err, APIUnavailable):  # the client's hint names `stackml up` and --url
        reason = err.message.split(";")[0]
        return exceptions.CommandError(
            clean(
                f"{reason}; check the catalog's machine-learning endpoint (`openstack catalog "
                "show machine-learning`) or --os-ml-endpoint [api_unavailable]"
            )
        )
    return exceptions.CommandError(clean(describe_error(err)))


class _Base:
    """Mixin of every `openstack ml` command: `self.client`, and API errors as CommandError."""

    app: Any

    @property
    def client(self) -> StackMLClient:
        client: StackMLClient = self.app.client_manager.ml
        return client

    def run(self, parsed_args: argparse.Namespace) -> int:
        try:
            result: int = super().run(parsed_args)  # type: ignore[misc]
        except ClientError as e:
            raise api_error(e) from e
        return result


class MLCommand(_Base, command.Command):
    """A command that prints nothing but a sentence (delete, cancel, ...)."""


class MLLister(_Base, command.Lister):
    """A table of rows (`-f table|json|value|csv|yaml`)."""


class MLShowOne(_Base, command.ShowOne):
    """One object as field/value pairs (`-f table|json|value|shell|yaml`)."""


def cell(value: Any) -> Any:
    """One value as cliff shows it: dicts and lists keep their JSON in `-f json` and read as
    `k='v'` / `a, b` in tables; text is cleaned of terminal escapes."""
    value = clean_tree(value)
    if isinstance(value, dict):
        return format_columns.DictColumn(value)
    if isinstance(value, list):
        return format_columns.ListColumn(value)
    return value


def rows(
    items: Iterable[Json], fields: Sequence[str | Callable[[Json], Any]]
) -> list[tuple[Any, ...]]:
    """Each item's values of `fields` (a key, or a function of the item), as cells."""
    out = []
    for item in items:
        out.append(tuple(cell(f(item) if callable(f) else item.get(f)) for f in fields))
    return out


def show(fields: Mapping[str, Any]) -> tuple[tuple[str, ...], tuple[Any, ...]]:
    """ShowOne's (columns, values) from an ordered mapping of field name to value."""
    return tuple(fields), tuple(cell(v) for v in fields.values())


def key_values(what: str) -> Callable[[str], tuple[str, str]]:
    """An argparse type for K=V (repeatable options collect them with action=append)."""

    def parse(text: str) -> tuple[str, str]:
        key, sep, value = text.partition("=")
        if not sep or not key:
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}=VALUE")
        return key, value

    return parse


def read_spec(path: str) -> dict[str, Any]:
    """A JSON or YAML document (an object) from a file, or stdin for `-`."""
    try:
        text = sys.stdin.read() if path == "-" else Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise exceptions.CommandError(f"cannot read {path}: {e.strerror or e}") from e
    try:
        data = json.loads(text) if text.lstrip().startswith("{") else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as e:
        raise exceptions.CommandError(f"{path} is neither JSON nor YAML: {e}") from e
    if not isinstance(data, dict):
        raise exceptions.CommandError(f"{path} must hold an object (a mapping of fields)")
    return data
