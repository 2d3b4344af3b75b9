"""Chooses the compute backend and object store from configuration."""

from __future__ import annotations

import collections
import functools
import threading
from pathlib import Path
from typing import Any

from service.backends.interfaces import Capabilities, ComputeBackend, ObjectStore
from service.config import Settings, get_settings


@functools.cache
def _compute(kind: str, sandbox_dir: Path, isolation: str, network: Any = None) -> ComputeBackend:
    if kind == "sandbox":
        from service.backends.compute.sandbox import SandboxBackend

        return SandboxBackend(
            sandbox_dir, get_settings().flavors(), isolation=isolation, network=network
        )
    raise NotImplementedError(f"compute backend {kind!r} is not available in this build")


def capabilities(backend_name: str) -> Capabilities:
    """The capabilities of a compute backend by the name its servers' rows record, without
    building one (no cloud login); an unknown name gets the defaults (a cloud's)."""
    if backend_name == "sandbox":
        from service.backends.compute.sandbox import SandboxBackend

        return SandboxBackend.capabilities
    if backend_name == "openstack":
        from service.backends.compute.openstack import OpenStackBackend

        return OpenStackBackend.capabilities
    return Capabilities()


def compute(settings: Settings | None = None, trust_id: str | None = None) -> ComputeBackend:
    """The compute backend; with `trust_id` (openstack only), one that acts through that
    Keystone trust in the trust's project (service/trusts.py), cached per trust."""
    s = settings or get_settings()
    if s.compute == "openstack":
        args = _openstack_args(s)
        if trust_id is not None:
            return _openstack_trust(trust_id, args)
        return _openstack(args)
    from service.backends.compute import sandbox_net

    return _compute(s.compute, s.sandbox_dir, s.sandbox_isolation, sandbox_net.from_settings(s))


_OpenStackArgs = tuple[
    str | None,
    str,
    str | None,
    str,
    str,
    str,
    tuple[tuple[str, str], ...],
    tuple[tuple[str, str], ...],
    tuple[tuple[str, float], ...],
    float,
]


def _openstack_args(s: Settings) -> _OpenStackArgs:
    return (
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


@functools.cache
def _openstack(args: _OpenStackArgs) -> ComputeBackend:
    return _new_openstack(args[0], args)


TRUST_BACKENDS = 64  # per process: a backend (one connection, its caches) per recent trust
_trust_backends: collections.OrderedDict[tuple[str, _OpenStackArgs], ComputeBackend] = (
    collections.OrderedDict()
)
_trust_lock = threading.Lock()


def _openstack_trust(trust_id: str, args: _OpenStackArgs) -> ComputeBackend:
    key = (trust_id, args)
    with _trust_lock:
        backend = _trust_backends.get(key)
        if backend is not None:
            _trust_backends.move_to_end(key)
            return backend
    from service import trusts

    cloud, timeout = args[0] or "", args[9]
    backend = _new_openstack(
        lambda: trusts.connect(cloud, trust_id, timeout),
        args,
        shared_cache=lambda project_id: _lookup_cache(project_id, args),
    )
    with _trust_lock:
        backend = _trust_backends.setdefault(key, backend)
        while len(_trust_backends) > TRUST_BACKENDS:
            _trust_backends.popitem(last=False)
    return backend


PROJECT_CACHES = 256  # per process: the lookups (flavors, network, image, security group)
_lookup_caches: collections.OrderedDict[tuple[str, _OpenStackArgs], Any] = collections.OrderedDict()


def _lookup_cache(project_id: str, args: _OpenStackArgs) -> Any:
    """One LookupCache per project for the backends of all its trusts: a job's first call
    through a new trust does not look the project's network, image and flavors up again."""
    from service.backends.compute.openstack import LookupCache

    key = (project_id, args)
    with _trust_lock:
        cache = _lookup_caches.get(key)
        if cache is None:
            cache = _lookup_caches[key] = LookupCache()
            while len(_lookup_caches) > PROJECT_CACHES:
                _lookup_caches.popitem(last=False)
        else:
            _lookup_caches.move_to_end(key)
        return cache


def forget_trust(trust_id: str) -> None:
    """Drop the cached backend and stores of a deleted trust."""
    with _trust_lock:
        for key in [k for k in _trust_backends if k[0] == trust_id]:
            del _trust_backends[key]
        for skey in [k for k in _project_stores if k[1] == trust_id]:
            del _project_stores[skey]


def _new_openstack(conn: Any, args: _OpenStackArgs, shared_cache: Any = None) -> ComputeBackend:
    from service.backends.compute.openstack import OpenStackBackend

    _, network, floating, security_group, cidr, user, images, aliases, prices, timeout = args
    return OpenStackBackend(
        conn,
        network=network,
        floating_network=floating,
        security_group=security_group,
        ssh_cidr=cidr,
        ssh_user=user,
        images=dict(images),
        gpu_aliases=dict(aliases),
        prices=dict(prices),
        call_timeout=timeout,
        shared_cache=shared_cache,
    )


@functools.cache
def _store(kind: str, store_dir: Path, base_url: str, key: bytes) -> ObjectStore:
    if kind == "local":
        from service.backends.storage.local import LocalStore

        return LocalStore(store_dir, base_url=base_url, signing_key=key)
    raise NotImplementedError(f"object store {kind!r} is not available in this build")


def store(
    settings: Settings | None = None,
    *,
    project_id: str | None = None,
    trust_id: str | None = None,
) -> ObjectStore:
    """The object store. With Swift and per-project tenancy (service/trusts.py) a project's
    objects live in the project's own account: pass `project_id` (and, in a worker, the job's
    `trust_id`, which then reaches the account through the trust)."""
    s = settings or get_settings()
    if s.store == "swift":
        args = (
            s.openstack_cloud,
            s.swift_segment_bytes,
            s.swift_container_prefix,
            s.swift_timeout,
            s.signing_key(),
        )
        if project_id is not None:
            from service import trusts

            if trusts.enabled(s):
                return _swift_project(project_id, trust_id, args, s.openstack_call_timeout)
        return _swift(*args)
    return _store(s.store, s.store_dir, s.base_url, s.signing_key())


@functools.cache
def _swift(cloud: str, segment_bytes: int, prefix: str, timeout: float, key: bytes) -> ObjectStore:
    import openstack

    from service.backends.storage.swift import SwiftStore

    return SwiftStore(
        openstack.connect(cloud=cloud or None),
        segment_bytes=segment_bytes,
        container_prefix=prefix,
        timeout=timeout,
        temp_url_key=_temp_url_key(key, None),
    )


PROJECT_STORES = 64  # per process: recent projects' (and trusts') stores
_project_stores: collections.OrderedDict[tuple[str, str | None, tuple[Any, ...]], ObjectStore] = (
    collections.OrderedDict()
)


def _swift_project(
    project_id: str, trust_id: str | None, args: tuple[str, int, str, float, bytes], timeout: float
) -> ObjectStore:
    """The Swift account of `project_id`: through the job's trust (a worker), or as stackml's
    service user (the API), which needs Swift's reseller admin role to reach other accounts."""
    key = (project_id, trust_id, args)
    with _trust_lock:
        found = _project_stores.get(key)
        if found is not None:
            _project_stores.move_to_end(key)
            return found
    from service import trusts
    from service.backends.storage.swift import SwiftStore

    cloud, segment_bytes, prefix, swift_timeout, secret = args
    temp_url_key = _temp_url_key(secret, project_id)
    made: ObjectStore
    if trust_id is not None:
        made = SwiftStore(
            trusts.connect(cloud, trust_id, timeout),  # its catalog names the project's account
            segment_bytes=segment_bytes,
            container_prefix=prefix,
            timeout=swift_timeout,
            temp_url_key=temp_url_key,
        )
    else:
        service = _swift(*args)
        assert isinstance(service, SwiftStore)
        made = SwiftStore(
            service.conn,
            segment_bytes=segment_bytes,
            container_prefix=prefix,
            timeout=swift_timeout,
            temp_url_key=temp_url_key,
            endpoint=account_endpoint(
                service.endpoint, service.conn.current_project_id, project_id
            ),
        )
    with _trust_lock:
        made = _project_stores.setdefault(key, made)
        while len(_project_stores) > PROJECT_STORES:
            _project_stores.popitem(last=False)
    return made


def account_endpoint(own_endpoint: str, own_project: str, project_id: str) -> str:
    """Another project's account URL from ours: .../v1/AUTH_<ours> -> .../v1/AUTH_<theirs>
    (whatever the reseller prefix)."""
    base, _, account = own_endpoint.rstrip("/").rpartition("/")
    prefix = account[: -len(own_project)] if account.endswith(own_project) else "AUTH_"
    return f"{base}/{prefix}{project_id}"


def _temp_url_key(secret: bytes, project_id: str | None) -> str:
    import hashlib
    import hmac

    # every worker derives the same key from the platform's secret: no race to set it; one per
    # project account, so that one project's key signs nothing in another's
    label = b"stackml swift temp-url key" + (f":{project_id}".encode() if project_id else b"")
    return hmac.new(secret, label, hashlib.sha256).hexdigest()


def reset() -> None:
    _compute.cache_clear()
    _openstack.cache_clear()
    with _trust_lock:
        _trust_backends.clear()
        _project_stores.clear()
        _lookup_caches.clear()
    _swift.cache_clear()
    _store.cache_clear()
