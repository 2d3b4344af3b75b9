"""The converge plan of an endpoint (service/domain/endpoints.py): pure, so every situation is
spelled out here: create, scale up and down, a rolling switch step by step, a dead replica
mid-switch, a traffic split, giving up, deleting."""

from __future__ import annotations

import pytest

from service.domain.endpoints import (
    Advance,
    Boot,
    Delete,
    Desired,
    Drain,
    EndpointState,
    GiveUp,
    Limits,
    MarkFailed,
    Replica,
    ReplicaState,
    Serve,
    can_transition,
    plan,
    split_counts,
    traffic_problem,
)

R = ReplicaState
LIM = Limits(max_health_failures=3, drain_seconds=2.0, stuck_after=300.0, max_failures=3)


def rep(i: int, v: int, state: ReplicaState, **kw: object) -> Replica:
    return Replica(id=i, version=v, state=state, **kw)  # type: ignore[arg-type]


def test_a_new_endpoint_boots_its_replicas() -> None:
    p = plan(Desired(target=1, replicas=2), [], LIM)
    assert p.actions == (Boot(1), Boot(1))
    assert p.settle is None and not p.converged


def test_replicas_on_their_way_are_advanced_not_booted_again() -> None:
    reps = [rep(1, 1, R.BOOTING), rep(2, 1, R.LOADING)]
    p = plan(Desired(target=1, replicas=2), reps, LIM)
    assert p.actions == (Serve(1),) or p.actions == (Advance(1), Advance(2))
    assert set(p.actions) == {Advance(1), Advance(2)}


def test_all_ready_serves_the_target_then_settles_ready() -> None:
    reps = [rep(1, 1, R.READY), rep(2, 1, R.READY)]
    first = plan(Desired(target=1, replicas=2), reps, LIM)
    assert first.actions == (Serve(1),)
    done = plan(Desired(target=1, replicas=2, serving_version=1), reps, LIM)
    assert done.actions == () and done.settle is EndpointState.READY and done.converged


def test_scale_up_boots_only_the_difference() -> None:
    reps = [rep(1, 1, R.READY), rep(2, 1, R.READY)]
    p = plan(Desired(target=1, replicas=4, serving_version=1), reps, LIM)
    assert p.actions == (Boot(1), Boot(1))
    assert p.settle is None


def test_scale_down_deletes_unready_first_then_drains_newest_ready() -> None:
    reps = [rep(1, 1, R.READY), rep(2, 1, R.READY), rep(3, 1, R.READY), rep(4, 1, R.BOOTING)]
    p = plan(Desired(target=1, replicas=2, serving_version=1), reps, LIM)
    assert p.actions == (Delete(4), Drain(3))


def test_drained_replicas_are_deleted_after_the_drain_period() -> None:
    d = Desired(target=1, replicas=1, serving_version=1)
    early = plan(d, [rep(1, 1, R.READY), rep(2, 1, R.DRAINING, in_state_for=0.5)], LIM)
    assert early.actions == ()
    assert early.settle is None  # a draining replica is still there: not converged
    late = plan(d, [rep(1, 1, R.READY), rep(2, 1, R.DRAINING, in_state_for=2.5)], LIM)
    assert late.actions == (Delete(2),)


def test_rolling_switch_step_by_step() -> None:
    old = [rep(1, 1, R.READY), rep(2, 1, R.READY)]
    d = Desired(target=2, replicas=2, serving_version=1)
    # 1. the new version's replicas boot; the old ones keep serving, untouched
    p1 = plan(d, old, LIM)
    assert p1.actions == (Boot(2), Boot(2))
    # 2. one new one ready, one loading: still no switch
    mid = [*old, rep(3, 2, R.READY), rep(4, 2, R.LOADING)]
    p2 = plan(d, mid, LIM)
    assert p2.actions == (Advance(4),)
    assert not p2.of(Serve) and not p2.of(Drain) and not p2.of(Delete)
    # 3. both new ones ready: serving moves, the old ones are drained in the same round
    ready = [*old, rep(3, 2, R.READY), rep(4, 2, R.READY)]
    p3 = plan(d, ready, LIM)
    assert p3.actions[0] == Serve(2)
    assert set(p3.actions[1:]) == {Drain(1), Drain(2)}
    # 4. drained past the period: deleted; then converged
    d4 = Desired(target=2, replicas=2, serving_version=2)
    draining = [rep(1, 1, R.DRAINING, in_state_for=3), rep(2, 1, R.DRAINING, in_state_for=3)]
    p4 = plan(d4, [*draining, rep(3, 2, R.READY), rep(4, 2, R.READY)], LIM)
    assert set(p4.actions) == {Delete(1), Delete(2)}
    p5 = plan(d4, [rep(3, 2, R.READY), rep(4, 2, R.READY)], LIM)
    assert p5.converged


def test_a_dead_old_replica_mid_switch_is_replaced_so_capacity_holds() -> None:
    reps = [
        rep(1, 1, R.READY, server_gone=True),
        rep(2, 1, R.READY),
        rep(3, 2, R.LOADING),
        rep(4, 2, R.BOOTING),
    ]
    p = plan(Desired(target=2, replicas=2, serving_version=1), reps, LIM)
    assert MarkFailed(1, "its server vanished") in p.actions
    assert Boot(1) in p.actions  # the old version keeps its count until the switch
    assert Delete(1) in p.actions  # its server is gone: nothing to keep
    assert not p.of(Serve)
    assert set(p.of(Advance)) == {Advance(3), Advance(4)}


def test_a_dead_new_replica_mid_switch_is_replaced_and_the_switch_waits() -> None:
    reps = [rep(1, 1, R.READY), rep(2, 1, R.READY), rep(3, 2, R.READY), rep(4, 2, R.FAILED)]
    p = plan(Desired(target=2, replicas=2, serving_version=1), reps, LIM)
    assert Boot(2) in p.actions
    assert not p.of(Serve)
    assert not p.of(Drain)
    # it never served: nothing to keep, it goes at once
    assert Delete(4) in p.actions
    # one that served is kept until its version has its count ready again (new one first)
    served = [*reps[:3], rep(4, 2, R.FAILED, was_ready=True)]
    p2 = plan(Desired(target=2, replicas=2, serving_version=1), served, LIM)
    assert Boot(2) in p2.actions and Delete(4) not in p2.actions


def test_failing_health_checks_replace_then_delete() -> None:
    d = Desired(target=1, replicas=2, serving_version=1)
    sick = [rep(1, 1, R.READY, health_failures=3), rep(2, 1, R.READY, health_failures=2)]
    p = plan(d, sick, LIM)
    assert p.actions == (MarkFailed(1, "3 health checks failed in a row"), Boot(1))
    # once the replacement is ready, the dead one goes
    later = [rep(1, 1, R.FAILED, was_ready=True), rep(2, 1, R.READY), rep(3, 1, R.READY)]
    kept = [rep(1, 1, R.FAILED, was_ready=True), rep(2, 1, R.READY), rep(3, 1, R.BOOTING)]
    assert plan(d, kept, LIM).actions == (Advance(3),)
    assert plan(d, later, LIM).actions == (Delete(1),)


def test_a_replica_stuck_booting_is_dead() -> None:
    reps = [rep(1, 1, R.PROVISIONING, in_state_for=301)]
    p = plan(Desired(target=1, replicas=1), reps, LIM)
    assert isinstance(p.actions[0], MarkFailed)
    assert Boot(1) in p.actions


def test_a_version_that_never_comes_up_is_given_up() -> None:
    d = Desired(target=2, replicas=1, serving_version=1)
    reps = [rep(1, 1, R.READY), rep(5, 2, R.FAILED)]
    p = plan(d, reps, LIM, failures={2: 3})
    assert GiveUp(2, "version 2: 3 replicas failed and none became ready") in p.actions
    assert Boot(2) not in p.actions
    assert Delete(5) in p.actions  # a given-up version's failed replicas go
    assert not p.of(Drain)  # the serving version stays
    assert p.settle is EndpointState.FAILED


def test_traffic_split_counts_and_primary() -> None:
    assert split_counts(4, {3: 90, 4: 10}) == {3: 4, 4: 1}
    assert split_counts(2, {3: 50, 4: 50}) == {3: 1, 4: 1}
    assert split_counts(2, {3: 100, 4: 0}) == {3: 2}
    d = Desired(target=3, replicas=2, serving_version=3, traffic={3: 90, 4: 10})
    reps = [rep(1, 3, R.READY), rep(2, 3, R.READY)]
    assert plan(d, reps, LIM).actions == (Boot(4),)
    done = plan(d, [*reps, rep(3, 4, R.READY)], LIM)
    assert done.converged


def test_traffic_split_moves_serving_to_the_largest_share() -> None:
    d = Desired(target=3, replicas=1, serving_version=3, traffic={3: 20, 4: 80})
    reps = [rep(1, 3, R.READY), rep(2, 4, R.READY)]
    assert plan(d, reps, LIM).actions == (Serve(4),)


def test_dropping_a_split_drains_the_other_version() -> None:
    d = Desired(target=4, replicas=1, serving_version=4)
    reps = [rep(1, 3, R.READY), rep(2, 4, R.READY)]
    assert plan(d, reps, LIM).actions == (Drain(1),)


def test_a_label_pointing_nowhere_keeps_what_is_served() -> None:
    reps = [rep(1, 1, R.READY)]
    assert plan(Desired(target=None, replicas=1, serving_version=1), reps, LIM).converged


def test_deleting_drains_ready_then_deletes_everything() -> None:
    d = Desired(target=1, replicas=2, serving_version=1, deleting=True)
    reps = [rep(1, 1, R.READY), rep(2, 1, R.BOOTING), rep(3, 1, R.FAILED)]
    p = plan(d, reps, LIM)
    assert p.actions == (Drain(1), Delete(2), Delete(3))
    p2 = plan(d, [rep(1, 1, R.DRAINING, in_state_for=0.1)], LIM)
    assert p2.actions == () and p2.settle is None
    p3 = plan(d, [rep(1, 1, R.DRAINING, in_state_for=5)], LIM)
    assert p3.actions == (Delete(1),)
    assert plan(d, [], LIM).settle is EndpointState.DELETED


@pytest.mark.parametrize(
    ("traffic", "ok"),
    [
        (None, True),
        ({"3": 90, "4": 10}, True),
        ({"3": 100}, True),
        ({"3": 90}, False),
        ({}, False),
        ({"x": 100}, False),
        ({"0": 100}, False),
        ({"3": 50.5, "4": 49.5}, False),
        ({"3": True, "4": 99}, False),
        ({"3": -10, "4": 110}, False),
    ],
)
def test_traffic_validation(traffic: dict[str, object] | None, ok: bool) -> None:
    assert (traffic_problem(traffic) is None) is ok


def test_transitions() -> None:
    S = EndpointState
    assert can_transition(S.CREATING, S.READY)
    assert can_transition(S.READY, S.UPDATING)
    assert can_transition(S.FAILED, S.UPDATING)
    assert can_transition(S.DELETING, S.DELETED)
    assert not can_transition(S.DELETED, S.READY)
    assert not can_transition(S.DELETING, S.READY)
    assert all(can_transition(s, S.DELETING) for s in S if s not in (S.DELETING, S.DELETED))
