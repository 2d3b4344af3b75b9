"""The platform's data dir is private to the platform's own user.

It holds the SQLite database (every job's row: specs, `env` values, encrypted SSH keys), the
signing key, the local object store (every project's packages, data and models), logs and
the sandboxes' records and host keys. Sandboxes run as other users (`stackml-sbN`) on the same
machine, so none of it may be readable by them: the dir is 0700 and everything created in it is
0600/0700 (umask 077 in every platform process: API, worker, beat). Whatever a sandbox needs
lives elsewhere: runtimes under `runtime_root` (default /var/cache/stackml/runtimes as root),
the sandbox's own dir bound inside its mount namespace (see compute/sandbox.py).
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from service.config import Settings
from service.domain.errors import StackMLError

PRIVATE_UMASK = 0o077
SQLITE_FILES = ("", "-wal", "-shm", "-journal")  # the database and its companions


class DataDirError(StackMLError):
    code = "data_dir_error"


def sqlite_path(db_url: str) -> Path | None:
    """The file of a sqlite:/// URL (None for other databases and in-memory SQLite)."""
    prefix = "sqlite:///"
    if not db_url.startswith(prefix) or db_url[len(prefix) :] in ("", ":memory:"):
        return None
    return Path(db_url[len(prefix) :].split("?", 1)[0])


def _inside(path: Path, parent: Path) -> bool:
    try:
        Path(os.path.realpath(path)).relative_to(os.path.realpath(parent))
    except ValueError:
        return False
    return True


def secure_data_dir(settings: Settings) -> int:
    """Make `settings.data_dir` private: create it 0700 (tighten it when looser), tighten the
    SQLite files and the signing key already there to 0600, set the umask to 077 for this
    process and its children. Returns the previous umask (for whoever wants it back).

    Refuses (DataDirError) a layout where root-mode sandboxes would need something inside it:
    a runtime_root inside the data dir."""
    data_dir = settings.data_dir
    root_mode = settings.sandbox_isolation in ("auto", "root")
    if os.geteuid() == 0 and settings.compute == "sandbox" and root_mode:
        if _inside(settings.runtime_dir, data_dir):
            raise DataDirError(
                f"runtime_root {settings.runtime_dir} lies inside the data dir {data_dir}, which "
                "is private (0700): the sandbox users could not run the runtime. Set "
                "runtime_root outside it (default: /var/cache/stackml/runtimes)",
                details={"runtime_root": str(settings.runtime_dir), "data_dir": str(data_dir)},
            )
    previous = os.umask(PRIVATE_UMASK)
    try:
        data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        if data_dir.stat().st_mode & 0o077:
            os.chmod(data_dir, 0o700)
        files = [data_dir / "secret.key"]
        db = sqlite_path(settings.db_url)
        if db is not None:
            files += [db.with_name(db.name + suffix) for suffix in SQLITE_FILES]
        for f in files:
            with contextlib.suppress(FileNotFoundError):
                if f.stat().st_mode & 0o077:
                    os.chmod(f, 0o600)
    except OSError as e:
        os.umask(previous)
        raise DataDirError(f"cannot make the data dir {data_dir} private: {e}") from e
    return previous
