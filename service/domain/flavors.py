"""Flavors, no I/O: what a server size is, which flavors fit a GPU request, and the ordered
(flavor, availability zone) plan the allocate step walks when a flavor finds no host."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Flavor:
    name: str
    vcpus: int
    ram_mb: int
    disk_gb: int = 0
    gpus: int = 0
    gpu_type: str | None = None
    price_per_hour: float = 0.0
    pids: int = 4096


def gpu_candidates(flavors: Sequence[Flavor], gpus: int, gpu_type: str | None) -> list[Flavor]:
    """Flavors with at least `gpus` GPUs (of `gpu_type` when given), best fit first."""
    fits = [
        f
        for f in flavors
        if f.gpus >= gpus and (gpu_type is None or (f.gpu_type or "").lower() == gpu_type.lower())
    ]
    return sorted(fits, key=lambda f: (f.gpus, f.price_per_hour, f.vcpus, f.ram_mb, f.name))


def allocation_plan(
    firsts: Sequence[str],
    fallbacks: Mapping[str, Sequence[str]],
    zones: Sequence[str],
    default_flavor: str,
) -> list[tuple[str, str | None]]:
    """The (flavor, availability zone) pairs to try, in order: each of `firsts` (the job's
    flavor, or the best-fitting GPU flavors) followed by its configured fallbacks, without
    repeats, in every zone (none configured: the cloud's default zone, None)."""
    flavors: list[str] = []
    for first in firsts:
        for f in [first, *fallbacks.get(first, [])]:
            if f not in flavors:
                flavors.append(f)
    if not flavors:
        flavors = [default_flavor]
    zone_list: list[str | None] = list(zones) or [None]
    return [(f, z) for f in flavors for z in zone_list]
