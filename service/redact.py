"""Secrets out of log lines: signed-URL signatures, tokens and passwords in URLs.

`redact(text)` replaces, anywhere in a line, the value of every query parameter whose name says
it is a secret (`temp_url_sig`, `signature`, `X-Amz-Signature`, `token`, `password`, ...) and
the password of `scheme://user:password@host` with `REDACTED`; the rest of the line (paths,
expiry times, prefixes) stays readable. `AccessLogHandler` is werkzeug's request handler with
every line it logs redacted, optionally written to a file instead of werkzeug's logger.
"""

from __future__ import annotations

import re
import threading
from pathlib import Path
from typing import Any, ClassVar

from werkzeug.serving import WSGIRequestHandler

MASK = "REDACTED"
# a query parameter (after ? or &, raw or %-encoded in a logged URL) whose name says secret
_SECRET_PARAM = re.compile(
    r"(?i)((?:^|[?&;\s\"'])(?:[\w.-]*?(?:sig|signature|token|password|passwd|secret|"
    r"credential|api[_-]?key)[\w.-]*)=)([^&;\s\"'#]*)"
)
# werkzeug colours its console lines; a file gets them plain
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
# scheme://user:password@ -> scheme://user:REDACTED@
_USERINFO = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://[^/\s:@]*:)([^/\s@]+)(@)")


def redact(text: str) -> str:
    """`text` with secret query values and URL passwords replaced by REDACTED."""
    if "=" not in text and "@" not in text:
        return text  # neither pattern can match (every access-log line asks: most have neither)
    text = _SECRET_PARAM.sub(lambda m: m.group(1) + (MASK if m.group(2) else ""), text)
    return _USERINFO.sub(lambda m: m.group(1) + MASK + m.group(3), text)


class AccessLogHandler(WSGIRequestHandler):
    """werkzeug's request handler; every access and error line is redacted, and written to
    `access_log` (appended, one line per request) when that is set."""

    access_log: ClassVar[Path | None] = None

    def log(self, type: str, message: str, *args: Any) -> None:
        try:
            line = message % args if args else message
        except (TypeError, ValueError):
            line = " ".join([message, *map(str, args)])
        line = redact(line)
        path = self.access_log
        if path is None:
            super().log(type, "%s", line)
            return
        address = self.address_string()
        append_line(path, f"{address} - - [{self.log_date_time_string()}] {_ANSI.sub('', line)}")


_append_lock = threading.Lock()


def append_line(path: Path, line: str) -> None:
    """Append one access-log line to `path` (one writer at a time in this process)."""
    with _append_lock, open(path, "a", encoding="utf-8", errors="replace") as fh:
        fh.write(line + "\n")


__all__ = ["MASK", "AccessLogHandler", "append_line", "redact"]
