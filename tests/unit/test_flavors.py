"""Flavor choice in the domain (service/domain/flavors.py): the allocation plan, no I/O."""

from __future__ import annotations

from service.backends import interfaces
from service.domain.flavors import Flavor, allocation_plan, gpu_candidates


def test_the_plan_walks_each_flavor_then_its_fallbacks_in_every_zone_without_repeats() -> None:
    plan = allocation_plan(
        ["gpu.a", "gpu.b"], {"gpu.a": ["gpu.b", "gpu.c"], "gpu.b": ["gpu.a"]}, ["z1", "z2"], "d"
    )
    assert plan == [
        ("gpu.a", "z1"),
        ("gpu.a", "z2"),
        ("gpu.b", "z1"),
        ("gpu.b", "z2"),
        ("gpu.c", "z1"),
        ("gpu.c", "z2"),
    ]


def test_no_candidate_falls_back_to_the_default_flavor_in_the_default_zone() -> None:
    assert allocation_plan([], {}, [], "local.small") == [("local.small", None)]


def test_gpu_candidates_best_fit_first_and_the_backends_contract_names_the_same_types() -> None:
    fl = [Flavor("big", 8, 1, gpus=4, gpu_type="a100"), Flavor("one", 4, 1, gpus=1)]
    assert [f.name for f in gpu_candidates(fl, 1, None)] == ["one", "big"]
    assert [f.name for f in gpu_candidates(fl, 1, "A100")] == ["big"]
    assert interfaces.Flavor is Flavor and interfaces.gpu_candidates is gpu_candidates
