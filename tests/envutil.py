"""Small helpers the test tiers share: a free loopback port, environment set for a block."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from devcloud.process import free_port
from service.config import reset_settings

__all__ = ["environ", "free_port", "reap_sandboxes"]


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
