"""The quota policy (pure): demand, fair order, admission decisions, never-fits, metering."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from service.backends.interfaces import Flavor
from service.domain.quota import spec_demand
from service.domain.spec import JobSpec
from service.quota_policy import (
    CAPACITY_WAIT,
    QUOTA_WAIT,
    Demand,
    Interval,
    Limits,
    Queued,
    Usage,
    decide,
    demand,
    exceeds,
    fair_order,
    meter,
    never_fits,
    over_quota,
    priority_of,
)

T0 = datetime(2026, 11, 1, 12, 0, tzinfo=UTC)
FLAVORS = [
    Flavor("cpu.small", 1, 2048, price_per_hour=0.05),
    Flavor("gpu.1", 8, 65536, gpus=1, gpu_type="A100", price_per_hour=2.0),
    Flavor("gpu.4", 32, 262144, gpus=4, gpu_type="A100", price_per_hour=8.0),
    Flavor("gpu.h100.2", 16, 131072, gpus=2, gpu_type="H100", price_per_hour=6.0),
]
ROOMY = Limits(jobs=100, servers=100, gpus=100)


def q(job_id: str, project: str, minute: int, *, prio: int = 0, gpus: int = 0, servers: int = 1):
    return Queued(
        job_id=job_id,
        project_id=project,
        created_at=T0 + timedelta(minutes=minute),
        demand=Demand(servers=servers, gpus=gpus),
        priority=prio,
    )


def ids(jobs: list[Queued]) -> list[str]:
    return [j.job_id for j in jobs]


# -- demand -------------------------------------------------------------------------------


def test_demand_of_a_named_flavor_counts_its_gpus_per_worker() -> None:
    assert demand({"flavor": "cpu.small"}, FLAVORS) == Demand(servers=1, gpus=0)
    assert demand({"flavor": "gpu.4"}, FLAVORS) == Demand(servers=1, gpus=4)
    # every server boots with the job's flavor: parameter servers and the evaluator hold GPUs too
    assert demand({"flavor": "gpu.4", "workers": 2, "parameter_servers": 1}, FLAVORS) == Demand(
        servers=3, gpus=12
    )
    assert demand({"flavor": "gpu.4", "workers": 2, "evaluator": True}, FLAVORS) == Demand(3, 12)
    assert demand({"flavor": "cpu.small", "workers": 3, "evaluator": True}, FLAVORS) == Demand(4, 0)


def test_demand_of_gpus_is_the_best_fitting_flavor() -> None:
    assert demand({"gpus": 1}, FLAVORS) == Demand(1, 1)
    assert demand({"gpus": 3}, FLAVORS) == Demand(1, 4)  # booted as gpu.4
    assert demand({"gpus": 2, "gpu_type": "h100"}, FLAVORS) == Demand(1, 2)
    assert demand({"gpus": 16}, FLAVORS) == Demand(1, 16)  # none fits: what was asked


def test_a_batch_job_demands_one_server_per_worker_all_at_once() -> None:
    def batch(workers: object, **res: object) -> dict[str, object]:
        return {"resources": res, "prediction": {"max_workers": workers}}

    assert spec_demand(batch(4, flavor="gpu.1"), FLAVORS) == Demand(servers=4, gpus=4)
    assert spec_demand(batch(1, flavor="gpu.4"), FLAVORS) == Demand(servers=1, gpus=4)
    assert spec_demand(batch(3), FLAVORS, default_flavor="cpu.small") == Demand(3, 0)
    assert spec_demand(batch("x"), FLAVORS) == Demand(1, 0)  # not an int: one server
    assert spec_demand({"resources": {"flavor": "gpu.4"}}, FLAVORS) == Demand(1, 4)
    lim = Limits(jobs=2, servers=3, gpus=8)
    assert never_fits(lim, batch(3, flavor="gpu.1"), FLAVORS) is None
    assert never_fits(lim, batch(4, flavor="cpu.small"), FLAVORS) == (
        "the job needs 4 servers but the project's quota allows 3"
    )
    assert never_fits(lim, batch(3, flavor="gpu.4"), FLAVORS) == (
        "the job needs 12 GPUs but the project's quota allows 8"
    )
    # admission takes all of a gang's servers or none: 2 free servers do not start a 3
    d = decide([q("gang", "p", 0, servers=3), q("one", "p", 1)], {}, lambda p: ROOMY, capacity=2)
    assert list(d.admit) == [] and "gang" in d.waiting and "one" in d.waiting  # no overtaking


def test_demand_without_flavor_uses_the_default_and_unknown_flavors_have_no_gpus() -> None:
    assert demand({}, FLAVORS, default_flavor="gpu.1") == Demand(1, 1)
    assert demand({"flavor": "nope"}, FLAVORS) == Demand(1, 0)
    assert demand({}, []) == Demand(1, 0)


@pytest.mark.parametrize(
    ("labels", "expected"),
    [
        ({}, 0),
        (None, 0),
        ({"priority": "5"}, 5),
        ({"priority": " -2 "}, -2),
        ({"priority": "high"}, 0),
        ({"priority": "99999999999"}, 1_000_000),
        ({"team": "a"}, 0),
    ],
)
def test_priority_label(labels: dict[str, str] | None, expected: int) -> None:
    assert priority_of(labels) == expected


# -- fair order ---------------------------------------------------------------------------


def test_round_robin_between_projects_fifo_within_one() -> None:
    queue = [
        q("a1", "A", 0),
        q("a2", "A", 1),
        q("a3", "A", 2),
        q("b1", "B", 3),
        q("b2", "B", 4),
        q("c1", "C", 5),
    ]
    assert ids(fair_order(queue)) == ["a1", "b1", "c1", "a2", "b2", "a3"]
    # input order does not matter
    assert ids(fair_order(list(reversed(queue)))) == ["a1", "b1", "c1", "a2", "b2", "a3"]


def test_the_project_served_longest_ago_goes_first() -> None:
    queue = [q("a1", "A", 0), q("a2", "A", 1), q("b1", "B", 5), q("c1", "C", 6)]
    served = {"A": T0 + timedelta(hours=1), "B": T0 + timedelta(minutes=30)}
    # C was never served, then B (longest ago), then A
    assert ids(fair_order(queue, served)) == ["c1", "b1", "a1", "a2"]


def test_priority_reorders_only_its_own_project() -> None:
    queue = [
        q("a1", "A", 0),
        q("a2", "A", 1, prio=5),
        q("a3", "A", 2, prio=5),
        q("b1", "B", 3, prio=-1),
        q("b2", "B", 4, prio=100),
    ]
    assert ids(fair_order(queue)) == ["a2", "b2", "a3", "b1", "a1"]


def test_naive_and_aware_times_compare() -> None:
    naive = Queued("n", "N", datetime(2026, 11, 1, 11, 0), Demand())
    assert ids(fair_order([q("a1", "A", 0), naive])) == ["n", "a1"]


# -- decisions ----------------------------------------------------------------------------


def test_over_quota_messages() -> None:
    lim = Limits(jobs=2, servers=3, gpus=4)
    assert over_quota("p1", lim, Usage(2, 2, 0), Demand()) == (
        "project p1 uses 2 of 2 concurrent jobs"
    )
    assert over_quota("p1", lim, Usage(1, 3, 0), Demand()) == (
        "project p1 uses 3 of 3 servers; the job needs 1"
    )
    assert over_quota("p1", lim, Usage(1, 1, 3), Demand(1, 2)) == (
        "project p1 uses 3 of 4 GPUs; the job needs 2"
    )
    assert over_quota("p1", lim, Usage(1, 1, 4), Demand(1, 0)) is None
    assert over_quota("p1", lim, Usage(1, 2, 2), Demand(1, 2)) is None


def test_decide_admits_within_quota_in_fair_order() -> None:
    queue = [q("a1", "A", 0), q("a2", "A", 1), q("a3", "A", 2), q("b1", "B", 3)]
    limits = {"A": Limits(2, 10, 0), "B": Limits(1, 10, 0)}
    d = decide(queue, {"A": Usage(1, 1, 0)}, limits.__getitem__)
    assert d.admit == ("a1", "b1")
    assert d.waiting == {
        "a2": f"{QUOTA_WAIT}: project A uses 2 of 2 concurrent jobs",
        "a3": f"{QUOTA_WAIT}: project A uses 2 of 2 concurrent jobs "
        "(an earlier job of the project is first in line)",
    }


def test_a_waiting_jobs_reason_stays_the_same_when_the_first_in_line_changes() -> None:
    # the reason is an event on the job each time it changes: one that named the first job
    # would add an event to every waiting job of the project whenever the first one started
    limits = {"A": Limits(1, 10, 0)}
    before = decide([q("a2", "A", 1), q("a3", "A", 2)], {"A": Usage(1, 1, 0)}, limits.__getitem__)
    after = decide([q("a3", "A", 2)], {"A": Usage(1, 1, 0)}, limits.__getitem__)
    assert before.admit == after.admit == ()
    assert "a2" not in before.waiting["a3"]
    assert before.waiting["a3"] != after.waiting["a3"]  # first in line now: no "earlier job"
    later = decide(
        [q("a3", "A", 2), q("a4", "A", 3), q("a5", "A", 4)],
        {"A": Usage(1, 1, 0)},
        limits.__getitem__,
    )
    assert later.waiting["a5"] == before.waiting["a3"] == later.waiting["a4"]


def test_capacity_stops_everyone_behind_the_first_job_that_does_not_fit() -> None:
    queue = [q("a1", "A", 0), q("b1", "B", 1, servers=2), q("c1", "C", 2), q("a2", "A", 3)]
    d = decide(queue, {}, lambda p: ROOMY, capacity=4, servers_in_use=2)
    # a1 takes one of the two free servers; b1 needs two: nobody overtakes it
    assert d.admit == ("a1",)
    assert d.waiting == {
        "b1": f"{CAPACITY_WAIT}: all 4 servers in use",
        "c1": f"{CAPACITY_WAIT}: all 4 servers in use",
        "a2": f"{CAPACITY_WAIT}: all 4 servers in use",
    }


def test_a_project_over_quota_does_not_hold_back_others_and_keeps_its_turn() -> None:
    queue = [q("a1", "A", 0, gpus=2), q("a2", "A", 1), q("b1", "B", 2), q("b2", "B", 3)]
    limits = {"A": Limits(5, 5, 2), "B": Limits(5, 5, 0)}
    d = decide(queue, {"A": Usage(1, 1, 1)}, limits.__getitem__, capacity=10)
    assert d.admit == ("b1", "b2")
    assert d.waiting["a1"] == f"{QUOTA_WAIT}: project A uses 1 of 2 GPUs; the job needs 2"
    assert d.waiting["a2"].startswith(f"{QUOTA_WAIT}: project A uses 1 of 2 GPUs")
    assert d.waiting["a2"].endswith("(an earlier job of the project is first in line)")


def test_a_job_that_can_never_fit_does_not_block_its_project() -> None:
    queue = [q("a1", "A", 0, gpus=8), q("a2", "A", 1)]
    d = decide(queue, {}, lambda p: Limits(5, 5, 4))
    assert d.admit == ("a2",)
    assert d.waiting["a1"].startswith(
        f"{QUOTA_WAIT}: the job needs 8 GPUs but the project's quota allows 4"
    )


def test_quota_reason_wins_over_capacity() -> None:
    queue = [q("a1", "A", 0), q("a2", "A", 1), q("b1", "B", 2)]
    d = decide(
        queue, {"A": Usage(1, 1, 0)}, lambda p: Limits(2, 5, 0), capacity=2, servers_in_use=1
    )
    assert d.admit == ("a1",)
    assert d.waiting["a2"].startswith(QUOTA_WAIT)
    assert d.waiting["b1"].startswith(CAPACITY_WAIT)


def test_simulated_bursts_are_served_round_robin() -> None:
    """Three projects submit bursts; one server frees at a time: who starts, in order."""
    queue = [q(f"a{i}", "A", i) for i in range(4)]
    queue += [q(f"b{i}", "B", 10 + i) for i in range(3)]
    queue += [q(f"c{i}", "C", 20 + i) for i in range(2)]
    served: dict[str, datetime] = {}
    started: list[str] = []
    clock = T0 + timedelta(hours=1)
    while queue:
        d = decide(queue, {}, lambda p: ROOMY, last_admitted=served, capacity=1)
        assert len(d.admit) == 1
        job = next(j for j in queue if j.job_id == d.admit[0])
        started.append(job.job_id)
        queue.remove(job)
        clock += timedelta(seconds=1)
        served[job.project_id] = clock
    assert started == ["a0", "b0", "c0", "a1", "b1", "c1", "a2", "b2", "a3"]


# -- never fits ---------------------------------------------------------------------------


def _spec(**resources: object) -> JobSpec:
    return JobSpec.model_validate(
        {
            "name": "j",
            "trainer": {"package_uri": "local://p/x.tar.gz", "module": "m"},
            "resources": resources,
        }
    )


def test_never_fits() -> None:
    lim = Limits(jobs=2, servers=2, gpus=4)
    assert never_fits(lim, _spec(flavor="gpu.4"), FLAVORS) is None
    assert never_fits(lim, _spec(gpus=3), FLAVORS) is None
    assert never_fits(lim, _spec(flavor="gpu.4", workers=2), FLAVORS) == (
        "the job needs 8 GPUs but the project's quota allows 4"
    )
    assert never_fits(lim, _spec(workers=2, parameter_servers=1), FLAVORS) == (
        "the job needs 3 servers but the project's quota allows 2"
    )
    assert never_fits(Limits(0, 2, 4), _spec(), FLAVORS) == (
        "the project's quota allows no concurrent jobs"
    )
    assert never_fits(Limits(1, 1, 0), _spec(), FLAVORS, default_flavor="gpu.1") is not None
    assert never_fits(Limits(1, 1, 0), {"resources": {"flavor": "cpu.small"}}, FLAVORS) is None
    assert exceeds(lim, Demand(2, 4)) is None


# -- metering -----------------------------------------------------------------------------


def test_meter_sums_clipped_intervals() -> None:
    intervals = [
        Interval(T0, T0 + timedelta(hours=2), gpus=2, price_per_hour=3.0),
        Interval(T0 + timedelta(hours=1), None, gpus=0, price_per_hour=0.5),  # still running
        Interval(T0, T0, gpus=1, price_per_hour=1.0),  # never billed
    ]
    now = T0 + timedelta(hours=4)
    whole = meter(intervals, now)
    assert whole.vm_seconds == 5 * 3600
    assert whole.gpu_hours == pytest.approx(4.0)
    assert whole.cost == pytest.approx(2 * 3.0 + 3 * 0.5)
    window = meter(intervals, now, since=T0 + timedelta(minutes=90), until=T0 + timedelta(hours=3))
    # first: 30 min; second: 90 min
    assert window.vm_seconds == 2 * 3600
    assert window.gpu_hours == pytest.approx(1.0)
    assert window.cost == pytest.approx(0.5 * 3.0 + 1.5 * 0.5)
    # a running server is billed up to now, never ahead of it
    assert meter(intervals, now, since=now, until=now + timedelta(hours=1)).vm_seconds == 0
    assert meter([], now).as_dict() == {"vm_seconds": 0.0, "gpu_hours": 0.0, "cost": 0.0}
