"""How often allocate looks at a building server (workers/steps/allocate.py build_recheck)."""

from __future__ import annotations

import pytest

from workers.steps.allocate import BUILD_RECHECK_MAX, BUILD_RECHECK_MIN, build_recheck


def looks_until(active_at: float, deadline: float = 600.0) -> tuple[int, float]:
    """(status calls, when the server is seen ACTIVE) for a boot of `active_at` s, looked at
    once right after the create and then after each build_recheck."""
    t, looks = 0.0, 1
    while t < active_at:
        t += build_recheck(t, deadline)
        looks += 1
    return looks, t


def test_a_nova_boot_of_30s_costs_at_most_15_looks_and_is_seen_soon_after() -> None:
    looks, seen = looks_until(30.0)
    assert looks <= 15, looks
    assert seen - 30.0 <= BUILD_RECHECK_MAX


def test_a_sandbox_boot_is_seen_as_soon_as_before() -> None:
    looks, seen = looks_until(0.2)
    assert seen <= BUILD_RECHECK_MIN and looks == 2  # the old fixed 0.5 s saw it at 0.5 s


@pytest.mark.parametrize("age", [0.0, 0.1, 1.0, 7.5, 100.0])
def test_the_wait_stays_within_its_bounds(age: float) -> None:
    assert BUILD_RECHECK_MIN <= build_recheck(age, 600.0) <= BUILD_RECHECK_MAX


def test_the_deadline_is_not_overslept() -> None:
    # 28 s into a 30 s deadline: looked at again at 30 s, not at 33 s
    assert build_recheck(28.0, 30.0) == pytest.approx(2.0)
    assert build_recheck(29.9, 30.0) == BUILD_RECHECK_MIN  # then the look that times it out
