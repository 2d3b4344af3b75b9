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
    if s.compute == "openstack":
        return _openstack(
            s.openstack_cloud or None,
            s.openstack_network,
            s.openstack_floating_network or None,
            s.openstack_security_group,
            s.openstack_ssh_cidr,
            s.openstack_ssh_user,
            tuple(sorted((k, r.image) for k, r in s.runtimes().items())),
            tuple(sorted(s.openstack_gpu_aliases.items())),
            tuple(sorted(s.openstack_prices.items())),
            s.openstack_call_timeout,
        )
    return _compute(s.compute, s.sandbox_dir, s.sandbox_isolation)


@functools.cache
def _openstack(
    cloud: str | None,
    network: str,
    floating: str | None,
    security_group: str,
    cidr: str,
    user: str,
    images: tuple[tuple[str, str], ...],
    aliases: tuple[tuple[str, str], ...],
    prices: tuple[tuple[str, float], ...],
    timeout: float,
) -> ComputeBackend:
    from service.backends.compute.openstack import OpenStackBackend

    return OpenStackBackend(
        cloud,
        network=network,
        floating_network=floating,
        security_group=security_group,
        ssh_cidr=cidr,
        ssh_user=user,
        images=dict(images),
        gpu_aliases=dict(aliases),
        prices=dict(prices),
        call_timeout=timeout,
    )


@functools.cache
def _store(kind: str, store_dir: Path, base_url: str, key: bytes) -> ObjectStore:
    if kind == "local":
        from service.backends.storage.local import LocalStore

        return LocalStore(store_dir, base_url=base_url, signing_key=key)
    raise NotImplementedError(f"object store {kind!r} is not available in this build")


def store(settings: Settings | None = None) -> ObjectStore:
    s = settings or get_settings()
    if s.store == "swift":
        return _swift(
            s.openstack_cloud,
            s.swift_segment_bytes,
            s.swift_container_prefix,
            s.swift_timeout,
            s.signing_key(),
        )
    return _store(s.store, s.store_dir, s.base_url, s.signing_key())


@functools.cache
def _swift(cloud: str, segment_bytes: int, prefix: str, timeout: float, key: bytes) -> ObjectStore:
    import hashlib
    import hmac

    import openstack

    from service.backends.storage.swift import SwiftStore

    # every worker derives the same TempURL key from the platform's secret: no race to set it
    return SwiftStore(
        openstack.connect(cloud=cloud or None),
        segment_bytes=segment_bytes,
        container_prefix=prefix,
        timeout=timeout,
        temp_url_key=hmac.new(key, b"stackml swift temp-url key", hashlib.sha256).hexdigest(),
    )


def reset() -> None:
    _compute.cache_clear()
    _openstack.cache_clear()
    _swift.cache_clear()
    _store.cache_clear()
