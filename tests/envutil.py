"""Small helpers the test tiers share: a free loopback port, environment set for a block."""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from devcloud.process import free_port
from service.config import reset_settings

__all__ = ["environ", "free_port", "reap_dead_runs", "reap_sandboxes", "wait_sandboxes_gone"]


@contextmanager
def environ(values: dict[str, str]) -> Iterator[None]:
    """Set these variables (and re-read the settings) for the block, then restore them."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    reset_settings()
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        reset_settings()


def reap_sandboxes(root: Path) -> int:
    """Delete every sandbox left under `root` (after a failed test: the failure is already
    reported; this keeps the machine clean for the next run). Returns how many."""
    from service.backends.compute.sandbox import SandboxBackend

    if not root.is_dir():
        return 0
    backend = SandboxBackend(root, [])
    servers = backend.list_servers()
    for ref in servers:
        backend.delete_server(ref.id)
    return len(servers)


def wait_sandboxes_gone(root: Path, timeout: float) -> None:
    """Wait (at most `timeout` s) until nothing of a sandbox is left under `root`: no server
    record and no dir, also none a running delete has moved aside and is still removing. A tier
    that stops its platform as soon as the listing is empty kills that delete mid-removal."""
    from service.backends.compute.sandbox import ID_RE, SandboxBackend

    backend = SandboxBackend(root, [])

    def left() -> list[str]:
        if not root.is_dir():
            return []
        names = [n for n in os.listdir(root) if ID_RE.fullmatch(n) or n.startswith(".trash-")]
        return names + [ref.id for ref in backend.list_servers()]

    deadline = time.monotonic() + timeout
    while left() and time.monotonic() < deadline:
        time.sleep(0.5)


def reap_dead_runs(kind: str, base: Path = Path("/var/tmp")) -> list[Path]:
    """Clean up after runs of a tier that were killed before their own cleanup: a data dir
    `<base>/stackml-<kind>-<pid>` whose pytest process is gone has its sandboxes deleted
    through the backend (their sshd, netns, cgroups, loop devices) and is then removed. A
    tier calls this before it starts, so an interrupted run costs the next one nothing and
    leaves nothing running. Returns the dirs removed."""
    removed = []
    for d in sorted(base.glob(f"stackml-{kind}-*")):
        pid = d.name.rsplit("-", 1)[-1]
        if not pid.isdigit() or int(pid) == os.getpid() or _alive(int(pid)):
            continue
        reap_sandboxes(d / "sandboxes")
        shutil.rmtree(d, ignore_errors=True)
        removed.append(d)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
