"""What the `stackml` command groups share: the root group's error handling, consoles, the API
client of a command, output formatting, and the sanitizer every server-sent text goes through
before it reaches a terminal."""

from __future__ import annotations

import codecs
import json
import os
from datetime import UTC, datetime
from typing import Any

import click
from rich.console import Console
from rich.text import Text

from service.client import (
    TERMINAL_STATES,
    Json,
    StackMLClient,
    describe_error,
    keystone_tokens,
    openstack_auth_configured,
)
from service.domain.errors import StackMLError

STATE_STYLE = {
    "QUEUED": "cyan",
    "ALLOCATING": "blue",
    "PROVISIONING": "blue",
    "RUNNING": "yellow",
    "EXPORTING": "magenta",
    "SUCCEEDED": "bold green",
    "CANCELLING": "dim yellow",
    "CANCELLED": "dim",
    "FAILED": "bold red",
}
PIPE_WIDTH = 240


# -- terminal safety ---------------------------------------------------------------------------

ESC, BEL, CSI_C1, ST_C1 = "\x1b", "\x07", "\x9b", "\x9c"
# C1 (and ESC x) introducers of control strings that run until ST or BEL: DCS, SOS, OSC, PM, APC
STRING_C1 = frozenset("\x90\x98\x9d\x9e\x9f")
STRING_ESC = frozenset("P X ] ^ _".split())
# Unicode bidi embeddings/overrides/isolates: they reorder what a terminal shows ("Trojan source")
BIDI = frozenset("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")
_NORMAL, _ESC, _ESC_INTER, _CSI, _STRING, _STRING_ESC = range(6)


class TerminalSanitizer:
    """Streaming filter for text a trainer (or any API client) controls, before it is printed:
    drops ANSI/VT escape sequences (CSI, OSC, DCS, SOS, PM, APC, two-byte ESC sequences, also in
    their 8-bit C1 forms), every other C0/C1 control character and DEL, and bidi overrides; keeps
    newline and tab. A carriage return becomes a newline (CR LF stays one newline), so that no
    text can be overwritten on screen. Sequences cut between two chunks are recognised whole;
    a control string (OSC & co) ends at the latest at a newline, so that an unterminated one
    cannot hide the rest of a log."""

    def __init__(self) -> None:
        self._state = _NORMAL
        self._cr = False

    def feed(self, text: str) -> str:
        out: list[str] = []
        for ch in text:
            self._step(ch, out)
        return "".join(out)

    def flush(self) -> str:
        """The end of the stream: a pending CR is a line end; a cut sequence is dropped."""
        self._state = _NORMAL
        if self._cr:
            self._cr = False
            return "\n"
        return ""

    def _step(self, ch: str, out: list[str]) -> None:
        state = self._state
        if state == _NORMAL:
            self._normal(ch, out)
        elif state == _ESC:
            if ch == "[":
                self._state = _CSI
            elif ch in STRING_ESC:
                self._state = _STRING
            elif " " <= ch <= "/":
                self._state = _ESC_INTER
            elif "0" <= ch <= "~":
                self._state = _NORMAL  # a two-character sequence (ESC 7, ESC c, ...)
            else:  # not a sequence after all: drop the ESC, keep what follows
                self._state = _NORMAL
                self._normal(ch, out)
        elif state == _ESC_INTER:
            if "0" <= ch <= "~":
                self._state = _NORMAL
            elif not (" " <= ch <= "/"):
                self._state = _NORMAL
                self._normal(ch, out)
        elif state == _CSI:
            if "@" <= ch <= "~":
                self._state = _NORMAL  # the final byte
            elif not (" " <= ch <= "?"):  # parameters and intermediates stay in; else abort
                self._state = _NORMAL
                self._normal(ch, out)
        elif state == _STRING:
            if ch in (BEL, ST_C1):
                self._state = _NORMAL
            elif ch == ESC:
                self._state = _STRING_ESC
            elif ch in "\n\r":
                self._state = _NORMAL
                self._normal(ch, out)
        else:  # _STRING_ESC: ESC \ is ST; any other ESC x ends the string and starts a sequence
            self._state = _NORMAL if ch == "\\" else _ESC
            if ch != "\\":
                self._step(ch, out)

    def _normal(self, ch: str, out: list[str]) -> None:
        if self._cr:
            self._cr = False
            out.append("\n")
            if ch == "\n":
                return
        if ch == "\n" or ch == "\t":
            out.append(ch)
        elif ch == "\r":
            self._cr = True
        elif ch == ESC:
            self._state = _ESC
        elif ch == CSI_C1:
            self._state = _CSI
        elif ch in STRING_C1:
            self._state = _STRING
        elif ch < " " or "\x7f" <= ch <= "\x9f" or ch in BIDI:
            pass  # any other control character
        else:
            out.append(ch)


def clean(text: str) -> str:
    """`text` safe to print on a terminal (see TerminalSanitizer)."""
    s = TerminalSanitizer()
    return s.feed(text) + s.flush()


def clean_tree(obj: Any) -> Any:
    """Every string (keys too) of a JSON document cleaned, for the table views."""
    if isinstance(obj, str):
        return clean(obj)
    if isinstance(obj, dict):
        return {clean(str(k)): clean_tree(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [clean_tree(v) for v in obj]
    return obj


class ByteSanitizer:
    """UTF-8 bytes in (chunks cut anywhere), cleaned text out."""

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")
        self._clean = TerminalSanitizer()

    def feed(self, data: bytes) -> str:
        return self._clean.feed(self._decoder.decode(data))

    def flush(self) -> str:
        return self._clean.feed(self._decoder.decode(b"", final=True)) + self._clean.flush()


# -- the root group's plumbing -----------------------------------------------------------------


class StackMLGroup(click.Group):
    """Turns the errors stackml raises on purpose into one sentence and exit status 1."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except StackMLError as e:  # ClientError included
            raise click.ClickException(clean(describe_error(e))) from e


def make_console(*, stderr: bool = False) -> Console:
    # no markup: job names, messages and paths come from users; styles go through Text
    console = Console(stderr=stderr, highlight=False, soft_wrap=True, markup=False)
    if not console.is_terminal and "COLUMNS" not in os.environ:
        console.width = PIPE_WIDTH  # piped into grep/less: do not squeeze tables to 80
    return console


def err_console() -> Console:
    return make_console(stderr=True)


def client_of(ctx: click.Context) -> StackMLClient:
    """The API client of this invocation (made once, from the root group's options)."""
    obj = ctx.find_root().obj or {}
    client = obj.get("client")
    if client is None:
        token = obj.get("token")
        auth = None
        if not token and openstack_auth_configured(obj.get("os_cloud")):
            # the OpenStack way: clouds.yaml + OS_CLOUD (or --os-cloud), or OS_* variables;
            # a token is fetched at the first request and renewed once if the API says 401
            auth = keystone_tokens(obj.get("os_cloud"))
        client = StackMLClient(obj.get("url"), token=token, auth=auth)
        obj["client"] = client
    return client


def print_json(data: Any) -> None:
    # ensure_ascii (the default): every control character leaves as a \uXXXX escape
    click.echo(json.dumps(data, indent=2, sort_keys=False))


output_option = click.option(
    "-o",
    "--output",
    type=click.Choice(["table", "json"]),
    default="table",
    show_default=True,
    help="json prints exactly the API's JSON.",
)


# -- formatting --------------------------------------------------------------------------------


def state_text(state: str) -> Text:
    return Text(state, style=STATE_STYLE.get(state, ""))


def parse_time(value: Any) -> datetime | None:
    if not isinstance(value, str) or not value:
        return None
    try:
        dt = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return dt if dt.tzinfo else dt.replace(tzinfo=UTC)


def short_time(value: Any) -> str:
    dt = parse_time(value)
    if dt is None:
        return "-" if not value else str(value)
    return dt.astimezone().strftime("%Y-%m-%d %H:%M:%S")


def duration(job: Json) -> str:
    start = parse_time(job.get("started_at")) or parse_time(job.get("created_at"))
    if start is None:
        return "-"
    end = parse_time(job.get("finished_at"))
    if end is None:
        if job.get("state") in TERMINAL_STATES:
            return "-"
        end = datetime.now(UTC)
    secs = max(0.0, (end - start).total_seconds())
    if secs < 60:
        return f"{secs:.1f}s"
    mins, secs = divmod(int(secs), 60)
    hours, mins = divmod(mins, 60)
    return f"{hours}h{mins:02d}m{secs:02d}s" if hours else f"{mins}m{secs:02d}s"


def num(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return "-" if value is None else str(value)
    return f"{value:.6g}"
