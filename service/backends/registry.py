"""Chooses the compute backend and object store from configuration."""

from __future__ import annotations

import functools
from pathlib import Path

from service.backends.interfaces import ComputeBackend, ObjectStore
from service.config import Settings, get_settings


@functools.cache
def _compute(kind: str, sandbox_dir: Path, isolation: str) -> ComputeBackend:
    if kind == "sandbox":
        from service.backends.compute.sandbox import SandboxBackend

        return SandboxBackend(sandbox_dir, get_settings().flavors(), isolation=isolation)
    raise NotImplementedError(f"compute backend {kind!r} is not available in this build")


def compute(settings: Settings | None = None) -> ComputeBackend:
    s = settings or get_settings()
    return _compute(s.compute, s.sandbox_dir, s.sandbox_isolation)


@functools.cache
def _store(kind: str, store_dir: Path, base_url: str, key: bytes) -> ObjectStore:
    if kind == "local":
        from service.backends.storage.local import LocalStore

        return LocalStore(store_dir, base_url=base_url, signing_key=key)
    raise NotImplementedError(f"object store {kind!r} is not available in this build")


def store(settings: Settings | None = None) -> ObjectStore:
    s = settings or get_settings()
    return _store(s.store, s.store_dir, s.base_url, s.signing_key())


def reset() -> None:
    _compute.cache_clear()
    _store.cache_clear()
