"""The emulated cloud's fixed catalogue: flavors, images, networks, zones, quotas, settings."""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

NAMESPACE = uuid.UUID("5f0c8a52-6d1e-4c1b-9a55-2b6c3e0d7a11")
MAX_MICROVERSION = (2, 100)
MIN_MICROVERSION = (2, 1)
RUNTIME_MOUNT_ROOT = "/opt/stackml/runtimes"  # where a real stackml image carries its runtimes
PRIVATE_CIDR = "127.77.0.0/16"  # sandbox addresses are the servers' fixed IPs
PUBLIC_CIDR = "127.78.0.0/16"  # floating IPs made without a port draw from here


def stable_id(kind: str, name: str) -> str:
    """An id that survives restarts (flavors, images, networks are not stored)."""
    return str(uuid.uuid5(NAMESPACE, f"{kind}:{name}"))


@dataclass(frozen=True)
class FlavorDef:
    name: str
    vcpus: int
    ram: int  # MiB
    disk: int  # GiB
    extra_specs: dict[str, str] = field(default_factory=dict)
    ephemeral: int = 0
    swap: int = 0
    description: str | None = None

    @property
    def id(self) -> str:
        return stable_id("flavor", self.name)


@dataclass(frozen=True)
class ImageDef:
    name: str
    runtime: str | None  # the stackml runtime key mounted at RUNTIME_MOUNT_ROOT/<key>

    @property
    def id(self) -> str:
        return stable_id("image", self.name)


DEFAULT_FLAVORS = (
    FlavorDef("m1.small", 1, 2048, 20),
    FlavorDef("m1.medium", 2, 4096, 40),
    FlavorDef("g1.a100x1", 8, 32768, 100, {"pci_passthrough:alias": "a100:1"}),
    FlavorDef("g1.a100x2", 16, 65536, 200, {"pci_passthrough:alias": "a100:2"}),
    FlavorDef("g1.vgpu", 4, 16384, 50, {"resources:VGPU": "1"}),
)
DEFAULT_IMAGES = (
    ImageDef("stackml-tensorflow-2.21", "tensorflow-2.21"),
    ImageDef("cirros", None),
)
DEFAULT_QUOTA = {"instances": 10, "cores": 64, "ram": 262144}
DEFAULT_ZONES = ("nova", "az2")
PRIVATE_NET = "private"
PUBLIC_NET = "public"


@dataclass
class EmulatorConfig:
    """Everything the emulator is started with (the CLI builds one)."""

    state_dir: Path
    sandbox_root: Path | None = None  # default: <state_dir>/sandboxes
    runtime_root: Path | None = None  # built runtimes: <key>-<hash>/ with a .complete marker
    keystone_url: str | None = None  # None: no auth, everyone is project "admin", role admin
    flavors: tuple[FlavorDef, ...] = DEFAULT_FLAVORS
    images: tuple[ImageDef, ...] = DEFAULT_IMAGES
    zones: tuple[str, ...] = DEFAULT_ZONES
    quota: dict[str, int] = field(default_factory=lambda: dict(DEFAULT_QUOTA))
    isolation: str = "auto"  # of the sandboxes (SandboxBackend)
    login_user: str = "stackml"  # the user a stackml image has (root isolation only)
    boot_delay: float = 0.0  # extra seconds in BUILD after the sandbox is up
    token_cache_seconds: float = 30.0
    # the emulator's own Keystone login for validating tokens (username, password,
    # project_name, user/project_domain_name), as Nova's keystonemiddleware has one
    service_auth: dict[str, str] | None = None

    def __post_init__(self) -> None:
        self.state_dir = Path(os.path.realpath(self.state_dir))
        if self.sandbox_root is None:
            self.sandbox_root = self.state_dir / "sandboxes"

    @property
    def sandboxes(self) -> Path:
        assert self.sandbox_root is not None
        return Path(self.sandbox_root)

    def flavor(self, ref: str) -> FlavorDef | None:
        """By id (or a link to it): Nova's flavorRef is never a name."""
        ref = ref.rstrip("/").rsplit("/", 1)[-1]
        return next((f for f in self.flavors if ref == f.id), None)

    def image(self, ref: str) -> ImageDef | None:
        ref = ref.rstrip("/").rsplit("/", 1)[-1]
        return next((i for i in self.images if ref == i.id), None)

    def runtime_dir(self, key: str) -> Path | None:
        """The newest complete build of runtime `key` under the runtime root."""
        if self.runtime_root is None:
            return None
        try:
            found = [
                p
                for p in Path(self.runtime_root).glob(f"{key}-*")
                if p.is_dir() and (p / ".complete").exists()
            ]
        except OSError:
            return None
        return max(found, key=lambda p: (p / ".complete").stat().st_mtime, default=None)


def parse_images(text: str) -> tuple[ImageDef, ...]:
    """`name=runtime-key,name2=` (an empty key: an image without a stackml runtime)."""
    images = []
    for item in filter(None, (s.strip() for s in text.split(","))):
        name, _, key = item.partition("=")
        if not name:
            raise ValueError(f"bad image mapping {item!r}: expected name=runtime-key")
        images.append(ImageDef(name.strip(), key.strip() or None))
    return tuple(images)


def parse_quota(text: str) -> dict[str, int]:
    quota = dict(DEFAULT_QUOTA)
    for item in filter(None, (s.strip() for s in text.split(","))):
        key, _, value = item.partition("=")
        if key not in quota:
            raise ValueError(f"unknown quota {key!r}; known: {', '.join(quota)}")
        quota[key] = int(value)
    return quota


def parse_flavors(data: Any) -> tuple[FlavorDef, ...]:
    """Flavors from a YAML/JSON list of {name, vcpus, ram, disk, extra_specs}."""
    if not isinstance(data, list):
        raise ValueError("the flavors file must hold a list of flavors")
    return tuple(
        FlavorDef(
            name=str(f["name"]),
            vcpus=int(f["vcpus"]),
            ram=int(f["ram"]),
            disk=int(f.get("disk", 0)),
            extra_specs={str(k): str(v) for k, v in (f.get("extra_specs") or {}).items()},
        )
        for f in data
    )
