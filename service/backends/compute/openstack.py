"""OpenStack compute backend: Nova (+ Neutron, Glance) through openstacksdk (see interfaces.py).

What one server costs in API calls, and why (the bench counts them):
- create: POST keypair, POST server, DELETE keypair. The per-job keypair (named after the
  server) only lives for the create call: Nova copies the public key into the instance when it
  accepts the server, so deleting the keypair right away changes nothing for the server and
  nothing is left to leak when the server vanishes or its creator dies later.
- poll: GET server until ACTIVE/ERROR; once ACTIVE, one console-output call to read the host
  key cloud-init prints (`-----BEGIN SSH HOST KEY KEYS-----`), cached per server.
- with a floating network: once ACTIVE, list floating IPs by description, list the server's
  port, create the floating IP on it (its description names the server id, so a later delete
  finds it even when the server and its port are gone).
- delete: DELETE server (404 is fine), with a floating network also list + delete its floating
  IPs. `get_server` answering DELETED (404) is the confirmation. Then teardown lists the
  servers under the job's tag once (the sweep for servers no record names).
- once per process: version discovery, flavors (cached `flavor_cache_seconds`), the network,
  the image per runtime, and the security group (ensured idempotently: looked up by name,
  created with an SSH ingress rule from `ssh_cidr` when missing).
- a distributed job's replicas (ServerSpec.peer_group): per server, list the job's own group
  `stackml-peers-<job>` (made the first time, with one ingress rule per peer port whose remote
  group is the group itself: its members reach each other on those ports, and nothing else
  does); each server is booted in both groups. Teardown deletes the group once the job's
  servers are gone (`release_peer_group`; Neutron's 409 while a port still holds it is a
  CloudError, retried).

Servers carry metadata stackml-job/-role/-project (= ServerSpec.tags) and Nova tags `stackml`
and `key=value` (where Nova allows the characters) so `list_servers` filters server-side with
`?tags=` and checks the metadata itself (Nova ignores metadata filters).

Faults: Nova's 403 "Quota exceeded" raises QuotaExceeded (the job waits in QUEUED); a server in
ERROR with "No valid host" reports fault_reason "no_valid_host" (the worker retries the next
flavor / zone); a server that is gone reports DELETED; a failing DELETE raises CloudError so the
caller retries. Every remote call has `call_timeout`; errors are chained.
"""

from __future__ import annotations

import collections
import contextlib
import datetime as dt
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import openstack
from keystoneauth1 import exceptions as ksa_exc
from openstack import exceptions as sdk_exc
from openstack.connection import Connection

from service.backends.interfaces import (
    IMAGE_RUNTIMES_DIR,
    Capabilities,
    ComputeBackend,
    ComputeLimits,
    Flavor,
    HostKeySource,
    ServerRef,
    ServerSpec,
    ServerState,
    ServerStatus,
)
from service.domain.errors import (
    AllocationFailed,
    CloudError,
    QuotaExceeded,
    ServerNotFound,
)
from service.domain.states import FailureReason

log = logging.getLogger("stackml.openstack")

MARKER_TAG = "stackml"  # the Nova tag every stackml server carries
FIP_DESCRIPTION = "stackml server {}"  # floating IP description: finds it by server id
HOST_KEYS_RE = re.compile(
    r"-----BEGIN SSH HOST KEY KEYS-----\s*(.*?)-----END SSH HOST KEY KEYS-----", re.S
)
KEY_PREFERENCE = ("ssh-ed25519", "ecdsa-sha2-nistp256", "ecdsa-sha2-nistp384", "ssh-rsa")
NOVA_TAG_RE = re.compile(r"^[^,/]{1,60}$")
KEYPAIR_UNSAFE = re.compile(r"[^a-zA-Z0-9 _-]")  # keypair names before microversion 2.92
NO_VALID_HOST = "no valid host"
# Nova statuses that are a server still there, only busy: reported ACTIVE
BUSY = {
    "REBOOT",
    "HARD_REBOOT",
    "MIGRATING",
    "RESIZE",
    "VERIFY_RESIZE",
    "REVERT_RESIZE",
    "PASSWORD",
}
SEGMENT_IDS = {
    "servers",
    "flavors",
    "os-keypairs",
    "images",
    "networks",
    "subnets",
    "ports",
    "floatingips",
    "security-groups",
    "security-group-rules",
    "os-extra_specs",
    "tags",
    "metadata",
    "tokens",
    "_stackml",
}
PEER_GROUP_NAME = "stackml-peers-{}"  # a distributed job's security group (its job id)
_ID_LIKE = re.compile(r"^[0-9a-fA-F-]{16,}$")


@dataclass
class LookupCache:
    """What a backend looks up once and keeps: the flavors, network and image ids, the SSH
    security group. Per project: backends acting in one project (a trust each) may share one."""

    flavors: list[Flavor] = field(default_factory=list)
    flavor_ids: dict[str, str] = field(default_factory=dict)
    flavors_at: float = 0.0
    ids: dict[tuple[str, str], str] = field(default_factory=dict)  # (kind, name) -> id
    sg_id: str | None = None


class ApiCallCounter:
    """Counts the HTTP requests a connection makes, by `METHOD /path-template?query-keys`
    (ids replaced by {id}); hooked into the requests session under keystoneauth."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: collections.Counter[str] = collections.Counter()

    def hook(self, response: Any, *args: Any, **kwargs: Any) -> None:
        req = response.request
        with self._lock:
            self._counts[f"{req.method} {template(req.url)}"] += 1

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(sorted(self._counts.items()))

    def total(self) -> int:
        with self._lock:
            return sum(self._counts.values())

    def reset(self) -> None:
        with self._lock:
            self._counts.clear()


def template(url: str) -> str:
    """A URL as a call kind: `/compute/v2.1/servers/{id}?tags` (ids and query values dropped)."""
    parts = urlsplit(url)
    segs = parts.path.rstrip("/").split("/")
    out = []
    for i, seg in enumerate(segs):
        prev = segs[i - 1] if i else ""
        if _ID_LIKE.match(seg) or (
            prev in SEGMENT_IDS
            and seg not in ("detail", "action")
            and seg not in SEGMENT_IDS
            and seg
        ):
            out.append("{id}")
        else:
            out.append(seg)
    keys = sorted({k for k, _ in parse_qsl(parts.query, keep_blank_values=True)})
    return "/".join(out) + ("?" + "&".join(keys) if keys else "")


def gpus_of(specs: Mapping[str, str], aliases: Mapping[str, str]) -> tuple[int, str | None]:
    """(GPU count, stackml GPU type) from a flavor's extra specs.

    `pci_passthrough:alias` = "a100:2" (or "a100:1,t4:1"); `resources:VGPU` / `resources:PGPU`
    = count; any `resources:<RC>` whose resource class is a key of `aliases` (e.g. a cloud's
    CUSTOM_A100) also counts. The type is `aliases[cloud name]`, else the cloud name lowercased;
    for VGPU/PGPU a required trait named in `aliases` (trait:CUSTOM_NVIDIA_A100) names it."""
    count, kind = 0, None
    alias = specs.get("pci_passthrough:alias")
    if alias:
        entries = []
        for item in alias.split(","):
            name, _, n = item.strip().partition(":")
            if name:
                entries.append((name, int(n) if n.strip().isdigit() else 1))
        if entries:
            count = sum(n for _, n in entries)
            top = max(entries, key=lambda e: e[1])[0]
            kind = aliases.get(top, top.lower())
    for key, value in specs.items():
        if not key.startswith("resources:") or not str(value).strip().isdigit():
            continue
        rc = key.split(":", 1)[1]
        if rc in ("VGPU", "PGPU") or rc in aliases:
            count += int(value)
            if kind is None:
                kind = aliases.get(rc, rc.lower())
                if rc in ("VGPU", "PGPU"):
                    traits = [
                        k.split(":", 1)[1]
                        for k, v in specs.items()
                        if k.startswith("trait:") and v == "required"
                    ]
                    kind = next((aliases[t] for t in traits if t in aliases), kind)
    return count, (kind if count else None)


def parse_host_key(console: str) -> str | None:
    """The host key (`type base64`) from cloud-init's console block; ed25519 preferred."""
    found: dict[str, str] = {}
    for block in HOST_KEYS_RE.findall(console):
        for line in block.splitlines():
            fields = line.split()
            if len(fields) >= 2 and fields[0] in KEY_PREFERENCE:
                found.setdefault(fields[0], f"{fields[0]} {fields[1]}")
    return next((found[k] for k in KEY_PREFERENCE if k in found), None)


def keypair_name(server_name: str) -> str:
    return KEYPAIR_UNSAFE.sub("-", server_name)[:255]


def nova_tags(tags: tuple[tuple[str, str], ...]) -> list[str]:
    out = [MARKER_TAG]
    out += [f"{k}={v}" for k, v in tags if NOVA_TAG_RE.match(f"{k}={v}")]
    return out


def _parse_time(value: str | None) -> float | None:
    if not value:
        return None
    try:
        t = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return (t if t.tzinfo else t.replace(tzinfo=dt.UTC)).timestamp()


def _message(e: BaseException) -> str:
    details = getattr(e, "details", None)
    return str(details or e).strip()


class OpenStackBackend(ComputeBackend):
    """Nova servers booted from the runtime's Glance image; see the module docstring."""

    name = "openstack"
    capabilities = Capabilities(HostKeySource.CONSOLE, runtimes_dir=IMAGE_RUNTIMES_DIR)

    def __init__(
        self,
        conn: str | Callable[[], Connection] | None = None,
        *,
        network: str,
        floating_network: str | None = None,
        security_group: str = "stackml-ssh",
        ssh_cidr: str = "0.0.0.0/0",
        ssh_user: str = "stackml",
        ssh_port: int = 22,
        images: Mapping[str, str],
        gpu_aliases: Mapping[str, str] | None = None,
        prices: Mapping[str, float] | None = None,
        call_timeout: float = 30.0,
        flavor_cache_seconds: float = 60.0,
        shared_cache: Callable[[str], LookupCache] | None = None,
    ) -> None:
        """`conn`: a clouds.yaml cloud name, a factory returning an openstacksdk Connection, or
        None (OS_CLOUD / OS_* variables). `network`, `floating_network`: names or ids;
        `images`: runtime key -> Glance image name; `gpu_aliases`: cloud GPU name -> stackml
        gpu_type; `prices`: flavor name -> price per hour; `shared_cache`: project id -> the
        LookupCache to use (shared by the backends of one project), else one of its own."""
        self._conn_source = conn
        self.network = network
        self.floating_network = floating_network
        self.security_group = security_group
        self.ssh_cidr = ssh_cidr
        self.ssh_user = ssh_user
        self.ssh_port = ssh_port
        self.images = dict(images)
        self.gpu_aliases = dict(gpu_aliases or {})
        self.prices = dict(prices or {})
        self.call_timeout = call_timeout
        self.flavor_cache_seconds = flavor_cache_seconds
        self.calls = ApiCallCounter()
        self._lock = threading.RLock()
        self._connection: Connection | None = None
        self._pid = 0
        self._cache = LookupCache()
        self._cache_for = shared_cache
        self._cache_bound = shared_cache is None
        self._host_keys: collections.OrderedDict[str, str] = collections.OrderedDict()

    # ------------------------------------------------------------------ connection

    def connection(self) -> Connection:
        """This backend's connection (made on first use, BackendError if it cannot be; it logs
        in on its first call), e.g. to delete the trust it acts through without another login."""
        return self._conn()

    def _conn(self) -> Connection:
        with self._lock:
            if self._connection is None or self._pid != os.getpid():
                self._connection = self._connect()
                self._pid = os.getpid()
                self._host_keys.clear()
            return self._connection

    def _connect(self) -> Connection:
        src = self._conn_source
        with self._translate("connecting to the cloud"):
            if callable(src):
                conn = src()
            else:
                conn = openstack.connect(cloud=src, api_timeout=self.call_timeout)
        session = conn.session
        if session.timeout is None:
            session.timeout = self.call_timeout  # every request, auth included, is bounded
        session.session.hooks["response"].append(self.calls.hook)
        return conn

    def _lookups(self) -> LookupCache:
        """This backend's LookupCache; a shared one is picked once the project is known."""
        if not self._cache_bound:
            assert self._cache_for is not None
            conn = self._conn()
            with self._translate("finding the project"):
                project = conn.current_project_id  # from the token: no extra call
            with self._lock:
                if not self._cache_bound:
                    self._cache = self._cache_for(str(project))
                    self._cache_bound = True
        return self._cache

    @contextlib.contextmanager
    def _translate(self, what: str) -> Iterator[None]:
        """SDK and transport errors -> stackml errors (403 quota -> QuotaExceeded), chained."""
        try:
            yield
        except sdk_exc.ForbiddenException as e:
            msg = _message(e)
            if "quota exceeded" in msg.lower():
                raise QuotaExceeded(f"{what}: {msg}") from e
            raise CloudError(f"{what}: {msg}") from e
        except (sdk_exc.SDKException, ksa_exc.ClientException) as e:
            raise CloudError(f"{what}: {_message(e)}") from e

    # ------------------------------------------------------------------ flavors

    def flavors(self) -> list[Flavor]:
        c = self._lookups()
        with self._lock:
            if c.flavors and time.monotonic() - c.flavors_at < self.flavor_cache_seconds:
                return list(c.flavors)
        conn = self._conn()
        with self._translate("listing flavors"):
            raw = list(conn.compute.flavors(details=True))
            endpoint = conn.compute.get_endpoint_data()
            inline = bool(endpoint and (endpoint.max_microversion or (2, 0)) >= (2, 61))
            specs = {}
            for f in raw:
                # inline from microversion 2.61; an older cloud needs one call per flavor
                extra = f.extra_specs
                if not inline:
                    extra = conn.compute.fetch_flavor_extra_specs(f).extra_specs
                specs[f.id] = {str(k): str(v) for k, v in (extra or {}).items()}
        flavors, ids = [], {}
        for f in raw:
            gpus, gpu_type = gpus_of(specs[f.id], self.gpu_aliases)
            flavors.append(
                Flavor(
                    name=f.name,
                    vcpus=int(f.vcpus or 0),
                    ram_mb=int(f.ram or 0),
                    disk_gb=int(f.disk or 0),
                    gpus=gpus,
                    gpu_type=gpu_type,
                    price_per_hour=float(self.prices.get(f.name, 0.0)),
                )
            )
            ids[f.name] = f.id
        flavors.sort(key=lambda f: (f.gpus, f.vcpus, f.ram_mb, f.name))
        with self._lock:
            c.flavors, c.flavor_ids, c.flavors_at = flavors, ids, time.monotonic()
        return list(flavors)

    def resolve_flavor(self, gpus: int, gpu_type: str | None = None) -> list[Flavor]:
        """Flavors that give at least `gpus` GPUs (of `gpu_type` when given), smallest first;
        with gpus=0, the flavors without GPUs."""
        found = [
            f
            for f in self.flavors()
            if (f.gpus >= gpus if gpus else f.gpus == 0)
            and (gpu_type is None or f.gpu_type == gpu_type)
        ]
        return sorted(found, key=lambda f: (f.gpus, f.vcpus, f.ram_mb, f.price_per_hour, f.name))

    def _flavor_id(self, name: str) -> str:
        c = self._lookups()
        with self._lock:
            fid = c.flavor_ids.get(name)
        if fid is None:
            with self._lock:
                c.flavors_at = 0.0
            self.flavors()
            with self._lock:
                fid = c.flavor_ids.get(name)
        if fid is None:
            raise AllocationFailed(f"flavor {name!r} is not offered by this cloud")
        return fid

    # ------------------------------------------------------------------ lookups (cached)

    def _network_id(self, ref: str) -> str:
        key = ("network", ref)
        c = self._lookups()
        with self._lock:
            if key in c.ids:
                return c.ids[key]
        conn = self._conn()
        with self._translate(f"finding network {ref!r}"):
            nets = list(conn.network.networks(name=ref))
            if not nets:
                with contextlib.suppress(sdk_exc.NotFoundException):
                    nets = [conn.network.get_network(ref)]
        if len(nets) != 1:
            raise AllocationFailed(
                f"network {ref!r} " + ("does not exist" if not nets else "is ambiguous")
            )
        with self._lock:
            c.ids[key] = nets[0].id
        return str(nets[0].id)

    def _image_id(self, runtime: str) -> str:
        image = self.images.get(runtime)
        if image is None:
            raise AllocationFailed(f"no Glance image is configured for runtime {runtime!r}")
        key = ("image", image)
        c = self._lookups()
        with self._lock:
            if key in c.ids:
                return c.ids[key]
        with self._translate(f"finding image {image!r}"):
            found = [i for i in self._conn().image.images(name=image) if i.status == "active"]
        if not found:
            raise AllocationFailed(f"image {image!r} (runtime {runtime}) is not in Glance")
        newest = max(found, key=lambda i: i.created_at or "")
        with self._lock:
            c.ids[key] = newest.id
        return str(newest.id)

    def _security_group_id(self) -> str:
        """The SSH security group, made once if missing (idempotent across workers)."""
        c = self._lookups()
        with self._lock:
            if c.sg_id is not None:
                return c.sg_id
        conn = self._conn()
        name = self.security_group
        with self._translate(f"ensuring security group {name!r}"):
            # this project's own: an admin (or a trust with admin) sees every project's groups
            project = conn.current_project_id
            groups = list(conn.network.security_groups(name=name, project_id=project))
            if not groups:
                conn.network.create_security_group(
                    name=name, description="stackml: SSH from the workers"
                )
                # another worker may have made one too: everyone settles on the oldest
                groups = list(conn.network.security_groups(name=name, project_id=project))
            groups.sort(key=lambda g: (g.created_at or "", g.id))
            sg = groups[0]
            self._admit(
                sg,
                [self.ssh_port],
                "stackml workers reach servers over SSH",
                remote_ip_prefix=self.ssh_cidr,
            )
        with self._lock:
            c.sg_id = sg.id
        return str(sg.id)

    @property
    def peer_network(self) -> str | None:
        return None  # a security group per peer group (`_peer_group_id`)

    def _peer_groups(self, group: str) -> list[Any]:
        """The project's security groups of peer group `group`, the oldest first."""
        conn = self._conn()
        found = list(
            conn.network.security_groups(
                name=PEER_GROUP_NAME.format(group), project_id=conn.current_project_id
            )
        )
        return sorted(found, key=lambda g: (g.created_at or "", g.id))

    def _peer_group_id(self, group: str, ports: tuple[int, ...]) -> str:
        """The security group of peer group `group` (a distributed job's replicas), made the
        first time with an ingress rule per port of `ports` from the group's own members
        (remote group = itself); idempotent across workers, which settle on the oldest."""
        name = PEER_GROUP_NAME.format(group)
        conn = self._conn()
        with self._translate(f"ensuring security group {name!r}"):
            groups = self._peer_groups(group)
            if not groups:
                conn.network.create_security_group(
                    name=name, description=f"stackml: the replicas of job {group} reach each other"
                )
                groups = self._peer_groups(group)
            sg = groups[0]
            self._admit(
                sg,
                sorted({int(p) for p in ports}),
                "stackml: a distributed job's replicas reach each other",
                remote_group_id=sg.id,
            )
        return str(sg.id)

    def release_peer_group(self, group: str) -> None:
        """Delete peer group `group`'s security group(s); CloudError while a port (a server
        on its way out) still holds one: the caller retries."""
        conn = self._conn()
        with self._translate(f"deleting security group {PEER_GROUP_NAME.format(group)!r}"):
            for sg in self._peer_groups(group):
                conn.network.delete_security_group(sg, ignore_missing=True)

    def _ensure_ingress(self, sg_id: str, ports: tuple[int, ...]) -> None:
        """A rule in the group admitting TCP to each of `ports` (ServerSpec.ingress_ports: a
        serving replica's REST port) from `ssh_cidr`, where the workers and the API are; made
        once per port (idempotent across workers)."""
        wanted = sorted({int(p) for p in ports if int(p) != self.ssh_port})
        if not wanted:
            return
        conn = self._conn()
        with self._translate(f"ensuring ingress rules {wanted} in security group {sg_id}"):
            self._admit(
                conn.network.get_security_group(sg_id),
                wanted,
                "stackml: the API reaches serving replicas",
                remote_ip_prefix=self.ssh_cidr,
            )

    def _admit(self, sg: Any, ports: list[int], description: str, **source: str) -> None:
        """An ingress TCP rule in group `sg` for each of `ports` from `source` (one of
        remote_ip_prefix, remote_group_id), unless a rule of the group already admits it;
        a rule another worker made meanwhile (409) is as good. Inside `_translate`."""
        [(key, value)] = source.items()
        conn = self._conn()
        for port in ports:
            if any(
                r.get("direction") == "ingress"
                and r.get("protocol") == "tcp"
                and (r.get("port_range_min") or 0) <= port <= (r.get("port_range_max") or 65535)
                and r.get(key) == value
                for r in sg.security_group_rules or []
            ):
                continue
            with contextlib.suppress(sdk_exc.ConflictException):
                conn.network.create_security_group_rule(
                    security_group_id=sg.id,
                    direction="ingress",
                    ethertype="IPv4",
                    protocol="tcp",
                    port_range_min=port,
                    port_range_max=port,
                    description=description,
                    **source,
                )

    # ------------------------------------------------------------------ servers

    def create_server(self, spec: ServerSpec) -> ServerRef:
        """Returns once Nova accepted the server (BUILD); QuotaExceeded on Nova's 403."""
        flavor_id = self._flavor_id(spec.flavor.name)
        image_id = self._image_id(spec.image)
        net_id = self._network_id(self.network)
        sg_id = self._security_group_id()
        self._ensure_ingress(sg_id, spec.ingress_ports)
        groups = [{"name": sg_id}]
        if spec.peer_group is not None:
            groups.append({"name": self._peer_group_id(spec.peer_group, spec.peer_ports)})
        conn = self._conn()
        kp = keypair_name(spec.name)
        with self._translate(f"creating keypair {kp}"):
            try:
                conn.compute.create_keypair(name=kp, public_key=spec.public_key.strip())
            except sdk_exc.ConflictException:
                # left by a create that died between its calls: ours by name, replace it
                conn.compute.delete_keypair(kp, ignore_missing=True)
                conn.compute.create_keypair(name=kp, public_key=spec.public_key.strip())
        try:
            with self._translate(f"creating server {spec.name}"):
                try:
                    server = conn.compute.create_server(
                        name=spec.name,
                        flavor_id=flavor_id,
                        image_id=image_id,
                        networks=[{"uuid": net_id}],
                        key_name=kp,
                        metadata=dict(spec.tags),
                        tags=nova_tags(spec.tags),
                        security_groups=groups,
                        **(
                            {"availability_zone": spec.availability_zone}
                            if spec.availability_zone
                            else {}
                        ),
                    )
                except sdk_exc.BadRequestException as e:
                    raise AllocationFailed(f"Nova refused server {spec.name}: {_message(e)}") from e
        finally:
            try:
                with self._translate(f"deleting keypair {kp}"):
                    conn.compute.delete_keypair(kp, ignore_missing=True)
            except CloudError as e:
                # the server (if any) is made; failing now would orphan it. The next create
                # of this name replaces the keypair.
                log.warning("keypair %s was not deleted: %s", kp, e)
        log.info("server %s (%s) accepted by Nova as %s", spec.name, spec.flavor.name, server.id)
        return ServerRef(id=server.id, name=spec.name, tags=spec.tags)

    def get_server(self, server_id: str) -> ServerStatus:
        conn = self._conn()
        with self._translate(f"reading server {server_id}"):
            try:
                s = conn.compute.get_server(server_id)
            except sdk_exc.NotFoundException:
                self._forget(server_id)
                return ServerStatus(id=server_id, state=ServerState.DELETED)
        status = (s.status or "").upper()
        created = _parse_time(s.created_at)
        common: dict[str, Any] = {
            "port": self.ssh_port,
            "username": self.ssh_user,
            "created_at": created,
        }
        if status in ("DELETED", "SOFT_DELETED"):
            return ServerStatus(id=server_id, state=ServerState.DELETED, **common)
        fixed, floating = self._addresses(s.addresses or {})
        common["host"] = floating or fixed
        common["peer_host"] = fixed  # a job's replicas reach each other on the fixed network
        if status == "BUILD":
            return ServerStatus(id=server_id, state=ServerState.BUILD, **common)
        if status == "ERROR":
            message = str((s.fault or {}).get("message") or "the server is in ERROR")
            reason = FailureReason.NO_VALID_HOST if NO_VALID_HOST in message.lower() else None
            return ServerStatus(
                id=server_id, state=ServerState.ERROR, fault=message, fault_reason=reason, **common
            )
        if status != "ACTIVE" and status not in BUSY:
            return ServerStatus(
                id=server_id,
                state=ServerState.ERROR,
                fault=f"the server is {status or 'in an unknown state'}",
                **common,
            )
        if self.floating_network and not floating and fixed:
            common["host"] = self._ensure_floating_ip(server_id) or fixed
        common["host_key"] = self._host_key(server_id)
        return ServerStatus(id=server_id, state=ServerState.ACTIVE, **common)

    def _addresses(self, addresses: Mapping[str, Any]) -> tuple[str | None, str | None]:
        """(fixed, floating) IPv4 addresses, those on the configured network first."""
        nets = sorted(addresses, key=lambda n: n != self.network)
        fixed = floating = None
        for net in nets:
            for a in addresses[net] or []:
                if a.get("version", 4) != 4:
                    continue
                if a.get("OS-EXT-IPS:type") == "floating":
                    floating = floating or a.get("addr")
                else:
                    fixed = fixed or a.get("addr")
        return fixed, floating

    def _ensure_floating_ip(self, server_id: str) -> str | None:
        assert self.floating_network is not None
        conn = self._conn()
        marker = FIP_DESCRIPTION.format(server_id)
        with self._translate(f"floating IP for server {server_id}"):
            fips = list(conn.network.ips(description=marker))
            if fips and fips[0].port_id:
                return str(fips[0].floating_ip_address)
            ports = list(conn.network.ports(device_id=server_id))
            if not ports:
                return None  # not plugged yet: the next poll tries again
            if fips:
                fip = conn.network.update_ip(fips[0], port_id=ports[0].id)
            else:
                fip = conn.network.create_ip(
                    floating_network_id=self._network_id(self.floating_network),
                    port_id=ports[0].id,
                    description=marker,
                )
        return str(fip.floating_ip_address)

    def _host_key(self, server_id: str) -> str | None:
        with self._lock:
            if server_id in self._host_keys:
                return self._host_keys[server_id]
        try:
            console = self._console(server_id, None)
        except (CloudError, ServerNotFound) as e:
            log.info("console of server %s not readable yet: %s", server_id, e)
            return None
        key = parse_host_key(console)
        if key is not None:
            with self._lock:
                self._host_keys[server_id] = key
                while len(self._host_keys) > 1024:
                    self._host_keys.popitem(last=False)
        return key

    def _forget(self, server_id: str) -> None:
        with self._lock:
            self._host_keys.pop(server_id, None)

    def delete_server(self, server_id: str) -> None:
        """Idempotent; a refused DELETE raises CloudError (the caller retries)."""
        conn = self._conn()
        with self._translate(f"deleting server {server_id}"):
            conn.compute.delete_server(server_id, ignore_missing=True)
        if self.floating_network:
            marker = FIP_DESCRIPTION.format(server_id)
            with self._translate(f"deleting the floating IPs of server {server_id}"):
                for fip in conn.network.ips(description=marker):
                    conn.network.delete_ip(fip, ignore_missing=True)
        self._forget(server_id)

    def list_servers(self, tag: tuple[str, str] | None = None) -> list[ServerRef]:
        wanted = [MARKER_TAG]
        if tag is not None and NOVA_TAG_RE.match(f"{tag[0]}={tag[1]}"):
            wanted.append(f"{tag[0]}={tag[1]}")
        with self._translate("listing servers"):
            servers = list(self._conn().compute.servers(details=True, tags=",".join(wanted)))
        refs = []
        for s in servers:
            meta = dict(s.metadata or {})
            if tag is not None and meta.get(tag[0]) != tag[1]:
                continue  # Nova matched the tag only; the metadata is the record
            refs.append(ServerRef(id=s.id, name=s.name, tags=tuple(meta.items())))
        return refs

    def console_log(self, server_id: str, tail_bytes: int = 8192) -> str:
        return self._console(server_id, max(50, tail_bytes // 40))[-tail_bytes:]

    def _console(self, server_id: str, lines: int | None) -> str:
        with self._translate(f"reading the console of server {server_id}"):
            try:
                out = self._conn().compute.get_server_console_output(server_id, length=lines)
            except sdk_exc.NotFoundException as e:
                raise ServerNotFound(f"server {server_id} does not exist") from e
        return str(out.get("output") or "")

    # ------------------------------------------------------------------ quotas

    def limits(self) -> ComputeLimits:
        with self._translate("reading compute limits"):
            a = self._conn().compute.get_limits().absolute

        def n(v: Any) -> int:
            return -1 if v is None else int(v)

        return ComputeLimits(
            max_instances=n(a.instances),
            instances_used=n(a.instances_used),
            max_cores=n(a.total_cores),
            cores_used=n(a.total_cores_used),
            max_ram_mb=n(a.total_ram),
            ram_used_mb=n(a.total_ram_used),
        )
