"""Contracts of the compute and storage backends; implementations say "see interfaces.py"."""

from __future__ import annotations

import abc
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import ClassVar

# flavors live in the domain; imported from here too (explicit re-exports)
from service.domain.flavors import Flavor as Flavor
from service.domain.flavors import gpu_candidates as gpu_candidates


@dataclass(frozen=True)
class ServerSpec:
    """What to boot. `name` is unique per server; `tags` let the reaper find it by job."""

    name: str
    flavor: Flavor
    image: str  # the runtime key, e.g. "tensorflow-2.21"
    public_key: str  # OpenSSH "ssh-ed25519 AAAA..." line, the job's own key
    tags: tuple[tuple[str, str], ...] = ()
    availability_zone: str | None = None
    # TCP ports the server must accept connections on from the platform (a serving replica's
    # REST port), besides SSH: the sandbox's network namespace admits them, Nova a rule
    ingress_ports: tuple[int, ...] = ()
    # servers booted with the same peer_group (a distributed job's replicas) reach each other on
    # `peer_ports`, and nothing else does (ComputeBackend.peer_network says whether it can)
    peer_group: str | None = None
    peer_ports: tuple[int, ...] = ()
    # the server's place in its peer group (a replica's index): a backend whose capabilities
    # say stable_peer_addresses gives the server of an index the same peer address each time,
    # so that a replacement is reached where the replica it replaces was
    peer_index: int | None = None


@dataclass(frozen=True)
class ServerRef:
    id: str
    name: str
    tags: tuple[tuple[str, str], ...] = ()


class ServerState(StrEnum):
    BUILD = "BUILD"
    ACTIVE = "ACTIVE"
    ERROR = "ERROR"
    DELETED = "DELETED"  # gone (or never existed)


@dataclass(frozen=True)
class ServerStatus:
    id: str
    state: ServerState
    host: str | None = None  # address the workers reach it on
    port: int = 22
    username: str | None = None
    host_key: str | None = None  # "ssh-ed25519 AAAA..." to pin; None means trust on first use
    fault: str | None = None
    fault_reason: str | None = None  # a failure slug when classifiable, e.g. "no_valid_host"
    created_at: float | None = None  # unix seconds; the reaper's grace period needs an age
    peer_host: str | None = None  # the address its peer group reaches it on (None: `host`)


IMAGE_RUNTIMES_DIR = "/opt/stackml/runtimes"  # where stackml's images carry the runtimes


class HostKeySource(StrEnum):
    """Where the workers learn a server's SSH host key, to pin it before the first connection."""

    RECORD = "record"  # the backend knows it once the server is ACTIVE (the sandbox)
    CONSOLE = "console"  # cloud-init prints it on the console shortly after ACTIVE: wait for it


@dataclass(frozen=True)
class Capabilities:
    """What a backend can do, for the workers to read instead of branching on its name."""

    host_key_source: HostKeySource = HostKeySource.CONSOLE
    # where the image carries the runtimes (<dir>/<runtime key>); None: the server sees the
    # worker's own runtime builds at their paths (the sandbox)
    runtimes_dir: str | None = IMAGE_RUNTIMES_DIR
    # a peer group's server of a given ServerSpec.peer_index always gets the same peer address
    # (a replacement replica is reached where the lost one was, as ParameterServerStrategy's
    # coordinator needs to take a worker back)
    stable_peer_addresses: bool = False


@dataclass(frozen=True)
class ComputeLimits:
    """The cloud project's absolute limits and what it uses; -1 is unlimited."""

    max_instances: int
    instances_used: int
    max_cores: int
    cores_used: int
    max_ram_mb: int
    ram_used_mb: int

    def fits(self, flavor: Flavor, count: int = 1) -> bool:
        """Whether `count` more servers of `flavor` fit in what is left."""

        def ok(limit: int, used: int, more: int) -> bool:
            return limit < 0 or used + more <= limit

        return (
            ok(self.max_instances, self.instances_used, count)
            and ok(self.max_cores, self.cores_used, count * flavor.vcpus)
            and ok(self.max_ram_mb, self.ram_used_mb, count * flavor.ram_mb)
        )


class ComputeBackend(abc.ABC):
    """Boots and deletes servers (Nova VMs, or local sandboxes)."""

    name: str
    capabilities: ClassVar[Capabilities] = Capabilities()

    def limits(self) -> ComputeLimits | None:
        """The project's limits in the cloud (Nova's absolute limits), or None for a backend
        that has none (the sandbox); BackendError when the cloud cannot say."""
        return None

    @property
    def peer_network(self) -> str | None:
        """Why this backend cannot connect a peer group's servers (ServerSpec.peer_group) to
        each other alone; None when it can."""
        return f"the {self.name} backend cannot connect a distributed job's servers yet"

    def release_peer_group(self, group: str) -> None:  # noqa: B027 - optional hook
        """Free what connected peer group `group`'s servers (called by the job's teardown once
        they are all deleted; idempotent). Nothing by default: the sandbox's bridge goes with
        its last member."""

    @abc.abstractmethod
    def flavors(self) -> list[Flavor]: ...

    @abc.abstractmethod
    def create_server(self, spec: ServerSpec) -> ServerRef:
        """Start booting; returns at once (state BUILD or ACTIVE)."""

    @abc.abstractmethod
    def get_server(self, server_id: str) -> ServerStatus:
        """Current state; DELETED when the server is gone."""

    @abc.abstractmethod
    def delete_server(self, server_id: str) -> None:
        """Idempotent: deleting a server that is gone is not an error."""

    @abc.abstractmethod
    def list_servers(self, tag: tuple[str, str] | None = None) -> list[ServerRef]:
        """Servers this backend made (optionally with a tag), for the reaper and leak checks."""

    @abc.abstractmethod
    def console_log(self, server_id: str, tail_bytes: int = 8192) -> str: ...

    def find_flavor(self, name: str) -> Flavor | None:
        return next((f for f in self.flavors() if f.name == name), None)


class Access(StrEnum):
    READ = "read"
    WRITE = "write"


@dataclass(frozen=True)
class Grant:
    """A scoped, time-limited permission on a prefix of the store, used by the VM directly.

    `url_prefix` + object key (relative to `prefix`) + `query` gives a signed URL;
    `sign(key)` builds it for one object.
    """

    prefix: str  # store key prefix, e.g. "projects/p1/models/job-x/"
    access: Access
    expires_at: int  # unix seconds
    url_prefix: str  # e.g. "http://127.0.0.1:8080/v1/store/projects/p1/models/job-x/"
    query: str  # e.g. "temp_url_sig=...&temp_url_expires=...&temp_url_prefix=..."
    # files larger than this go up as Static Large Objects in segments of this size (0: never)
    segment_bytes: int = 0


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int
    etag: str  # md5 hex of the body


@dataclass(frozen=True)
class StoredModel:
    uri: str
    objects: tuple[ObjectInfo, ...] = field(default_factory=tuple)


class ObjectStore(abc.ABC):
    """Objects addressed by key; URIs are `<scheme>://<key>`."""

    scheme: str

    @abc.abstractmethod
    def put(self, key: str, data: bytes) -> ObjectInfo: ...

    @abc.abstractmethod
    def put_file(self, key: str, path: str) -> ObjectInfo: ...

    @abc.abstractmethod
    def get(self, key: str) -> bytes: ...

    @abc.abstractmethod
    def list(self, prefix: str) -> list[ObjectInfo]: ...

    @abc.abstractmethod
    def info(self, key: str) -> ObjectInfo | None:
        """One object's size and etag, asked of the object itself (Swift: HEAD); None when
        there is no such object. Unlike `list`, never behind a write that has returned."""

    @abc.abstractmethod
    def delete(self, key: str) -> None:
        """Idempotent."""

    @abc.abstractmethod
    def grant(self, prefix: str, access: Access, ttl_seconds: int) -> Grant: ...

    def put_manifest(
        self, key: str, segments: Sequence[ObjectInfo], expected_etag: str | None = None
    ) -> ObjectInfo:
        """Join segment objects already in the store into one object at `key` (Swift: an SLO
        manifest, which a TempURL cannot create); a segment mismatch is a StoreError."""
        from service.domain.errors import StoreError

        raise StoreError(f"the {self.scheme} store does not join segments", reason="upload_failed")

    def delete_prefix(self, prefix: str) -> int:
        """Delete every object under `prefix` (segments included); returns how many."""
        infos = self.list(prefix)
        for info in infos:
            self.delete(info.key)
        return len(infos)

    def delete_keys(self, keys: Iterable[str], *, within: str | None = None) -> int:
        """Delete exactly these objects and nothing else (a large object's manifest takes its
        segments with it); idempotent: a key with no object is no error. Returns how many of
        them existed. With `within`, every key must start with it, or ValueError is raised
        before anything is deleted (a job's export removing only what it wrote)."""
        # every key is checked (info raises ValueError for a malformed one) before any goes
        existing = [k for k in self._keys_to_delete(keys, within) if self.info(k) is not None]
        for key in existing:
            self.delete(key)
        return len(existing)

    @staticmethod
    def _keys_to_delete(keys: Iterable[str], within: str | None) -> tuple[str, ...]:
        if isinstance(keys, str | bytes):
            raise TypeError("delete_keys takes a collection of keys, not one key")
        todo = tuple(dict.fromkeys(keys))
        for key in todo:
            if not isinstance(key, str) or not key:
                raise ValueError(f"not an object key: {key!r}")
            if within is not None and not key.startswith(within):
                raise ValueError(f"{key!r} is outside {within!r}; nothing was deleted")
        return todo

    def project_prefix(self, project_id: str) -> str:
        """The key prefix that holds everything of one project (its staging area, models)."""
        return f"projects/{project_id}/"

    def uri(self, key: str) -> str:
        return f"{self.scheme}://{key}"

    def key_of(self, uri: str) -> str:
        scheme, sep, key = uri.partition("://")
        if not sep or scheme != self.scheme:
            raise ValueError(f"{uri!r} is not a {self.scheme}:// URI")
        return key
